"""D3PO training: DPO at every denoising step of preferred/dispreferred trajectory pairs (Eq. 14).

Per optimizer step (paper Algorithm 1 plus the official code's details): for each micro-batch of pairs,
draw one random timestep permutation per pair (shared by its two images, so both are compared at the
same t), and for each of the first ceil(f*T) permuted steps run ONE batched guided UNet forward of the
policy on both images, score the stored next latent under it, and back-propagate the clipped DPO loss
divided by the number of steps; clip the gradient norm and step AdamW once per (micro-batches x steps).

Faster and leaner than the official loop without changing the math:
- the reference policy never changes during a round, so its log-probs are computed once per (image,
  step) before training, batched, under no_grad (adapters disabled = base, or the round's start adapter
  for "previous_round"), instead of once per epoch with a deep-copied UNet;
- policy forwards batch both images and both guidance branches into one UNet call.

A checkpoint (adapter, optimizer, position, reference log-probs, curve so far) is written atomically
every ``checkpoint_every`` optimizer steps; a run started with the same inputs resumes from it and ends
where an uninterrupted run does (batch order and timestep permutations are pure functions of the seed,
the epoch and the batch index).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from prefdiff.config import Params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.sampling.ddim import ddim_step_with_logprob
from prefdiff.sampling.guidance import encode_prompts, guided_noise_pred
from prefdiff.training.losses import d3po_loss
from prefdiff.training.setup import CheckpointedRun, TrainableUNet, TrainSummary, rng, steps_per_epoch

CURVE_FIELDS = ("step", "epoch", "loss", "implicit_acc", "clip_frac", "mean_log_ratio", "lr")


def _timestep_perms(batch: int, num_steps: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    gen = rng(seed, epoch, index)
    return torch.stack([torch.randperm(num_steps, generator=gen) for _ in range(batch)])  # [b, T]


def inputs_fingerprint(params: Params, trajectories: TrajectoryStore, preferences: PreferenceStore) -> str:
    """What a checkpoint is valid for: the train/model/sampling params and the two datasets."""
    payload = json.dumps(
        {
            "train": params.train.model_dump(), "model": params.model.model_dump(),
            "sampling": params.sampling.model_dump(), "trajectories": trajectories.index_sha256(),
            "preferences": preferences.index["pairs_sha256"],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def step_log_probs(unet, scheduler, chain, timesteps, embeds, uncond, rows, step_index, *, guidance: float, eta: float):
    """log pi(x_{j+1} | x_j) of images ``rows`` [n] at step indices ``step_index`` [n]: ONE guided UNet call.

    chain [N, T+1, C, H, W] fp32 (CPU), timesteps [T], embeds a ``Conditioning`` of N rows (SD or SDXL),
    uncond a 1-row ``Conditioning``. Differentiable through the UNet (the policy); wrap in no_grad /
    adapters_disabled for the reference.
    """
    device = getattr(unet, "module", unet).device
    x = chain[rows, step_index].to(device)
    nxt = chain[rows, step_index + 1].to(device)
    t = timesteps[step_index].to(device)
    cond = embeds[rows].to(device)
    eps = guided_noise_pred(unet, x, t, cond, uncond.to(device).expand_as(cond), guidance)
    return ddim_step_with_logprob(scheduler, eps, t, x, eta=eta, prev_sample=nxt).log_prob


@torch.no_grad()
def reference_log_probs(pipe, chain, timesteps, embeds, uncond, cfg, *, eta: float, batch_size: int) -> torch.Tensor:
    """log pi_ref(x_{j+1} | x_j) for every image and step [N, T], with whatever adapter state ``pipe`` is in.

    chain [N, T+1, C, H, W] fp32, timesteps [T], embeds a ``Conditioning`` of N rows, uncond of 1 row.
    """
    n, steps = chain.shape[0], chain.shape[1] - 1
    out = torch.empty(n, steps)
    flat = [(i, j) for i in range(n) for j in range(steps)]
    for start in range(0, len(flat), batch_size):
        ii = torch.tensor([i for i, _ in flat[start : start + batch_size]])
        jj = torch.tensor([j for _, j in flat[start : start + batch_size]])
        out[ii, jj] = step_log_probs(pipe.unet, pipe.scheduler, chain, timesteps, embeds, uncond, ii, jj,
                                     guidance=cfg.guidance_scale, eta=eta).cpu()
    return out


def check_timesteps(pipe, trajectories: TrajectoryStore, device) -> None:
    """Set the scheduler to the trajectories' step count and refuse a mismatch (another scheduler config)."""
    pipe.scheduler.set_timesteps(trajectories.num_steps, device=device)
    if not torch.equal(pipe.scheduler.timesteps.cpu().long(), trajectories.timesteps):
        raise ValueError(
            f"{trajectories.root}: trajectories were sampled at timesteps {trajectories.timesteps.tolist()[:4]}..., "
            f"the scheduler gives {pipe.scheduler.timesteps.tolist()[:4]}...; re-run the sample stage"
        )


def train_d3po(
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
    """Train with D3PO (LoRA or full UNet); write the result and its epoch snapshots under ``lora_out``.

    ``stop_after_steps`` ends the run after that many optimizer steps *of this call*, leaving the last
    checkpoint behind (used to test that an interrupted run resumes to the same result).
    """
    tp, sp = params.train, params.sampling
    pairs = preferences.training_pairs()
    if not pairs:
        raise ValueError(f"{preferences.root}: no decided preference pairs (all ties?); nothing to train on")
    steps_total = trajectories.num_steps
    steps_per_pair = math.ceil(tp.timestep_fraction * steps_total)
    _, optimizer_steps_per_epoch = steps_per_epoch(len(pairs), tp)
    total_steps = optimizer_steps_per_epoch * tp.epochs

    # The reference log-probs are precomputed before the first update, so no reference copy is kept.
    model = TrainableUNet(params, need_reference_copy=False, progress=progress)
    pipe, accelerator, unet = model.pipe, model.accelerator, model.unet
    check_timesteps(pipe, trajectories, accelerator.device)

    # Data: only the images that appear in pairs, kept in memory (fp32 chains).
    image_ids = sorted({i for p in pairs for i in (p.winner, p.loser)})
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    chain, _ = trajectories.load(image_ids)  # [N, T+1, C, H, W]
    prompts = [trajectories.prompt_of(i) for i in image_ids]
    unique_prompts = sorted(set(prompts))
    position = {p: i for i, p in enumerate(unique_prompts)}
    embeds = encode_prompts(pipe, unique_prompts)[torch.tensor([position[p] for p in prompts])].cpu()  # N rows
    uncond = encode_prompts(pipe, [""])  # 1 row: the unconditional branch (see guidance.py)
    winners = torch.tensor([row_of[p.winner] for p in pairs])
    losers = torch.tensor([row_of[p.loser] for p in pairs])
    timesteps = trajectories.timesteps

    run = CheckpointedRun(model, checkpoint_dir, inputs_fingerprint(params, trajectories, preferences), method="d3po",
                          epochs=tp.epochs, total_steps=total_steps, items=len(pairs), progress=progress,
                          log_metrics=log_metrics, stop_after_steps=stop_after_steps)
    ref_logp = run.extra
    if ref_logp is None:
        if tp.finetune == "full":
            reference = "starting UNet"
        else:
            reference = "base UNet (adapters disabled)" if tp.reference == "base" else f"start adapter {tp.init_lora}"
        progress(f"reference log-probs for {len(image_ids)} images x {steps_total} steps from the {reference}")
        # previous_round / full: the model the round starts from, i.e. as it is now, before any update
        with model.starting_reference():
            ref_logp = reference_log_probs(pipe, chain, timesteps, embeds, uncond, sp, eta=sp.eta, batch_size=64)

    progress(
        f"D3PO: {len(pairs)} pairs, {tp.epochs} epochs x {optimizer_steps_per_epoch} optimizer steps "
        f"({total_steps} total), {steps_per_pair}/{steps_total} timesteps per pair, lr {model.base_lr:g}, beta {tp.beta}"
    )
    device = accelerator.device
    for plan in run.plan(len(pairs)):
        sums = {"loss": 0.0, "implicit_acc": 0.0, "clip_frac": 0.0, "mean_log_ratio": 0.0}
        # Every (micro-batch, timestep) gets its own backward of loss / (number of backwards in this
        # optimizer step), as the official loop's accumulation over T x grad_accum; an epoch's last
        # step may hold fewer micro-batches. Gradients are all-reduced only on the last backward.
        backwards = len(plan.micro_batches) * steps_per_pair
        count = 0
        for b_index, rows in plan.micro_batches:
            w, l = winners[rows], losers[rows]
            b = len(rows)
            perms = _timestep_perms(b, steps_total, tp.seed, plan.epoch, b_index)[:, :steps_per_pair]
            for j in range(steps_per_pair):
                idx = perms[:, j]  # [b] step index per pair, shared by winner and loser
                count += 1
                sync = nullcontext() if count == backwards else accelerator.no_sync(unet)
                with sync:
                    # winners and losers, both guidance branches: one UNet call of 4b inputs
                    logp = step_log_probs(unet, pipe.scheduler, chain, timesteps, embeds, uncond,
                                          torch.cat([w, l]), torch.cat([idx, idx]), guidance=sp.guidance_scale,
                                          eta=sp.eta)
                    policy = torch.stack([logp[:b], logp[b:]], dim=1)  # [b, 2] (winner, loser)
                    ref = torch.stack([ref_logp[w, idx], ref_logp[l, idx]], dim=1).to(device)
                    out = d3po_loss(policy, ref, torch.ones(b, device=device), beta=tp.beta, clip_eps=tp.clip_eps)
                    accelerator.backward(out.loss / backwards)
                for key in sums:
                    sums[key] += float(getattr(out, key).detach())
        model.optimizer_step()
        means = {k: v / count for k, v in sums.items()}
        if run.end_step(plan.step, plan.epoch, plan.epoch_done, means, plan.lr, extra=ref_logp):
            return run.summary({"timesteps_per_pair": steps_per_pair})
    # The final weights sit at the top of lora_out (``pipe.load_lora_weights(lora_out)`` loads a LoRA),
    # the epoch snapshots below them; written as a whole so a crash never leaves a partial dir.
    return run.finish(lora_out, {"timesteps_per_pair": steps_per_pair})


__all__ = ["CURVE_FIELDS", "TrainSummary", "check_timesteps", "inputs_fingerprint", "reference_log_probs", "step_log_probs",
           "train_d3po"]
