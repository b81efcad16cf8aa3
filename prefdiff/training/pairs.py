"""Trainers on final images through the denoising loss: Diffusion-DPO, SFT on preferred images, reward-weighted.

All three read the same preference dataset (our own labeled trajectories, whose final PNGs are valid
training pairs, or an imported Pick-a-Pic dataset), encode each image with the frozen VAE (a posterior
sample, as the official code), re-noise it and score the UNet's denoising error:

- ``diffusion_dpo`` (Wallace et al. Eq. 14): winner and loser share the noise eps and the timestep t
  (drawn once per pair and tiled, reference notes section 8); per-sample MSE over C,H,W in fp32 for the
  policy and for the reference (adapters disabled, or a frozen copy), then ``diffusion_dpo_loss``;
- ``sft``: the plain denoising MSE of the preferred image only (official ``--sft``);
- ``reward_weighted``: the denoising MSE of both images weighted by the judge's scores.

Per micro-batch every random draw (posterior sample, eps, t, empty-prompt dropout) comes from a generator
seeded by (train.seed, epoch, batch index), so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prefdiff.config import Params
from prefdiff.data.preferences import ImagePair, PreferenceStore
from prefdiff.models.kinds import is_sdxl
from prefdiff.sampling.guidance import Conditioning, default_time_ids, encode_prompts, noise_pred
from prefdiff.training.losses import diffusion_dpo_loss, per_sample_mse, reward_weighted_loss, sft_loss
from prefdiff.training.setup import CheckpointedRun, TrainableUNet, TrainSummary, rng, steps_per_epoch

PAIR_METHODS = ("diffusion_dpo", "sft", "reward_weighted")


def load_pixels(paths: Sequence[Path]) -> torch.Tensor:
    """PNG files -> [N, 3, H, W] fp32 in [-1, 1] (ToTensor + Normalize([0.5], [0.5]) of the official code)."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in one batch have different sizes {sorted(shapes)}; import at one resolution")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE posterior sample x scaling_factor [N, C, h, w] fp32; the sample's noise comes from ``generator``."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
    return (mean + std * torch.randn(mean.shape, generator=generator)) * vae.config.scaling_factor


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps for epsilon-prediction; v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 for v-prediction."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = scheduler.alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; allowed: epsilon, v_prediction")


def pairs_fingerprint(params: Params, preferences: PreferenceStore) -> str:
    payload = json.dumps({"train": params.train.model_dump(), "model": params.model.model_dump(),
                          "preferences": preferences.index["pairs_sha256"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class PairBatchBuilder:
    """Turns a micro-batch of image pairs into noised latents, targets and conditioning (all on ``device``)."""

    def __init__(self, pipe, pairs: Sequence[ImagePair], *, device, empty_prompt_prob: float) -> None:
        self.pipe, self.pairs, self.device = pipe, list(pairs), device
        self.empty_prompt_prob = empty_prompt_prob
        prompts = sorted({p.prompt for p in self.pairs})
        self.prompt_row = {p: i for i, p in enumerate(prompts)}
        # Text encoders are frozen: every prompt is encoded once; row len(prompts) is the empty prompt.
        self.table = Conditioning.cat([encode_prompts(pipe, prompts), encode_prompts(pipe, [""])]).cpu()
        self.empty_row = len(prompts)
        self.sdxl = is_sdxl(pipe)
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    def _time_ids(self, metas: list[dict | None], size: tuple[int, int]) -> torch.Tensor:
        rows = []
        for meta in metas:
            if meta is None:
                rows.append(default_time_ids(self.pipe, 1, original_size=size, target_size=size))
            else:
                rows.append(default_time_ids(self.pipe, 1, original_size=tuple(meta["original_size"]),
                                                   crop_top_left=tuple(meta["crop_top_left"]), target_size=size))
        return torch.cat(rows)

    def build(self, rows: torch.Tensor, generator: torch.Generator, *, both: bool):
        """(x_t, t, target, cond) for the winners (and losers after them when ``both``): [B or 2B, ...].

        Draw order from ``generator``: posterior noise, eps [B], t [B], dropout [B] — eps and t are drawn once
        per pair and tiled, so a pair's two images are noised identically (Diffusion-DPO, shared eps and t).
        """
        batch = [self.pairs[int(i)] for i in rows]
        paths = [p.winner_image for p in batch] + ([p.loser_image for p in batch] if both else [])
        metas = [p.winner_meta for p in batch] + ([p.loser_meta for p in batch] if both else [])
        pixels = load_pixels(paths)
        latents = encode_latents(self.pipe.vae, pixels, generator)  # [n, C, h, w]
        b = len(batch)
        noise = torch.randn((b, *latents.shape[1:]), generator=generator)
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator)
        dropped = torch.rand(b, generator=generator) < self.empty_prompt_prob
        prompt_rows = torch.tensor([self.empty_row if d else self.prompt_row[p.prompt] for p, d in zip(batch, dropped)])
        copies = 2 if both else 1
        noise, t, prompt_rows = noise.repeat(copies, 1, 1, 1), t.repeat(copies), prompt_rows.repeat(copies)
        cond = self.table[prompt_rows]
        if self.sdxl:
            cond = replace(cond, time_ids=self._time_ids(metas, tuple(pixels.shape[-2:])))
        latents, noise, t = latents.to(self.device), noise.to(self.device), t.to(self.device)
        x_t = self.pipe.scheduler.add_noise(latents, noise, t)
        target = diffusion_target(self.pipe.scheduler, latents, noise, t)
        return x_t, t, target, cond.to(self.device)


def pair_losses(method: str, model: TrainableUNet, builder: PairBatchBuilder, rows, generator, tp):
    """(loss, metrics) of one micro-batch for a pair method."""
    both = method != "sft"
    x_t, t, target, cond = builder.build(rows, generator, both=both)
    mse = per_sample_mse(noise_pred(model.unet, x_t, t, cond), target)  # [2B] (winners, then losers) or [B]
    b = len(rows)
    if method == "sft":
        loss = sft_loss(mse)
        return loss, {"loss": float(loss.detach()), "model_mse": float(mse.detach().mean())}
    if method == "reward_weighted":
        batch = [builder.pairs[int(i)] for i in rows]
        rewards = torch.tensor([p.winner_score for p in batch] + [p.loser_score for p in batch], device=mse.device)
        out = reward_weighted_loss(mse, rewards, temperature=tp.reward_temperature)
        return out.loss, {"loss": float(out.loss.detach()), "model_mse": float(mse.detach().mean()),
                          "winner_weight": float(out.weights[:b].mean())}
    with model.reference() as ref_unet:
        ref_mse = per_sample_mse(noise_pred(ref_unet, x_t, t, cond), target)
    out = diffusion_dpo_loss(mse[:b], mse[b:], ref_mse[:b], ref_mse[b:], beta=tp.official_dpo_beta)
    return out.loss, {"loss": float(out.loss.detach()), "implicit_acc": float(out.implicit_acc),
                      "model_mse": float(out.model_mse), "ref_mse": float(out.ref_mse), "margin": float(out.margin)}


def train_pairs(
    params: Params,
    preferences: PreferenceStore,
    *,
    trajectories=None,
    lora_out: Path,
    checkpoint_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> TrainSummary:
    """Train with ``params.train.method`` in PAIR_METHODS; write the result (and epoch snapshots) to ``lora_out``."""
    tp = params.train
    if tp.method not in PAIR_METHODS:
        raise ValueError(f"train_pairs trains {PAIR_METHODS}; train.method is {tp.method!r}")
    pairs = preferences.image_pairs(trajectories)
    if not pairs:
        raise ValueError(f"{preferences.root}: no decided preference pairs (all ties?); nothing to train on")
    _, per_epoch = steps_per_epoch(len(pairs), tp)
    total_steps = per_epoch * tp.epochs

    model = TrainableUNet(params, need_reference_copy=tp.method == "diffusion_dpo", progress=progress)
    builder = PairBatchBuilder(model.pipe, pairs, device=model.device, empty_prompt_prob=tp.empty_prompt_prob)
    run = CheckpointedRun(model, checkpoint_dir, pairs_fingerprint(params, preferences), method=tp.method,
                          epochs=tp.epochs, total_steps=total_steps, items=len(pairs), progress=progress,
                          log_metrics=log_metrics, stop_after_steps=stop_after_steps)
    beta = f", beta {tp.official_dpo_beta:g} (official convention)" if tp.method == "diffusion_dpo" else ""
    progress(f"{tp.method}: {len(pairs)} pairs, {tp.epochs} epochs x {per_epoch} optimizer steps "
             f"({total_steps} total), batch {tp.batch_size} x accumulation {tp.gradient_accumulation_steps}{beta}")
    for plan in run.plan(len(pairs)):
        sums: dict[str, float] = {}
        n = len(plan.micro_batches)
        for count, (b_index, rows) in enumerate(plan.micro_batches, start=1):
            # gradients are all-reduced on the last micro-batch only
            sync = model.accelerator.no_sync(model.unet) if count < n else nullcontext()
            with sync:
                loss, metrics = pair_losses(tp.method, model, builder, rows, rng(tp.seed, plan.epoch, b_index), tp)
                model.accelerator.backward(loss / n)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        model.optimizer_step()
        if run.end_step(plan.step, plan.epoch, plan.epoch_done, {k: v / n for k, v in sums.items()}, plan.lr):
            return run.summary()
    return run.finish(lora_out)


__all__ = ["PAIR_METHODS", "PairBatchBuilder", "diffusion_target", "encode_latents", "load_pixels", "pair_losses",
           "train_pairs"]
