"""Group sampler: G images per prompt from one shared initial noise, recording the whole DDIM chain.

Noise is a pure function of a seed: ``torch.Generator().manual_seed(seed)`` draws x_T [C,H,W] first and
then the per-step noise z [G, T, C, H, W] of every image of the group, on the CPU. So the same (prompt,
seed) gives the same x_T and the same z sequence whatever the device, batch composition or LoRA state;
that makes base-vs-trained comparisons paired, and the images of a group differ only through z (D3PO
pairs share the prompt and x_T; their per-step noise differs, as in the official sample.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from prefdiff.data.trajectories import TrajectoryGroup
from prefdiff.sampling.ddim import check_log_probs_defined, ddim_step_with_logprob
from prefdiff.sampling.guards import NumericsError
from prefdiff.sampling.guidance import encode_prompts, guided_noise_pred


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0


def latent_shape(pipe) -> tuple[int, int, int]:
    """(C, H, W) of the UNet's native latents (SD 1.5 and SDXL alike)."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (pipe.unet.config.in_channels, h, w)


def seeded_noise(seed: int, images: int, steps: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T [C,H,W], z [images, steps, C, H, W]) from one CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=gen)
    z = torch.randn((images, steps, *shape), generator=gen)
    return x_T, z


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Final latents [B, C, H, W] -> RGB PIL images through the VAE."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def non_finite_step_message(j: int, steps: int, t: int, eps: torch.Tensor, dtype: torch.dtype) -> str:
    """Why the log-prob of DDIM step j is not finite: the UNet's output, or the step's own numbers."""
    if torch.isfinite(eps).all():
        return (f"non-finite log-prob at DDIM step {j + 1}/{steps} (t={t}) with a finite UNet output; check the "
                f"scheduler config (set_alpha_to_one, betas) and sampling.eta")
    fix = ("model.dtype float16 overflows in this UNet: use bfloat16 or float32" if dtype == torch.float16 else
           "the model's weights or inputs hold NaN/inf (a LoRA trained to non-finite weights?)")
    return f"non-finite UNet output at DDIM step {j + 1}/{steps} (t={t}), so its log-prob is not finite; {fix}"


@torch.no_grad()
def _run_chain(pipe, prompts: list[str], x_T: torch.Tensor, z: torch.Tensor, cfg: SamplingConfig):
    """Sample B chains. x_T [B,C,H,W], z [B,T,C,H,W] -> (chain [B,T+1,C,H,W], log_probs [B,T], timesteps [T]).

    The conditioning is ``encode_prompts``' (SDXL: pooled text embeds and the default size/crop time ids)
    and the unconditional branch is the empty prompt's, as in the trainers. A step whose log-prob is not
    finite stops the run (NumericsError) instead of storing NaN.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    scheduler.set_timesteps(cfg.num_steps, device=device)
    check_log_probs_defined(scheduler)
    cond = encode_prompts(pipe, prompts)
    uncond = encode_prompts(pipe, [""]).expand_as(cond)
    x = x_T.to(device, torch.float32)
    z = z.to(device)
    # The chain stays on the device until the batch ends (one copy back, no wait for the device per step); a
    # non-finite step is found after the loop, and the first one is rerun for its message.
    chain, log_probs = [x], []
    for j, t in enumerate(scheduler.timesteps):
        t_batch = t.expand(x.shape[0])
        eps = guided_noise_pred(unet, x, t_batch, cond, uncond, cfg.guidance_scale)
        step = ddim_step_with_logprob(scheduler, eps, t_batch, x, eta=cfg.eta, noise=z[:, j])
        x = step.prev_sample
        chain.append(x)
        log_probs.append(step.log_prob)
    log_probs = torch.stack(log_probs, dim=1)  # [B, T]
    finite = torch.isfinite(log_probs).all(dim=0).cpu()
    if not finite.all():
        j = int((~finite).nonzero()[0])
        t = scheduler.timesteps[j]
        eps = guided_noise_pred(unet, chain[j], t.expand(x.shape[0]), cond, uncond, cfg.guidance_scale)
        raise NumericsError(non_finite_step_message(j, len(scheduler.timesteps), int(t), eps, unet.dtype))
    return torch.stack(chain, dim=1).cpu(), log_probs.cpu(), scheduler.timesteps.cpu().long()


def sample_groups(
    pipe,
    prompts: list[str],
    seeds: list[int],
    images_per_group: int,
    cfg: SamplingConfig,
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[TrajectoryGroup]:
    """Yield one TrajectoryGroup per (prompt, seed), batching whole groups up to ``batch_size`` images."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per group")
    shape = latent_shape(pipe)
    groups_per_batch = max(1, batch_size // images_per_group)
    for start in range(0, len(prompts), groups_per_batch):
        batch_prompts = prompts[start : start + groups_per_batch]
        batch_seeds = seeds[start : start + groups_per_batch]
        noises = [seeded_noise(s, images_per_group, cfg.num_steps, shape) for s in batch_seeds]
        x_T = torch.stack([x.expand(images_per_group, *shape) for x, _ in noises]).flatten(0, 1)
        z = torch.cat([zz for _, zz in noises])
        image_prompts = [p for p in batch_prompts for _ in range(images_per_group)]
        chain, log_probs, timesteps = _run_chain(pipe, image_prompts, x_T, z, cfg)
        images = decode_images(pipe, chain[:, -1])
        for g, (prompt, seed) in enumerate(zip(batch_prompts, batch_seeds)):
            rows = slice(g * images_per_group, (g + 1) * images_per_group)
            yield TrajectoryGroup(
                prompt=prompt, seed=seed, latents=chain[rows].contiguous(), log_probs=log_probs[rows].contiguous(),
                timesteps=timesteps, images=images[rows],
            )
        if progress is not None:
            progress(min(start + groups_per_batch, len(prompts)), len(prompts))


def generate(
    pipe, prompts: list[str], seeds: list[int], cfg: SamplingConfig, *, batch_size: int = 16
) -> list[Image.Image]:
    """One image per (prompt, seed); the same pair gives the same noise for any LoRA state (paired eval)."""
    return [g.images[0] for g in sample_groups(pipe, prompts, seeds, 1, cfg, batch_size=batch_size)]
