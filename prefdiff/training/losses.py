"""Preference losses as pure tensor functions (no config objects, no models).

D3PO (Yang et al., CVPR 2024, Eq. 14): for one denoising step i of two trajectories that share the prompt
and x_T,

    L_i = -log sigmoid( beta * log[pi_theta(a_i^w|s_i^w) / pi_ref(a_i^w|s_i^w)]
                      - beta * log[pi_theta(a_i^l|s_i^l) / pi_ref(a_i^l|s_i^l)] )

with the official implementation's details (yk7333/d3po@40d3175, scripts/train.py L377-413):
- each ratio pi_theta / pi_ref is clamped to [1 - eps, 1 + eps] (eps = 0.1) before the log. Clamping the
  log-ratio to [log(1-eps), log(1+eps)] gives the same values and the same zero gradient outside the band;
- labels h in {+1, -1, 0} per image: the argument is beta * (h_0 log r_0 + h_1 log r_1), so h = [1, -1]
  means image 0 won, and a tie h = [0, 0] gives the constant log 2 with zero gradient (the label stage
  drops ties, as the official train.py does; the function still handles them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class D3POLossOutput:
    loss: torch.Tensor  # scalar, mean over the batch
    implicit_acc: torch.Tensor  # fraction of decided pairs whose preferred image has the larger log-ratio
    clip_frac: torch.Tensor  # fraction of (image, step) log-ratios outside the clip band
    mean_log_ratio: torch.Tensor  # mean unclipped log pi_theta/pi_ref over all images


def d3po_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    preference: torch.Tensor,
    *,
    beta: float = 0.1,
    clip_eps: float = 0.1,
) -> D3POLossOutput:
    """D3PO loss for a batch of pairs at one timestep each.

    Args:
        policy_logp: log pi_theta(a|s) of images 0 and 1 of each pair [B, 2] (differentiable).
        ref_logp: log pi_ref(a|s) [B, 2] (no gradient needed).
        preference: h for image 0 [B]: +1 image 0 preferred, -1 image 1 preferred, 0 tie.
            Image 1 gets -h (the official h = [h, -h]).
        beta: DPO temperature (paper: 0.1).
        clip_eps: the ratio band [1 - eps, 1 + eps] (paper code: 0.1).
    """
    if policy_logp.shape != ref_logp.shape or policy_logp.dim() != 2 or policy_logp.shape[1] != 2:
        raise ValueError(f"policy_logp {tuple(policy_logp.shape)} and ref_logp {tuple(ref_logp.shape)} must both be [B, 2]")
    log_ratio = policy_logp.float() - ref_logp.float().detach()  # [B, 2]
    low, high = math.log(1 - clip_eps), math.log(1 + clip_eps)
    clipped = log_ratio.clamp(low, high)
    h = preference.to(log_ratio).view(-1)
    # beta * (h * l_0 + (-h) * l_1) = beta * h * (l_0 - l_1)
    logits = beta * h * (clipped[:, 0] - clipped[:, 1])
    loss = -F.logsigmoid(logits).mean()

    with torch.no_grad():
        decided = h != 0
        margin = h * (log_ratio[:, 0] - log_ratio[:, 1])
        implicit_acc = (margin[decided] > 0).float().mean() if decided.any() else torch.tensor(float("nan"))
        clip_frac = ((log_ratio < low) | (log_ratio > high)).float().mean()
    return D3POLossOutput(loss=loss, implicit_acc=implicit_acc, clip_frac=clip_frac, mean_log_ratio=log_ratio.mean().detach())
