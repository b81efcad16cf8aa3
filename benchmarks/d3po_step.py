"""Time one D3PO optimizer step: prefdiff's trainer step vs a straightforward port of the official loop.

Both sides run on the same architecture, data and LoRA, each in a fresh process (``benchmarks.common``: peak
memory per side), and the script prints the time and memory ratios.

- baseline ("official"): the yk7333/d3po training loop as written: a ``copy.deepcopy`` reference UNet,
  and per timestep one UNet call per image per guidance branch for the policy (4 per pair) and again
  for the reference (4 more), loss and backward per timestep (scripts/train.py L323-413).
- prefdiff: reference log-probs computed once per round (batched, adapters disabled, no copy of the
  UNet; its cost per step is reported separately, amortised over the epochs), and per timestep ONE
  UNet call for winners, losers and both guidance branches.

Memory: the official side's peak holds the deep-copied reference UNet; prefdiff's holds the one-off reference
pass and the step. MFU counts the step's UNet samples (prefdiff: steps x 4 x pairs, back-propagated; official:
the same back-propagated plus as many no-grad reference samples).

Usage: python -m benchmarks.d3po_step [--pairs 8] [--steps 20] [--repeats 3] [--arch tiny|sd15|sdxl]
       [--device auto] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks import common

MODULE = "benchmarks.d3po_step"


def _setup(args, device):
    from prefdiff.models.lora import add_lora
    from prefdiff.sampling.guidance import encode_prompts

    pipe = common.build_pipeline(args, device)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, rank=4, alpha=4)
    pipe.scheduler.set_timesteps(args.steps, device=pipe.unet.device)
    from prefdiff.sampling.sampler import latent_shape

    n = 2 * args.pairs  # rows 0..pairs-1 winners, pairs..2*pairs-1 losers
    chain = torch.randn(n, args.steps + 1, *latent_shape(pipe))
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


def run_side(args) -> dict:
    from prefdiff.models.lora import adapters_disabled
    from prefdiff.sampling.sampler import SamplingConfig
    from prefdiff.training.trajectory import reference_log_probs

    device = common.device_of(args)
    pipe, params, chain, embeds, uncond, optimizer = _setup(args, device)
    timesteps = pipe.scheduler.timesteps.cpu().long()
    per_step = args.steps * 4 * args.pairs  # UNet samples per optimizer step: 2 images x 2 guidance branches
    if args.side == "prefdiff":
        def ref_pass():
            with adapters_disabled(pipe.unet):
                return reference_log_probs(pipe, chain, timesteps, embeds, uncond,
                                           SamplingConfig(num_steps=args.steps), eta=1.0, batch_size=64)

        mem_kind = common.reset_peak_memory(device)
        ref_logp = ref_pass()
        ref_walls, ref_cpus = common.time_repeats(ref_pass, device, 1)

        def step():
            with common.autocast(args, device):
                prefdiff_step(pipe, params, chain, embeds, uncond, optimizer, ref_logp, args.pairs, args.steps)

        timed = common.time_repeats(step, device, args.repeats)
        return common.side_result(args, device, pipe, timed, mem_kind, fwd_samples_grad=per_step,
                                  fwd_samples_nograd=0, reference_pass_s=round(ref_walls[0], 5),
                                  reference_pass_cpu_s=round(ref_cpus[0], 5),
                                  extra_unet_copy_bytes=0)
    ref_unet = copy.deepcopy(pipe.unet).requires_grad_(False)  # what the official code holds in memory
    ref_unet.disable_adapters()
    unet_bytes = sum(p.numel() * p.element_size() for p in ref_unet.parameters())
    mem_kind = common.reset_peak_memory(device)

    def step():
        with common.autocast(args, device):
            official_step(pipe, ref_unet, params, chain, embeds, uncond, optimizer, args.pairs, args.steps)

    timed = common.time_repeats(step, device, args.repeats)
    return common.side_result(args, device, pipe, timed, mem_kind, fwd_samples_grad=per_step,
                              fwd_samples_nograd=per_step, extra_unet_copy_bytes=unet_bytes)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description="D3PO step: prefdiff vs official-style loop")
    common.add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps T (all trained)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs the one-off reference pass is amortised over")
    args = parser.parse_args(argv)
    compared = common.run_or_compare(MODULE, args, argv, run_side,
                                     {"pairs_per_step": args.pairs, "timesteps": args.steps})
    if compared is None:
        return None
    results, config = compared
    summary = common.report(f"one D3PO optimizer step ({args.pairs} pairs x {args.steps} timesteps)", config,
                            results, names={"reference": "official-style"})
    ours, theirs = results.get("prefdiff", {}), results.get("reference", {})
    if "median_s" in ours and "median_s" in theirs:
        amortised = ours["median_s"] + ours["reference_pass_s"] / args.epochs
        amortised_cpu = ours["median_cpu_s"] + ours["reference_pass_cpu_s"] / args.epochs
        summary["speedup_with_amortised_reference"] = round(theirs["median_s"] / amortised, 3)
        summary["cpu_speedup_with_amortised_reference"] = round(theirs["median_cpu_s"] / amortised_cpu, 3)
        print(f"   with prefdiff's one-off reference pass ({ours['reference_pass_s']:.3f} s, CPU "
              f"{ours['reference_pass_cpu_s']:.3f} s) amortised over {args.epochs} epochs: "
              f"{summary['speedup_with_amortised_reference']:.2f}x (CPU seconds "
              f"{summary['cpu_speedup_with_amortised_reference']:.2f}x); the official loop holds an "
              f"extra UNet copy of {theirs['extra_unet_copy_bytes'] / 2**20:.1f} MiB, prefdiff none")
    return summary


if __name__ == "__main__":
    main()
