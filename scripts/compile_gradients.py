"""Does torch.compile of the LoRA UNet give the eager loss and gradients? (why there is no ``train.compile``)

On builtin:tiny-sd, a D3PO-style loss (-mean log pi(x_{j+1} | x_j) of 4 random chains at steps 0..3, guidance 5)
through the trainable LoRA UNet, eager and compiled with ``--backend`` on the same weights (LoRA up weights drawn
at random so every LoRA gradient is non-zero): the loss and log-probs, the LoRA gradients of one backward per
UNet part (down / mid / up blocks) before any optimizer step, then the log-probs after one AdamW step with the
default eps 1e-8 (update ~ lr x sign(g): amplifies gradient rounding) and with eps 1 (update ~ lr x g: does not).

    OMP_NUM_THREADS=1 python scripts/compile_gradients.py [--backend inductor|aot_eager]

Prints relative differences compiled vs eager (0 = bit for bit). The first inductor compile takes minutes on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate.state import AcceleratorState

from prefdiff.config import parse_params
from prefdiff.sampling.guidance import encode_prompts
from prefdiff.training.trainable import TrainableUNet
from prefdiff.training.trajectory import step_log_probs

T = 4
PARTS = ("down_blocks", "mid_block", "up_blocks")


def run(backend: str | None, eps: float) -> dict:
    """(log-probs, loss, LoRA gradients) before and log-probs after one AdamW step, eager when backend is None."""
    params = parse_params({"sampling": {"num_steps": T}, "train": {"lr": 0.01, "adam_eps": eps}})
    AcceleratorState._reset_state(reset_partial_state=False)
    torch._dynamo.reset()
    model = TrainableUNet(params, need_reference_copy=False, progress=lambda _: None)
    pipe = model.pipe
    pipe.scheduler.set_timesteps(T)
    unet = model.unet if backend is None else torch.compile(model.unet, backend=backend)
    gen = torch.Generator().manual_seed(0)
    c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    chain = torch.randn(4, T + 1, c, h, h, generator=gen)
    embeds, uncond = encode_prompts(pipe, ["a cat", "a dog", "a cat", "a dog"]), encode_prompts(pipe, [""])
    with torch.no_grad():  # B = 0 at init would leave every A gradient 0: draw B, the same in every run
        for name, p in model.raw_unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    def log_probs() -> torch.Tensor:
        return step_log_probs(unet, pipe.scheduler, chain, pipe.scheduler.timesteps.cpu(), embeds, uncond,
                              torch.arange(4), torch.arange(4), guidance=5.0, eta=1.0)

    began = time.time()
    logp = log_probs()
    loss = -logp.mean()
    model.accelerator.backward(loss)
    seconds = time.time() - began
    grads = {n: p.grad.detach().clone() for n, p in model.raw_unet.named_parameters() if "lora_" in n}
    model.optimizer_step(take=True)
    with torch.no_grad():
        after = log_probs()
    return {"logp": logp.detach(), "loss": loss.detach(), "grads": grads, "after": after, "seconds": seconds}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    backend = parser.parse_args().backend
    for eps in (1e-8, 1.0):
        eager, compiled = run(None, eps), run(backend, eps)
        if eps == 1e-8:
            print(f"{backend}: first forward + backward {compiled['seconds']:.1f} s (eager {eager['seconds']:.2f} s)")
            print(f"  before any step: loss {rel(compiled['loss'], eager['loss']):.2e}, log-probs "
                  f"{float(((compiled['logp'] - eager['logp']) / eager['logp']).abs().max()):.2e} (max relative)")
            for part in PARTS:
                names = [n for n in eager["grads"] if n.startswith(part)]
                worst = max(rel(compiled["grads"][n], eager["grads"][n]) for n in names)
                total = rel(torch.cat([compiled["grads"][n].flatten() for n in names]),
                            torch.cat([eager["grads"][n].flatten() for n in names]))
                print(f"  LoRA gradients of {part} ({len(names)} tensors): {total:.2e} relative (worst tensor {worst:.2e})")
        print(f"  after one AdamW step, eps {eps:g}: log-probs "
              f"{float(((compiled['after'] - eager['after']) / eager['after']).abs().max()):.2e} (max relative)")


if __name__ == "__main__":
    main()
