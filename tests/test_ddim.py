"""The DDIM step with log-prob against diffusers.DDIMScheduler.step and torch.distributions.Normal."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from prefdiff.models.tiny import SD15_SCHEDULER_CONFIG
from prefdiff.sampling.ddim import ddim_step_with_logprob


def _scheduler(steps=20, **overrides):
    sched = DDIMScheduler(**{**SD15_SCHEDULER_CONFIG, **overrides})
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("eta", [1.0, 0.3])
@pytest.mark.parametrize("overrides", [{}, {"set_alpha_to_one": True}, {"prediction_type": "v_prediction"}])
def test_step_equals_diffusers_at_every_timestep(eta, overrides):
    sched = _scheduler(**overrides)
    gen = torch.Generator().manual_seed(0)
    for t in sched.timesteps:  # includes the last step, where prev_t < 0 uses final_alpha_cumprod
        x = torch.randn(3, 4, 8, 8, generator=gen)
        eps = torch.randn(3, 4, 8, 8, generator=gen)
        z = torch.randn(3, 4, 8, 8, generator=gen)
        ours = ddim_step_with_logprob(sched, eps, t, x, eta=eta, noise=z)
        theirs = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)


def test_sd15_timesteps_are_the_papers():
    assert _scheduler().timesteps.tolist() == list(range(951, 0, -50))


def test_log_prob_equals_normal_mean_over_dims():
    sched = _scheduler()
    gen = torch.Generator().manual_seed(1)
    x, eps, prev = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([951, 451])  # per-sample timesteps
    out = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, prev_sample=prev)
    expected = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # per-sample timesteps give the same as one call per sample
    for i in range(2):
        single = ddim_step_with_logprob(sched, eps[i : i + 1], int(t[i]), x[i : i + 1], eta=1.0, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(single.log_prob, out.log_prob[i : i + 1])


def test_sigma_range_of_the_sd15_schedule():
    """sigma ~0.644 at t=951 and ~0.021 at t=1 for the SD 1.5 schedule with eta=1 (DDIM Eq. 16)."""
    sched = _scheduler()
    x = torch.zeros(1, 4, 2, 2)
    first = ddim_step_with_logprob(sched, x, 951, x, eta=1.0, noise=x).std.item()
    last = ddim_step_with_logprob(sched, x, 1, x, eta=1.0, noise=x).std.item()
    assert first == pytest.approx(0.644, abs=2e-3)
    assert last == pytest.approx(0.021, abs=2e-3)


def test_log_prob_gradient_flows_through_mean_only():
    sched = _scheduler()
    eps = torch.randn(1, 4, 4, 4, requires_grad=True)
    x = torch.randn(1, 4, 4, 4)
    prev = torch.randn(1, 4, 4, 4, requires_grad=True)
    out = ddim_step_with_logprob(sched, eps, 501, x, eta=1.0, prev_sample=prev)
    out.log_prob.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert prev.grad is None  # the action is detached


def test_sampled_log_prob_is_density_of_the_draw():
    sched = _scheduler()
    x, eps, z = torch.randn(3, 1, 4, 4, 4).unbind(0)
    out = ddim_step_with_logprob(sched, eps, 501, x, eta=1.0, noise=z)
    # log N(mean + std z; mean, std) = -z^2/2 - log std - log sqrt(2 pi), averaged over dims
    expected = (-(z**2) / 2 - out.std.log() - 0.5 * math.log(2 * math.pi)).mean()
    torch.testing.assert_close(out.log_prob, expected.view(1), rtol=1e-5, atol=1e-6)


def test_misuse_raises():
    sched = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(sched, x, 1, x, eta=1.0, noise=x)
    sched.set_timesteps(20)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(sched, x, 1, x, eta=0.0, noise=x)
    with pytest.raises(ValueError, match="prev_sample"):
        ddim_step_with_logprob(sched, x, 1, x, eta=1.0)
