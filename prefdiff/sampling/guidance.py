"""Prompt encoding and the classifier-free-guided noise prediction, shared by sampler and trainers.

Policy and reference must see exactly the same guidance (D3PO's official code applies CFG to both), so
there is one function for it.
"""

from __future__ import annotations

import torch


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings [N, L, D] (padded to the tokenizer's max length, as SD 1.5 does)."""
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = pipe.text_encoder.device
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids.to(device))[0]


def guided_noise_pred(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """eps_u + w * (eps_c - eps_u) in fp32 [B, C, H, W], from ONE batched UNet call on 2B inputs.

    Args:
        latents: x_t [B, C, H, W] (fp32; cast to the UNet's dtype here).
        timesteps: [B] integer timesteps.
        cond / uncond: prompt and empty-prompt embeddings [B, L, D].
    """
    dtype = getattr(unet, "module", unet).dtype  # a DDP-wrapped UNet (multi-GPU accelerate) keeps it on .module
    x = torch.cat([latents, latents]).to(dtype)
    t = torch.cat([timesteps, timesteps])
    emb = torch.cat([uncond, cond]).to(dtype)
    eps = unet(x, t, encoder_hidden_states=emb).sample.float()
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
