"""What the image methods (Diffusion-DPO, SFT, reward-weighted) share: pairs of final images as noised latents.

They read the same preference dataset (our own labeled trajectories, whose final PNGs are valid training
pairs, or an imported Pick-a-Pic dataset), encode each image with the frozen VAE (a posterior sample, as
the official code), re-noise it and score the UNet's denoising error. Winner and loser share the noise eps
and the timestep t (drawn once per pair and tiled), as Diffusion-DPO's Eq. 14 compares both images at the
same (t, eps). Every random draw (posterior sample, eps, t, empty-prompt dropout) comes from the
micro-batch's generator, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from prefdiff.data.preferences import ImagePair, ShardImage
from prefdiff.models.kinds import is_sdxl
from prefdiff.sampling.guidance import default_time_ids, noise_pred
from prefdiff.training.fit import FitContext, Method, PromptTable, Unit
from prefdiff.training.losses import per_sample_mse


def load_pixels(images: Sequence[Path | ShardImage]) -> torch.Tensor:
    """Encoded images (PNG paths, or imported images in their shards) -> [N, 3, H, W] fp32 in [-1, 1]
    (ToTensor + Normalize([0.5], [0.5]) of the official code). A shard image is checked against its sha256."""
    arrays = []
    for image in images:
        with Image.open(io.BytesIO(image.read_bytes())) as decoded:
            arrays.append(np.asarray(decoded.convert("RGB"), dtype=np.float32))
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


class PairBatchBuilder:
    """Turns a micro-batch of image pairs into noised latents, targets and conditioning (all on ``device``)."""

    def __init__(self, pipe, pairs: Sequence[ImagePair], *, device, empty_prompt_prob: float) -> None:
        self.pipe, self.pairs, self.device = pipe, list(pairs), device
        self.empty_prompt_prob = empty_prompt_prob
        self.table = PromptTable(pipe, [p.prompt for p in self.pairs])
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
        prompt_rows = torch.tensor([self.table.empty_row if d else self.table.row[p.prompt]
                                    for p, d in zip(batch, dropped)])
        copies = 2 if both else 1
        noise, t, prompt_rows = noise.repeat(copies, 1, 1, 1), t.repeat(copies), prompt_rows.repeat(copies)
        cond = self.table.cond[prompt_rows]
        if self.sdxl:
            cond = replace(cond, time_ids=self._time_ids(metas, tuple(pixels.shape[-2:])))
        latents, noise, t = latents.to(self.device), noise.to(self.device), t.to(self.device)
        x_t = self.pipe.scheduler.add_noise(latents, noise, t)
        target = diffusion_target(self.pipe.scheduler, latents, noise, t)
        return x_t, t, target, cond.to(self.device)


class ImagePairMethod(Method):
    """A method on pairs of final images: the batch builder, and the UNet's per-image denoising MSE."""

    both: ClassVar[bool] = True  # score the losers too (SFT: the preferred images only)

    def __init__(self, ctx: FitContext) -> None:
        super().__init__(ctx)
        # an imported dataset's images are each checked against their own sha256 as batches read them, so its
        # shards are not hashed whole first: that would read the dataset twice (~1.3 TB for Pick-a-Pic v2 raw)
        self.pairs = ctx.preferences.image_pairs(ctx.trajectories,
                                                 verify=ctx.preferences.source_kind == "trajectories")
        if not self.pairs:
            raise ValueError(f"{ctx.preferences.root}: no decided preference pairs (all ties?); nothing to train on")
        self.items = len(self.pairs)
        self.builder = PairBatchBuilder(ctx.model.pipe, self.pairs, device=ctx.model.device,
                                        empty_prompt_prob=ctx.params.train.method_params.empty_prompt_prob)

    def batch(self, unit: Unit):
        """(x_t, t, target, cond) of the unit's winners (and losers after them): [B or 2B, ...]."""
        return self.builder.build(unit.rows, unit.generator, both=self.both)

    @staticmethod
    def mse(unet, batch) -> torch.Tensor:
        """Per-image denoising MSE [B or 2B] of ``unet`` on ``batch``."""
        x_t, t, target, cond = batch
        return per_sample_mse(noise_pred(unet, x_t, t, cond), target)


__all__ = ["ImagePairMethod", "PairBatchBuilder"]
