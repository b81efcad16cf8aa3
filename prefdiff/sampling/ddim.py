"""One DDIM step (eta > 0) that also returns the Gaussian log-density of the step: the D3PO "policy".

Written from DDIM (Song et al. 2021, Eq. 12 and 16) and checked against ``diffusers.DDIMScheduler.step``
and ``torch.distributions.Normal`` in tests/test_ddim.py. The same formulas are in DDPO-pytorch's
``ddim_with_logprob.py`` (kvablack/ddpo-pytorch@1958463), which D3PO copies; differences from it:

- the step takes per-sample timesteps ``t`` [B] (training visits a random timestep permutation per pair);
- ``prev_t < 0`` uses the scheduler's ``final_alpha_cumprod`` as diffusers does. DDPO clamps prev_t to 0
  instead, which gives the same number for the SD 1.5 config (set_alpha_to_one=False makes
  final_alpha_cumprod = alphas_cumprod[0]) but not for configs with set_alpha_to_one=True;
- all step math runs in fp32 whatever the UNet's dtype, and the returned ``prev_sample`` is fp32: the
  trajectory store keeps exactly the tensor the next step consumes.

Notation (DDIM paper -> code): alpha_t -> ``alpha_t`` (= alphas_cumprod[t]), sigma_t -> ``std``,
"predicted x_0" -> ``x0``, "direction pointing to x_t" -> ``direction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefdiff.sampling.guards import NumericsError

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMStep:
    prev_sample: torch.Tensor  # x_{t-1}, fp32 [B, C, H, W]
    log_prob: torch.Tensor  # log N(x_{t-1}; mean, std^2), mean over C,H,W, fp32 [B]
    mean: torch.Tensor  # mu_theta(x_t, t), fp32 [B, C, H, W]
    std: torch.Tensor  # sigma_t, fp32 [B, 1, 1, 1]


def _per_sample(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.to(index.device)[index].view(-1, 1, 1, 1)


def _alphas(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_prev) [B, 1, 1, 1] fp32 of integer timesteps ``t`` [B]."""
    # prev_t = t - T_train / T_infer (DDIM's step spacing, as diffusers).
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(t.device, torch.float32)
    alpha_t = _per_sample(alphas_cumprod, t)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=t.device)
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final).view(-1, 1, 1, 1)
    return alpha_t, alpha_prev


def check_log_probs_defined(scheduler) -> None:
    """Refuse a schedule (after ``set_timesteps``) with a step of sigma 0, whose log-prob is NaN (Eq. 16: the
    variance is 0 when alpha_prev = 1).

    That is the last step of a config with ``set_alpha_to_one: true`` (final_alpha_cumprod = 1), and
    ``DDIMScheduler.from_config`` defaults that key to true when a config lacks it; SD 1.5 ships false.
    """
    t = scheduler.timesteps.long()
    alpha_t, alpha_prev = _alphas(scheduler, t)
    variance = ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).flatten()
    bad = ~(variance > 0)  # 0 or NaN
    if not bad.any():
        return
    j = int(bad.nonzero()[0])
    where = f"DDIM step {j + 1}/{len(t)} (t={int(t[j])})"
    if float(alpha_prev.flatten()[j]) == 1.0 and float(scheduler.final_alpha_cumprod) == 1.0:
        raise NumericsError(
            f"the scheduler config has set_alpha_to_one: true (a config without the key is read as true): {where} "
            f"goes to alpha 1 with sigma 0, so its log-prob is NaN; set \"set_alpha_to_one\": false in the model's "
            f"scheduler/scheduler_config.json (as SD 1.5 ships it)")
    raise NumericsError(f"{where} of the scheduler has sigma 0, so its log-prob is undefined; check the scheduler "
                        f"config's betas and timestep_spacing")


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> DDIMStep:
    """x_{t-1} ~ N(mean, std^2) from x_t and the (guided) model output.

    Args:
        scheduler: a DDIMScheduler after ``set_timesteps`` (its ``alphas_cumprod`` and config are read).
        model_output: the noise (or v) prediction [B, C, H, W], any float dtype.
        timestep: int or [B] integer timesteps t.
        sample: x_t [B, C, H, W].
        eta: DDIM stochasticity (> 0; eta = 1 is DDPM-like).
        prev_sample: if given, the log-prob of this x_{t-1} is returned (training); else one is drawn.
        noise: z ~ N(0, I) [B, C, H, W] for drawing x_{t-1} = mean + std * z (ignored with prev_sample).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before a DDIM step")
    if eta <= 0:
        raise ValueError(f"eta = {eta}: the log-prob of a deterministic step (eta = 0) is undefined; use eta > 0")
    config = scheduler.config
    if getattr(config, "thresholding", False):
        raise NotImplementedError("dynamic thresholding is not supported by the log-prob sampler")
    x_t = sample.float()
    out = model_output.float()
    t = torch.as_tensor(timestep, device=x_t.device).long().expand(x_t.shape[0])

    alpha_t, alpha_prev = _alphas(scheduler, t)

    # 2. predicted x_0 and epsilon (Eq. 12, "predicted x_0").
    if config.prediction_type == "epsilon":
        eps = out
        x0 = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    elif config.prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * x_t - (1 - alpha_t).sqrt() * out
        eps = alpha_t.sqrt() * out + (1 - alpha_t).sqrt() * x_t
    else:
        raise NotImplementedError(f"prediction_type {config.prediction_type!r}; allowed: epsilon, v_prediction")
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    # 3. sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)   (Eq. 16)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()

    # 4. mean = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps   (Eq. 12)
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    mean = alpha_prev.sqrt() * x0 + direction

    if prev_sample is None:
        if noise is None:
            raise ValueError("pass either prev_sample (to score it) or noise (to draw x_{t-1})")
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.float()

    # 5. log N(x_{t-1}; mean, std^2), averaged (not summed) over C,H,W as the official code does: with a
    #    sum, D3PO's +-10% ratio band would be exceeded almost always and its gradient would vanish.
    #    Gradients flow through the mean only: the sample is a fixed action.
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    return DDIMStep(prev_sample=prev_sample, log_prob=log_prob.mean(dim=(1, 2, 3)), mean=mean, std=std)
