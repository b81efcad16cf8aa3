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
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefdiff.config import Params
from prefdiff.data.atomic import atomic_dir
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.models import lora
from prefdiff.sampling.ddim import ddim_step_with_logprob
from prefdiff.sampling.guidance import encode_prompts, guided_noise_pred
from prefdiff.training.checkpoint import load_checkpoint, save_checkpoint
from prefdiff.training.losses import d3po_loss

CURVE_FIELDS = ("step", "epoch", "loss", "implicit_acc", "clip_frac", "mean_log_ratio", "lr")


@dataclass
class TrainSummary:
    steps: int
    epochs: int
    pairs: int
    timesteps_per_pair: int
    resumed_from_step: int
    seconds: float
    final: dict[str, float]
    curve: list[dict[str, float]] = field(repr=False, default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "steps": self.steps, "epochs": self.epochs, "pairs": self.pairs,
            "resumed_from_step": self.resumed_from_step, "seconds": round(self.seconds, 2), **self.final,
        }


def _rng(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % (2**62))


def _batch_order(num_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_pairs, generator=_rng(seed, epoch, -1))


def _timestep_perms(batch: int, num_steps: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    gen = _rng(seed, epoch, index)
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

    chain [N, T+1, C, H, W] fp32 (CPU), timesteps [T], embeds [N, L, D], uncond [1, L, D]. Differentiable
    through the UNet (the policy); wrap in no_grad / adapters_disabled for the reference.
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

    chain [N, T+1, C, H, W] fp32, timesteps [T], embeds [N, L, D].
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
    """Train a LoRA with D3PO; write it (diffusers format) and its epoch snapshots under ``lora_out``.

    ``stop_after_steps`` ends the run after that many optimizer steps *of this call*, leaving the last
    checkpoint behind (used to test that an interrupted run resumes to the same result).
    """
    from accelerate import Accelerator

    from prefdiff.models.loading import load_pipeline

    tp, sp = params.train, params.sampling
    pairs = preferences.training_pairs()
    if not pairs:
        raise ValueError(f"{preferences.root}: no decided preference pairs (all ties?); nothing to train on")
    steps_total = trajectories.num_steps
    steps_per_pair = math.ceil(tp.timestep_fraction * steps_total)
    micro_per_step = tp.gradient_accumulation_steps
    batches_per_epoch = math.ceil(len(pairs) / tp.batch_size)
    optimizer_steps_per_epoch = math.ceil(batches_per_epoch / micro_per_step)
    total_steps = optimizer_steps_per_epoch * tp.epochs

    accelerator = Accelerator(mixed_precision=tp.mixed_precision)
    pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=str(accelerator.device),
                         revision=params.model.revision)
    pipe.scheduler.set_timesteps(steps_total, device=accelerator.device)
    if not torch.equal(pipe.scheduler.timesteps.cpu().long(), trajectories.timesteps):
        raise ValueError(
            f"{trajectories.root}: trajectories were sampled at timesteps {trajectories.timesteps.tolist()[:4]}..., "
            f"the scheduler gives {pipe.scheduler.timesteps.tolist()[:4]}...; re-run the sample stage"
        )
    if tp.init_lora:
        lora_params = lora.load_lora_for_training(pipe.unet, Path(tp.init_lora))
    else:
        with torch.random.fork_rng(devices=[]):  # LoRA A ~ N(0, 1/r) drawn from train.seed: reproducible
            torch.manual_seed(tp.seed)
            lora_params = lora.add_lora(pipe.unet, rank=tp.lora_rank, alpha=tp.lora_alpha)
    optimizer = torch.optim.AdamW(
        lora_params, lr=tp.lr, betas=(tp.adam_beta1, tp.adam_beta2), weight_decay=tp.weight_decay, eps=tp.adam_eps
    )
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)

    # Data: only the images that appear in pairs, kept in memory (fp32 chains).
    image_ids = sorted({i for p in pairs for i in (p.winner, p.loser)})
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    chain, _ = trajectories.load(image_ids)  # [N, T+1, C, H, W]
    prompts = [trajectories.prompt_of(i) for i in image_ids]
    unique_prompts = sorted(set(prompts))
    position = {p: i for i, p in enumerate(unique_prompts)}
    embeds = encode_prompts(pipe, unique_prompts)[torch.tensor([position[p] for p in prompts])].cpu()  # [N, L, D]
    uncond = encode_prompts(pipe, [""])  # [1, L, D]
    winners = torch.tensor([row_of[p.winner] for p in pairs])
    losers = torch.tensor([row_of[p.loser] for p in pairs])
    timesteps = trajectories.timesteps

    fingerprint = inputs_fingerprint(params, trajectories, preferences)
    state_dir, snapshot_dir = checkpoint_dir / "state", checkpoint_dir / "snapshots"
    state = load_checkpoint(state_dir, fingerprint)
    if state is not None:
        lora.set_lora_state_dict(raw_unet, state.lora)
        optimizer.load_state_dict(state.optimizer)
        ref_logp, curve, start_step = state.ref_logp, state.curve, state.step
        progress(f"resuming from checkpoint at optimizer step {start_step}/{total_steps}")
    else:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        reference = "base UNet (adapters disabled)" if tp.reference == "base" else f"start adapter {tp.init_lora}"
        progress(f"reference log-probs for {len(image_ids)} images x {steps_total} steps from the {reference}")
        # previous_round: the adapter the round starts from, i.e. its values right now, before any update
        frozen = lora.adapters_disabled(raw_unet) if tp.reference == "base" else nullcontext()
        with frozen:
            ref_logp = reference_log_probs(pipe, chain, timesteps, embeds, uncond, sp, eta=sp.eta, batch_size=64)
        curve, start_step = [], 0

    progress(
        f"D3PO: {len(pairs)} pairs, {tp.epochs} epochs x {optimizer_steps_per_epoch} optimizer steps "
        f"({total_steps} total), {steps_per_pair}/{steps_total} timesteps per pair, lr {tp.lr}, beta {tp.beta}"
    )
    began, step = time.time(), 0
    device = accelerator.device
    for epoch in range(tp.epochs):
        order = _batch_order(len(pairs), tp.seed, epoch)
        for opt_index in range(optimizer_steps_per_epoch):
            step = epoch * optimizer_steps_per_epoch + opt_index + 1
            if step <= start_step:
                continue
            sums = {"loss": 0.0, "implicit_acc": 0.0, "clip_frac": 0.0, "mean_log_ratio": 0.0}
            first = opt_index * micro_per_step
            batch_ids = range(first, min(first + micro_per_step, batches_per_epoch))
            # Every (micro-batch, timestep) gets its own backward of loss / (number of backwards in this
            # optimizer step), as the official loop's accumulation over T x grad_accum; an epoch's last
            # step may hold fewer micro-batches. Gradients are all-reduced only on the last backward.
            backwards = len(batch_ids) * steps_per_pair
            count = 0
            for b_index in batch_ids:
                rows = order[b_index * tp.batch_size : (b_index + 1) * tp.batch_size]
                w, l = winners[rows], losers[rows]
                b = len(rows)
                perms = _timestep_perms(b, steps_total, tp.seed, epoch, b_index)[:, :steps_per_pair]
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
            accelerator.clip_grad_norm_(lora_params, tp.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step, "epoch": epoch + 1, **{k: v / count for k, v in sums.items()}, "lr": tp.lr}
            curve.append(row)
            if log_metrics is not None:
                log_metrics({f"train/{k}": row[k] for k in sums}, step)
            progress(
                f"step {step}/{total_steps} epoch {epoch + 1}: loss {row['loss']:.5f} acc {row['implicit_acc']:.3f} "
                f"clipped {row['clip_frac']:.3f} log-ratio {row['mean_log_ratio']:+.5f}"
            )
            epoch_done = opt_index + 1 == optimizer_steps_per_epoch
            if epoch_done and ((epoch + 1) % tp.snapshot_every_epochs == 0 or epoch + 1 == tp.epochs):
                with atomic_dir(snapshot_dir / f"epoch-{epoch + 1:04d}") as tmp:
                    lora.save_lora(raw_unet, tmp)
            interrupted = stop_after_steps is not None and step - start_step >= stop_after_steps
            if step % tp.checkpoint_every == 0 or step == total_steps or interrupted:
                save_checkpoint(state_dir, fingerprint=fingerprint, step=step, lora_state=lora.lora_state_dict(raw_unet),
                                optimizer_state=optimizer.state_dict(), ref_logp=ref_logp, curve=curve)
            if interrupted:
                return _summary(curve, step, tp.epochs, len(pairs), steps_per_pair, start_step, began)
    # The final adapter sits at the top of lora_out (``pipe.load_lora_weights(lora_out)`` loads it), the
    # epoch snapshots below it; written as a whole so a crash never leaves a partial LoRA dir.
    with atomic_dir(lora_out) as tmp:
        lora.save_lora(raw_unet, tmp)
        if snapshot_dir.is_dir():
            shutil.copytree(snapshot_dir, tmp / "snapshots")
    return _summary(curve, total_steps, tp.epochs, len(pairs), steps_per_pair, start_step, began)


def _summary(curve, step, epochs, pairs, steps_per_pair, start_step, began) -> TrainSummary:
    last_epoch = curve[-1]["epoch"] if curve else 0
    rows = [r for r in curve if r["epoch"] == last_epoch]
    final = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "implicit_acc", "clip_frac", "mean_log_ratio")} if rows else {}
    return TrainSummary(steps=step, epochs=epochs, pairs=pairs, timesteps_per_pair=steps_per_pair,
                        resumed_from_step=start_step, seconds=time.time() - began, final=final, curve=curve)


__all__ = ["CURVE_FIELDS", "TrainSummary", "inputs_fingerprint", "reference_log_probs", "step_log_probs", "train_d3po"]
