"""Preference losses and their baselines as pure tensor functions (no config objects, no models).

Everything computes in fp32 whatever the input dtype (inputs are promoted with ``.float()``).

Contents: ``d3po_loss`` (below), ``diffusion_dpo_loss`` + ``convert_beta`` + ``per_sample_mse``
(Diffusion-DPO), ``sft_loss`` and ``reward_weighted_loss`` (supervised baselines), ``ddpo_loss`` +
``per_prompt_advantages`` (the DDPO policy-gradient baseline).

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
from collections.abc import Hashable, Sequence
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


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO (Wallace et al., CVPR 2024)
# ----------------------------------------------------------------------------------------------------------

#: How each code base scales beta: z = -scale * beta * [(m_w - m_l) - (r_w - r_l)].
#: "official": SalesforceAIResearch/DiffusionDPO train.py L1142-1143 (and diffusers' SDXL script), the
#: paper's Eq. 14 with T * omega(lambda_t) folded into beta and the 1/2 kept, default beta 5000.
#: "diffusers": diffusers' SD1.5 train_diffusion_dpo.py (no 1/2), default beta 2500 (PR #6788).
BETA_CONVENTIONS = {"official": 0.5, "diffusers": 1.0}


def _beta_scale(convention: str) -> float:
    if convention not in BETA_CONVENTIONS:
        raise ValueError(f"unknown beta convention {convention!r}; allowed: {', '.join(sorted(BETA_CONVENTIONS))}")
    return BETA_CONVENTIONS[convention]


def convert_beta(beta: float, from_convention: str, to_convention: str) -> float:
    """The beta that gives the same Diffusion-DPO loss under ``to_convention``: official beta = 2 x diffusers beta."""
    return beta * _beta_scale(from_convention) / _beta_scale(to_convention)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """((pred - target)^2) averaged over every non-batch dimension, in fp32: [N, ...] -> [N].

    The mean (not the sum) over C, H, W is what both reference implementations use and what beta is
    calibrated to. A 1-D input [N] gives the per-element squared error.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    err = (pred.float() - target.float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


@dataclass
class DiffusionDPOLossOutput:
    loss: torch.Tensor  # scalar: mean over pairs of -log sigmoid(z)
    implicit_acc: torch.Tensor  # mean of 1[z > 0] + 0.5 * 1[z == 0] (ties count half, as diffusers)
    implicit_acc_strict: torch.Tensor  # mean of 1[z > 0] (the official count: a tie is wrong)
    margin: torch.Tensor  # mean z (detached)
    model_mse: torch.Tensor  # mean of m_w and m_l (detached), the official "raw_model_loss"
    ref_mse: torch.Tensor  # mean of r_w and r_l (detached)


def diffusion_dpo_loss(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    *,
    beta: float,
    convention: str = "official",
) -> DiffusionDPOLossOutput:
    """Diffusion-DPO loss (paper Eq. 14) from per-pair denoising errors.

    With m = ||eps - eps_theta(x_t, t)||^2 / (C H W) of the policy and r the same for the frozen reference,
    evaluated on the SAME (t, eps) for the preferred (w) and dispreferred (l) image of a pair:

        z    = -scale * beta * [(m_w - m_l) - (r_w - r_l)]      scale = 1/2 ("official") or 1 ("diffusers")
        loss = mean_pairs( -log sigmoid(z) )

    The batch mean is taken AFTER the per-pair log-sigmoid (diffusers issue #6702 was the other order), and
    ``F.logsigmoid`` keeps large |z| finite (beta / 2 = 2500 times MSE differences can reach |z| ~ 100).
    Gradients: dL/dm_w = scale * beta * sigmoid(-z) / B and dL/dm_l = -dL/dm_w; the reference terms are
    detached.

    Args:
        model_mse_w, model_mse_l: policy MSE of winners / losers [B] (differentiable; see ``per_sample_mse``).
        ref_mse_w, ref_mse_l: reference MSE [B] (no gradient needed).
        beta: KL strength in the chosen convention (official 5000 == diffusers 2500).
        convention: "official" or "diffusers" (see ``BETA_CONVENTIONS``).
    """
    scale = _beta_scale(convention)
    shapes = {tuple(t.shape) for t in (model_mse_w, model_mse_l, ref_mse_w, ref_mse_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four MSE inputs must all be [B]; got shapes {sorted(shapes)}")
    m_w, m_l = model_mse_w.float(), model_mse_l.float()
    r_w, r_l = ref_mse_w.float().detach(), ref_mse_l.float().detach()
    z = -scale * beta * ((m_w - m_l) - (r_w - r_l))  # [B]
    loss = -F.logsigmoid(z).mean()
    with torch.no_grad():
        acc = ((z > 0).float() + 0.5 * (z == 0).float()).mean()
        strict = (z > 0).float().mean()
        return DiffusionDPOLossOutput(
            loss=loss, implicit_acc=acc, implicit_acc_strict=strict, margin=z.mean(),
            model_mse=0.5 * (m_w.mean() + m_l.mean()), ref_mse=0.5 * (r_w.mean() + r_l.mean()),
        )


# ----------------------------------------------------------------------------------------------------------
# Supervised baselines
# ----------------------------------------------------------------------------------------------------------


def sft_loss(model_mse_w: torch.Tensor) -> torch.Tensor:
    """The "preferred images" baseline (official Diffusion-DPO ``--sft``): plain denoising MSE of winners.

    model_mse_w: per-sample MSE of the preferred images [B] -> scalar mean. Because every sample has the
    same number of elements, this equals the official ``F.mse_loss(pred, target, reduction="mean")``.
    """
    if model_mse_w.dim() != 1:
        raise ValueError(f"model_mse_w must be [B]; got {tuple(model_mse_w.shape)}")
    return model_mse_w.float().mean()


@dataclass
class RewardWeightedOutput:
    loss: torch.Tensor  # scalar: mean_i w_i * mse_i
    weights: torch.Tensor  # w_i [N], detached


def reward_weighted_loss(
    model_mse: torch.Tensor,
    rewards: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: str = "softmax",
    rows: torch.Tensor | None = None,
) -> RewardWeightedOutput:
    """The "Reward Weighted" baseline (Lee et al. 2023, [34] in the D3PO paper): reward-weighted denoising.

        loss = (1/N) sum_i w_i * mse_i

    Args:
        model_mse: per-image denoising MSE [N] (differentiable).
        rewards: judge score of each image [N]; higher is better. Only used through the (detached) weights.
        temperature: softmax temperature (``normalize="softmax"`` only).
        normalize: "softmax": w = N * softmax(r / temperature) over the batch (non-negative, mean 1, so the
            loss keeps the scale of plain MSE and only the rewards' differences matter); "none": w = r,
            which must be >= 0 (a negative weight would push the model AWAY from fitting that image, i.e.
            maximise its denoising error without bound).
        rows: the positions of ``model_mse``'s images among the N rewards (one process's share of a batch: the
            weights are normalised over all N, the loss is the mean over these rows; ``weights`` theirs). None:
            all N.
    """
    if rows is not None:
        full = reward_weighted_loss(torch.zeros_like(rewards, dtype=torch.float32), rewards, temperature=temperature,
                                    normalize=normalize)
        weights = full.weights[rows.to(full.weights.device)]
        if model_mse.shape != weights.shape:
            raise ValueError(f"model_mse {tuple(model_mse.shape)} must be [len(rows)] = [{len(rows)}]")
        return RewardWeightedOutput(loss=(weights * model_mse.float()).mean(), weights=weights)
    if model_mse.dim() != 1 or rewards.shape != model_mse.shape:
        raise ValueError(f"model_mse {tuple(model_mse.shape)} and rewards {tuple(rewards.shape)} must both be [N]")
    r = rewards.detach().float()
    if normalize == "softmax":
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature}; must be > 0")
        weights = r.numel() * torch.softmax(r / temperature, dim=0)
    elif normalize == "none":
        if (r < 0).any():
            raise ValueError(
                f"normalize='none' uses raw rewards as weights, which must be >= 0 (min {r.min().item():g}); "
                "a negative weight maximises that image's denoising error. Use normalize='softmax' or shift the rewards."
            )
        weights = r
    else:
        raise ValueError(f"unknown normalize {normalize!r}; allowed: none, softmax")
    return RewardWeightedOutput(loss=(weights * model_mse.float()).mean(), weights=weights)


# ----------------------------------------------------------------------------------------------------------
# DDPO (Black et al. 2023): PPO on the denoising MDP
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DDPOLossOutput:
    loss: torch.Tensor  # scalar clipped surrogate
    clip_frac: torch.Tensor  # fraction of ratios with |ratio - 1| > clip_range
    approx_kl: torch.Tensor  # 0.5 * mean((logp - old_logp)^2)


def ddpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
) -> DDPOLossOutput:
    """PPO clipped surrogate as in DDPO (kvablack/ddpo-pytorch@1958463 scripts/train.py L538-551).

        A     = clamp(advantages, -adv_clip_max, adv_clip_max)
        ratio = exp(logp - old_logp)
        loss  = mean( max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)) )

    Args:
        logp: log pi_theta(x_{t-1} | x_t) of the stored next latents [N] (differentiable; mean over C,H,W as
            ``ddim_step_with_logprob``, which is why the default clip_range is as small as 1e-4).
        old_logp: the sampling-time log-probs [N] (no gradient).
        advantages: per-sample advantages [N] (e.g. ``per_prompt_advantages``), shared by all steps of a
            trajectory.
    """
    if not (logp.shape == old_logp.shape == advantages.shape) or logp.dim() != 1:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
            f"{tuple(advantages.shape)} must all be [N]"
        )
    adv = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = logp.float() - old_logp.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return DDPOLossOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl)


def per_prompt_advantages(
    rewards: torch.Tensor,
    prompt_ids: Sequence[Hashable],
    *,
    eps: float = 1e-6,
    min_count: int = 2,
) -> torch.Tensor:
    """Rewards normalised per prompt: A_i = (r_i - mean_p) / (std_p + eps), [N] -> [N] fp32.

    As DDPO's ``PerPromptStatTracker`` (stat_tracking.py) but stateless (no per-prompt history buffer:
    the statistics are those of this batch only):
    - std is the population std (numpy ``np.std``, torch ``unbiased=False``);
    - a prompt with fewer than ``min_count`` samples uses the statistics of the WHOLE batch instead
      (DDPO falls back to batch statistics below its ``min_count``). With ``min_count=1`` a prompt with a
      single sample gets (r - r) / (0 + eps) = 0;
    - a prompt whose samples all have the same reward gets 0 (not a division by zero) thanks to eps.
    """
    r = rewards.detach().float().view(-1)
    if len(prompt_ids) != r.numel():
        raise ValueError(f"{len(prompt_ids)} prompt ids for {r.numel()} rewards")
    if min_count < 1:
        raise ValueError(f"min_count = {min_count}; must be >= 1")
    out = torch.empty_like(r)
    global_mean, global_std = r.mean(), r.std(unbiased=False)
    groups: dict[Hashable, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(i)
    for rows in groups.values():
        idx = torch.tensor(rows)
        group = r[idx]
        if len(rows) >= min_count:
            mean, std = group.mean(), group.std(unbiased=False)
        else:
            mean, std = global_mean, global_std
        out[idx] = (group - mean) / (std + eps)
    return out
