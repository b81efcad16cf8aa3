"""Prompt conditioning (SD 1.5 and SDXL) and the noise predictions shared by sampler and trainers.

Policy and reference must see exactly the same guidance (D3PO's official code applies CFG to both), so
there is one function for it (``guided_noise_pred``), and one for the unguided prediction the ELBO
trainers (Diffusion-DPO, SFT) use (``noise_pred``).

A prompt's conditioning is a ``Conditioning``: the cross-attention states for every UNet, plus for SDXL
the pooled text embedding of the second encoder and the six "add time ids" (original size, crop
top-left, target size). Code that handles conditioning (indexing rows, moving devices, expanding the
unconditional row, batching) goes through its methods, so it is the same for both families.

The empty prompt ``""`` means "no prompt" everywhere (the unconditional branch of CFG, a dropped
caption) and maps to the model's own unconditional embedding: the text encoders run on ``""`` unless the
pipeline sets ``force_zeros_for_empty_prompt`` (SDXL base does: it was trained with zeroed dropped
captions, and diffusers' SDXL pipeline uses zero negative embeddings by default), in which case the
hidden states and the pooled embedding of those rows are zeros. Either way policy and reference get the
identical unconditional branch (the text encoders are frozen), and our sampler reproduces what
``StableDiffusionXLPipeline.__call__`` does without a negative prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefdiff.models.kinds import config_get, is_sdxl


@dataclass(frozen=True)
class Conditioning:
    """Batched UNet conditioning: N rows.

    embeds:   [N, L, D] ``encoder_hidden_states`` (SDXL: both encoders' penultimate states, concatenated).
    pooled:   [N, P] SDXL ``text_embeds`` (the second encoder's projected pooled output), else None.
    time_ids: [N, 6] SDXL ``time_ids`` (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in
              pixels, kept fp32, else None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.pooled is None) != (self.time_ids is None):
            raise ValueError("Conditioning: pooled and time_ids come together (SDXL) or not at all (SD)")
        n = self.embeds.shape[0]
        for name in ("pooled", "time_ids"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Conditioning: {name} has {value.shape[0]} rows, embeds {n}")

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            fn(self.embeds),
            None if self.pooled is None else fn(self.pooled),
            None if self.time_ids is None else fn(self.time_ids),
        )

    def __getitem__(self, rows) -> Conditioning:
        """Rows ``rows`` (index tensor, list, slice; an int gives a 1-row conditioning) of every field."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        if isinstance(rows, torch.Tensor):
            rows = rows.to(self.embeds.device) if rows.dtype == torch.bool else rows.cpu().long()
        return self._map(lambda t: t[rows.to(t.device) if isinstance(rows, torch.Tensor) else rows])

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device``; ``dtype`` applies to embeds and pooled only (time ids stay fp32)."""
        return Conditioning(
            self.embeds.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
            None if self.time_ids is None else self.time_ids.to(device=device),
        )

    def cpu(self) -> Conditioning:
        return self.to("cpu")

    def expand(self, n: int) -> Conditioning:
        """A 1-row conditioning repeated to ``n`` rows (views, no copy)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"Conditioning.expand: only a 1-row conditioning expands; this one has {len(self)} rows")
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def expand_as(self, other: Conditioning) -> Conditioning:
        return self.expand(len(other))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        items = list(items)
        if not items:
            raise ValueError("Conditioning.cat: nothing to concatenate")
        if len({c.is_sdxl for c in items}) != 1:
            raise ValueError("Conditioning.cat: mixing SD (no pooled/time ids) and SDXL conditionings")
        device = items[0].device
        items = [c.to(device) for c in items]
        return Conditioning(
            torch.cat([c.embeds for c in items]),
            None if items[0].pooled is None else torch.cat([c.pooled for c in items]),
            None if items[0].time_ids is None else torch.cat([c.time_ids for c in items]),
        )

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for these rows, in the UNet's ``dtype``."""
        kwargs: dict = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.pooled is not None:
            # time ids stay fp32: the UNet's sinusoidal projection computes in fp32 anyway, and sizes such as
            # 1023 are not representable in bf16
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.float()}
        return kwargs


def image_size(pipe) -> tuple[int, int]:
    """The pipeline's native image size in pixels (h, w): UNet sample size x VAE scale factor."""
    size = getattr(pipe.unet, "module", pipe.unet).config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    factor = pipe.vae_scale_factor
    return int(h * factor), int(w * factor)


def default_time_ids(
    pipe,
    n: int,
    *,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SDXL add-time-ids [n, 6] fp32 (CPU): (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Sizes are (height, width) in pixels; both default to the pipeline's image size, as in diffusers'
    ``StableDiffusionXLPipeline.__call__``.
    """
    native = image_size(pipe)
    original_size = tuple(original_size or native)
    target_size = tuple(target_size or native)
    row = [*original_size, *tuple(crop_top_left), *target_size]
    if len(row) != 6:
        raise ValueError(f"time ids need (h, w) sizes and a (top, left) crop; got {row}")
    return torch.tensor([row], dtype=torch.float32).expand(n, 6).clone()


def _tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, time_ids: torch.Tensor | None = None) -> Conditioning:
    """Conditioning of ``prompts`` (N rows) on the text encoder's device, in its dtype.

    SD 1.5: CLIP last hidden states [N, 77, D] (padded to the tokenizer's max length); no pooled/time ids.
    SDXL (as ``StableDiffusionXLPipeline.encode_prompt``): each tokenizer/encoder pair's penultimate
    hidden states, concatenated along features [N, 77, D1 + D2]; pooled = the second encoder's
    ``text_embeds`` [N, P]; ``time_ids`` [6], [1, 6] or [N, 6] (default: ``default_time_ids``).
    The empty prompt: see the module docstring.
    """
    prompts = list(prompts)
    if not is_sdxl(pipe):
        if time_ids is not None:
            raise ValueError("time_ids are SDXL conditioning; this pipeline is not SDXL")
        device = pipe.text_encoder.device
        return Conditioning(pipe.text_encoder(_tokens(pipe.tokenizer, prompts).to(device))[0])

    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    pairs = [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]
    hidden, pooled = [], None
    for tokenizer, encoder in pairs:
        out = encoder(_tokens(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (diffusers' rule)
            pooled = out[0]
    if pooled is None:
        raise ValueError("SDXL pipeline without a CLIPTextModelWithProjection encoder: no pooled text embedding")
    embeds = torch.cat(hidden, dim=-1).to(pairs[-1][1].dtype)
    pooled = pooled.to(embeds.dtype)
    if config_get(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", False):
        empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
        if bool(empty.any()):
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    n = len(prompts)
    if time_ids is None:
        time_ids = default_time_ids(pipe, n)
    time_ids = torch.as_tensor(time_ids, dtype=torch.float32).reshape(-1, 6)
    if time_ids.shape[0] == 1:
        time_ids = time_ids.expand(n, 6)
    if time_ids.shape[0] != n:
        raise ValueError(f"time_ids has {time_ids.shape[0]} rows for {n} prompts")
    return Conditioning(embeds, pooled, time_ids.to(embeds.device).contiguous())


def _as_conditioning(cond) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)  # a bare [N, L, D] tensor (SD)


def _unet_dtype(unet) -> torch.dtype:
    return getattr(unet, "module", unet).dtype  # a DDP-wrapped UNet (multi-GPU accelerate) keeps it on .module


def guided_noise_pred(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: float,
) -> torch.Tensor:
    """eps_u + w * (eps_c - eps_u) in fp32 [B, C, H, W], from ONE batched UNet call on 2B inputs.

    Args:
        latents: x_t [B, C, H, W] (fp32; cast to the UNet's dtype here).
        timesteps: [B] integer timesteps.
        cond / uncond: prompt and unconditional ``Conditioning`` of B rows each (``uncond.expand_as(cond)``).
    """
    dtype = _unet_dtype(unet)
    cond, uncond = _as_conditioning(cond), _as_conditioning(uncond)
    x = torch.cat([latents, latents]).to(dtype)
    t = torch.cat([timesteps, timesteps])
    both = Conditioning.cat([uncond, cond]).to(latents.device)
    eps = unet(x, t, **both.unet_kwargs(dtype)).sample.float()
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def noise_pred(unet, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Unguided eps_theta(x_t, t, c) in fp32 [B, C, H, W] (one UNet call on B inputs); differentiable.

    What the ELBO trainers (Diffusion-DPO, SFT) score; ``timesteps`` [B] (or a scalar).
    """
    dtype = _unet_dtype(unet)
    cond = _as_conditioning(cond).to(latents.device)
    return unet(latents.to(dtype), timesteps, **cond.unet_kwargs(dtype)).sample.float()


__all__ = [
    "Conditioning", "default_time_ids", "encode_prompts", "guided_noise_pred", "image_size", "noise_pred",
]
