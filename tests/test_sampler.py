"""Group sampler: shared x_T, stored chain = what each step consumed, equality with diffusers' DDIM loop."""

import pytest
import torch

from prefdiff.models.loading import load_pipeline
from prefdiff.sampling.ddim import ddim_step_with_logprob
from prefdiff.sampling.guidance import encode_prompts, guided_noise_pred
from prefdiff.sampling.sampler import SamplingConfig, generate, sample_groups, seeded_noise

CFG = SamplingConfig(num_steps=6, eta=1.0, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("builtin:tiny-sd")


@pytest.fixture(scope="module")
def groups(pipe):
    return list(sample_groups(pipe, ["a cat", "a dog", "a fox"], [11, 12, 13], 3, CFG, batch_size=6))


def test_group_shares_initial_noise_and_differs_after(groups):
    assert len(groups) == 3
    g = groups[0]
    assert g.latents.shape == (3, CFG.num_steps + 1, 4, 8, 8) and g.log_probs.shape == (3, CFG.num_steps)
    assert g.latents.dtype == torch.float32 and g.log_probs.dtype == torch.float32
    x_T, _ = seeded_noise(11, 3, CFG.num_steps, (4, 8, 8))
    for k in range(3):
        assert torch.equal(g.latents[k, 0], x_T)
    assert not torch.equal(g.latents[0, -1], g.latents[1, -1])
    assert len(g.images) == 3 and g.images[0].size == (64, 64)


def test_stored_chain_and_log_probs_are_what_each_step_consumed(pipe, groups):
    g = groups[1]
    sched = pipe.scheduler
    sched.set_timesteps(CFG.num_steps)
    assert torch.equal(g.timesteps, sched.timesteps.long())
    cond = encode_prompts(pipe, ["a dog"] * 3)
    uncond = encode_prompts(pipe, [""]).expand_as(cond)
    _, z = seeded_noise(12, 3, CFG.num_steps, (4, 8, 8))
    with torch.no_grad():
        for j, t in enumerate(g.timesteps):
            tt = t.expand(3)
            eps = guided_noise_pred(pipe.unet, g.latents[:, j], tt, cond, uncond, CFG.guidance_scale)
            step = ddim_step_with_logprob(sched, eps, tt, g.latents[:, j], eta=CFG.eta, noise=z[:, j])
            # recomputed here in a batch of 3 (the sampler batched 6), so equal up to matmul rounding
            torch.testing.assert_close(step.prev_sample, g.latents[:, j + 1], rtol=0, atol=1e-5)
            rescored = ddim_step_with_logprob(sched, eps, tt, g.latents[:, j], eta=CFG.eta, prev_sample=g.latents[:, j + 1])
            torch.testing.assert_close(rescored.log_prob, g.log_probs[:, j], rtol=0, atol=1e-5)


def test_chain_equals_diffusers_ddim_loop(pipe, groups):
    """diffusers' own DDIMScheduler.step with our per-step noise reproduces the stored chain."""
    g = groups[2]
    sched = pipe.scheduler
    sched.set_timesteps(CFG.num_steps)
    cond = encode_prompts(pipe, ["a fox"] * 3)
    uncond = encode_prompts(pipe, [""]).expand_as(cond)
    _, z = seeded_noise(13, 3, CFG.num_steps, (4, 8, 8))
    x = g.latents[:, 0]
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps):
            eps = guided_noise_pred(pipe.unet, x, t.expand(3), cond, uncond, CFG.guidance_scale)
            x = sched.step(eps, t, x, eta=CFG.eta, variance_noise=z[:, j]).prev_sample
    torch.testing.assert_close(x, g.latents[:, -1], rtol=1e-5, atol=1e-5)


def test_generate_is_a_function_of_prompt_and_seed(pipe):
    a = generate(pipe, ["a cat", "a dog"], [5, 6], CFG)
    b = generate(pipe, ["a cat", "a dog"], [5, 6], CFG)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    c = generate(pipe, ["a cat", "a dog"], [5, 7], CFG)
    assert a[0].tobytes() == c[0].tobytes() and a[1].tobytes() != c[1].tobytes()


def test_mismatched_seeds_rejected(pipe):
    with pytest.raises(ValueError, match="seeds"):
        list(sample_groups(pipe, ["a", "b"], [1], 2, CFG))
