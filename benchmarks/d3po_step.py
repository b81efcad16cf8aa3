"""Time one D3PO optimizer step: prefdiff's trainer step vs a straightforward port of the official loop.

Both run in this process on the same model, data and LoRA, and the script prints the ratio.

- baseline ("official"): the yk7333/d3po training loop as written: a ``copy.deepcopy`` reference UNet,
  and per timestep one UNet call per image per guidance branch for the policy (4 per pair) and again
  for the reference (4 more), loss and backward per timestep (scripts/train.py L323-413).
- prefdiff: reference log-probs computed once per round (batched, adapters disabled, no copy of the
  UNet; its cost per step is reported separately, amortised over the epochs), and per timestep ONE
  UNet call for winners, losers and both guidance branches.

Usage: python -m benchmarks.d3po_step [--pairs 8] [--steps 20] [--repeats 3] [--source builtin:tiny-sd]
       [--device auto] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(args):
    from prefdiff.models.loading import load_pipeline
    from prefdiff.models.lora import add_lora
    from prefdiff.sampling.guidance import encode_prompts

    pipe = load_pipeline(args.source, dtype=args.dtype, device=args.device)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, rank=4, alpha=4)
    pipe.scheduler.set_timesteps(args.steps, device=pipe.unet.device)
    c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    n = 2 * args.pairs  # rows 0..pairs-1 winners, pairs..2*pairs-1 losers
    chain = torch.randn(n, args.steps + 1, c, h, h)
    embeds = encode_prompts(pipe, [f"animal {i % args.pairs}" for i in range(n)]).cpu()
    uncond = encode_prompts(pipe, [""])
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=1e-4)
    return pipe, params, chain, embeds, uncond, optimizer


def prefdiff_step(pipe, params, chain, embeds, uncond, optimizer, ref_logp, pairs, steps) -> None:
    from prefdiff.training.trajectory import step_log_probs
    from prefdiff.training.losses import d3po_loss

    timesteps = pipe.scheduler.timesteps.cpu().long()
    w, l = torch.arange(pairs), torch.arange(pairs, 2 * pairs)
    perms = torch.stack([torch.randperm(steps) for _ in range(pairs)])
    for j in range(steps):
        idx = perms[:, j]
        logp = step_log_probs(pipe.unet, pipe.scheduler, chain, timesteps, embeds, uncond, torch.cat([w, l]),
                              torch.cat([idx, idx]), guidance=5.0, eta=1.0)
        policy = torch.stack([logp[:pairs], logp[pairs:]], dim=1)
        ref = torch.stack([ref_logp[w, idx], ref_logp[l, idx]], dim=1).to(policy.device)
        (d3po_loss(policy, ref, torch.ones(pairs, device=policy.device)).loss / steps).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def official_step(pipe, ref_unet, params, chain, embeds, uncond, optimizer, pairs, steps) -> None:
    """One image and one guidance branch per UNet call, deep-copied reference, as the official loop."""
    from prefdiff.sampling.ddim import ddim_step_with_logprob
    from prefdiff.training.losses import d3po_loss

    device = pipe.unet.device
    sched, timesteps = pipe.scheduler, pipe.scheduler.timesteps
    dtype = pipe.unet.dtype
    perms = torch.stack([torch.randperm(steps) for _ in range(pairs)])

    def logp(unet, row, j):
        x = chain[row : row + 1, j].to(device)
        t = timesteps[j : j + 1]
        cond = embeds[row : row + 1].to(device)
        eps_u = unet(x.to(dtype), t, **uncond.to(device).unet_kwargs(dtype)).sample.float()
        eps_c = unet(x.to(dtype), t, **cond.unet_kwargs(dtype)).sample.float()
        eps = eps_u + 5.0 * (eps_c - eps_u)
        nxt = chain[row : row + 1, j + 1].to(device)
        return ddim_step_with_logprob(sched, eps, t, x, eta=1.0, prev_sample=nxt).log_prob

    for p in range(pairs):  # official train.batch_size = 1: one pair per forward
        for j in perms[p].tolist():
            pol = torch.cat([logp(pipe.unet, p, j), logp(pipe.unet, pairs + p, j)]).view(1, 2)
            ref = torch.cat([logp(ref_unet, p, j), logp(ref_unet, pairs + p, j)]).view(1, 2)
            (d3po_loss(pol, ref, torch.ones(1, device=device)).loss / (steps * pairs)).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="D3PO step: prefdiff vs official-style loop")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps T (all trained)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs the one-off reference pass is amortised over")
    parser.add_argument("--source", default="builtin:tiny-sd")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    from prefdiff.models.lora import adapters_disabled
    from prefdiff.sampling.sampler import SamplingConfig
    from prefdiff.training.trajectory import reference_log_probs

    pipe, params, chain, embeds, uncond, optimizer = _setup(args)
    device = pipe.unet.device
    timesteps = pipe.scheduler.timesteps.cpu().long()

    def ref_pass():
        with adapters_disabled(pipe.unet):
            return reference_log_probs(pipe, chain, timesteps, embeds, uncond, SamplingConfig(num_steps=args.steps),
                                       eta=1.0, batch_size=64)

    ref_logp = ref_pass()
    ref_seconds = _time(ref_pass, device, 1)
    ours = _time(lambda: prefdiff_step(pipe, params, chain, embeds, uncond, optimizer, ref_logp, args.pairs, args.steps),
                 device, args.repeats)
    ref_unet = copy.deepcopy(pipe.unet).requires_grad_(False)  # what the official code holds in memory
    ref_unet.disable_adapters()
    theirs = _time(lambda: official_step(pipe, ref_unet, params, chain, embeds, uncond, optimizer, args.pairs, args.steps),
                   device, args.repeats)
    unet_bytes = sum(p.numel() * p.element_size() for p in ref_unet.parameters())
    ours_amortised = ours + ref_seconds / args.epochs
    result = {
        "device": str(device), "source": args.source, "pairs_per_step": args.pairs, "timesteps": args.steps,
        "official_step_s": round(theirs, 4), "prefdiff_step_s": round(ours, 4),
        "prefdiff_reference_pass_s": round(ref_seconds, 4),
        "prefdiff_step_with_amortised_reference_s": round(ours_amortised, 4),
        "speedup": round(theirs / ours, 2), "speedup_with_amortised_reference": round(theirs / ours_amortised, 2),
        "extra_unet_copy_bytes_official": unet_bytes, "extra_unet_copy_bytes_prefdiff": 0,
    }
    print(json.dumps(result, indent=2))
    print(f"one D3PO step ({args.pairs} pairs x {args.steps} timesteps): official-style {theirs:.3f} s, "
          f"prefdiff {ours:.3f} s -> {theirs / ours:.2f}x faster "
          f"({theirs / ours_amortised:.2f}x counting the one-off reference pass over {args.epochs} epochs)")
    return result


if __name__ == "__main__":
    main()
