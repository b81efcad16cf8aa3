"""DDPO baseline (Black et al. 2023, as in kvablack/ddpo-pytorch and D3PO's ``rm/train_ddpo.py``).

A policy-gradient method that needs the reward itself, not only preferences: every sampled image's judge
score becomes a per-prompt normalised advantage, and each denoising step of its stored trajectory is trained
with the PPO clipped surrogate against the SAMPLING-TIME log-prob stored by the sample stage (no reference
model, no KL term). The per-step log-prob is the same guided DDIM Gaussian as D3PO's (``step_log_probs``),
so the two methods differ only in the objective.

Rewards come from the preference dataset (each image's ``winner_score``/``loser_score``), so DDPO trains on
exactly the samples and judge the other methods see.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from prefdiff.config import Params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.training.losses import ddpo_loss, per_prompt_advantages
from prefdiff.training.setup import CheckpointedRun, TrainableUNet, TrainSummary, rng, steps_per_epoch


def image_rewards(preferences: PreferenceStore) -> dict[int, float]:
    """Judge score of every image that appears in a pair (ties included: their scores are still rewards)."""
    rewards: dict[int, float] = {}
    for p in preferences.pairs:
        rewards[p.winner] = p.winner_score
        rewards[p.loser] = p.loser_score
    return rewards


def train_ddpo(
    params: Params,
    trajectories: TrajectoryStore,
    preferences: PreferenceStore,
    *,
    lora_out: Path,
    checkpoint_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> TrainSummary:
    """PPO-clipped policy gradient over every judged image's trajectory; writes the result to ``lora_out``."""
    from prefdiff.sampling.guidance import encode_prompts
    from prefdiff.training.d3po import check_timesteps, inputs_fingerprint, step_log_probs

    tp, sp = params.train, params.sampling
    rewards = image_rewards(preferences)
    if not rewards:
        raise ValueError(f"{preferences.root}: no judged images; nothing to train on")
    image_ids = sorted(rewards)
    prompts = [trajectories.prompt_of(i) for i in image_ids]
    # Per-prompt normalisation (DDPO's stat tracker over this round's samples), then PPO's +-clip.
    advantages = per_prompt_advantages(torch.tensor([rewards[i] for i in image_ids]), prompts)
    steps_total = trajectories.num_steps
    steps_per_image = math.ceil(tp.timestep_fraction * steps_total)
    _, per_epoch = steps_per_epoch(len(image_ids), tp)
    total_steps = per_epoch * tp.epochs

    model = TrainableUNet(params, need_reference_copy=False, progress=progress)
    pipe = model.pipe
    check_timesteps(pipe, trajectories, model.device)
    chain, old_logp = trajectories.load(image_ids)  # [N, T+1, C, H, W], sampling-time log-probs [N, T]
    unique = sorted(set(prompts))
    position = {p: i for i, p in enumerate(unique)}
    embeds = encode_prompts(pipe, unique)[torch.tensor([position[p] for p in prompts])].cpu()
    uncond = encode_prompts(pipe, [""])
    timesteps = trajectories.timesteps

    run = CheckpointedRun(model, checkpoint_dir, inputs_fingerprint(params, trajectories, preferences), method="ddpo",
                          epochs=tp.epochs, total_steps=total_steps, items=len(image_ids), progress=progress,
                          log_metrics=log_metrics, stop_after_steps=stop_after_steps)
    progress(f"ddpo: {len(image_ids)} images over {len(unique)} prompts, {tp.epochs} epochs x {per_epoch} "
             f"optimizer steps, {steps_per_image}/{steps_total} timesteps per image, clip {tp.ddpo_clip_range:g}")
    for plan in run.plan(len(image_ids)):
        backwards, count = len(plan.micro_batches) * steps_per_image, 0
        sums = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
        for b_index, rows in plan.micro_batches:
            gen = rng(tp.seed, plan.epoch, b_index)
            perms = torch.stack([torch.randperm(steps_total, generator=gen) for _ in rows])[:, :steps_per_image]
            for j in range(steps_per_image):
                idx = perms[:, j]
                count += 1
                sync = nullcontext() if count == backwards else model.accelerator.no_sync(model.unet)
                with sync:
                    logp = step_log_probs(model.unet, pipe.scheduler, chain, timesteps, embeds, uncond, rows, idx,
                                          guidance=sp.guidance_scale, eta=sp.eta)
                    out = ddpo_loss(logp, old_logp[rows, idx].to(logp.device), advantages[rows].to(logp.device),
                                    clip_range=tp.ddpo_clip_range, adv_clip_max=tp.ddpo_adv_clip_max)
                    model.accelerator.backward(out.loss / backwards)
                for key in sums:
                    sums[key] += float(getattr(out, key).detach())
        model.optimizer_step()
        if run.end_step(plan.step, plan.epoch, plan.epoch_done, {k: v / count for k, v in sums.items()}, plan.lr):
            return run.summary()
    return run.finish(lora_out)


__all__ = ["image_rewards", "train_ddpo"]
