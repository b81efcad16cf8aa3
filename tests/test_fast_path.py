"""The fast path computes what the straightforward one does: on-device metrics, SDPA attention, bf16 autocast with
fp32 log-prob math (against plain fp32 eager on builtin:tiny-sd)."""

import pytest
import torch
from accelerate.state import AcceleratorState

from prefdiff.config import parse_params
from prefdiff.sampling.guidance import encode_prompts
from prefdiff.training.trainable import TrainableUNet
from prefdiff.training.trajectory import step_log_probs

T = 4


def loss_and_grads(**train) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(log-probs [4], loss, LoRA up-weight gradients) of a D3PO-style step: -mean log pi(x_{j+1} | x_j) of 4 random
    chains at steps 0..3, after one AdamW step so that the LoRA up weights (zero at init) are not zero."""
    params = parse_params({"sampling": {"num_steps": T}, "train": {"lr": 0.01, **train}})
    # accelerate keeps one mixed-precision setting per process; these runs switch it, as separate processes would
    AcceleratorState._reset_state(reset_partial_state=False)
    model = TrainableUNet(params, need_reference_copy=False, progress=lambda _: None)
    pipe = model.pipe
    pipe.scheduler.set_timesteps(T)
    gen = torch.Generator().manual_seed(0)
    c, h, w = pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size
    chain = torch.randn(4, T + 1, c, h, w, generator=gen)
    embeds = encode_prompts(pipe, ["a cat", "a dog", "a cat", "a dog"])
    uncond = encode_prompts(pipe, [""])
    rows, steps = torch.arange(4), torch.arange(4)

    def loss_now():
        logp = step_log_probs(model.unet, pipe.scheduler, chain, pipe.scheduler.timesteps.cpu(), embeds, uncond, rows,
                              steps, guidance=5.0, eta=1.0)
        return logp, -logp.mean()

    model.accelerator.backward(loss_now()[1])
    model.optimizer_step(take=True)
    logp, loss = loss_now()
    model.accelerator.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in model.raw_unet.named_parameters() if "lora_B" in n}
    return logp.detach(), loss.detach(), grads


@pytest.fixture(autouse=True, scope="module")
def no_mixed_precision_left_behind():
    """accelerate keeps one mixed-precision setting per process: the bf16 run's must not reach later tests, whose
    Accelerator(mixed_precision="no") would be refused."""
    yield
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.fixture(scope="module")
def eager():
    return loss_and_grads()


def test_attention_is_sdpa_with_lora():
    """diffusers' default AttnProcessor2_0 (torch scaled_dot_product_attention) serves every attention layer with
    the adapter attached, so no slower processor was swapped in."""
    params = parse_params({"sampling": {"num_steps": T}})
    model = TrainableUNet(params, need_reference_copy=False, progress=lambda _: None)
    kinds = {type(p).__name__ for p in model.raw_unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0"}


def test_bf16_autocast_keeps_log_prob_math_in_fp32(eager):
    """bf16 autocast runs the UNet in bf16, its output comes back fp32 and the Gaussian log-prob is fp32.

    Tolerance: bf16 keeps 8 mantissa bits (relative 4e-3 per op), so the loss agrees to 5e-2 relative and the
    gradient direction to cosine > 0.99 (measured on this model: see the assertion messages)."""
    logp, loss, grads = loss_and_grads(mixed_precision="bf16")
    ref_logp, ref_loss, ref_grads = eager
    assert logp.dtype == torch.float32 and loss.dtype == torch.float32
    assert loss == pytest.approx(float(ref_loss), rel=5e-2)
    flat, ref = torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in ref_grads.values()])
    cosine = float(torch.nn.functional.cosine_similarity(flat, ref, dim=0))
    assert cosine > 0.99, cosine
