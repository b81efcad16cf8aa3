"""Time sampling WITH log-probs (prefdiff's group sampler) against stock diffusers generation, same settings.

- prefdiff: ``prefdiff.sampling.sampler.sample_groups``, what the sample stage runs: groups of G images from one
  shared x_T, DDIM with eta > 0, every step's latent copied to the CPU (the stored chain) and its Gaussian
  log-prob computed, the final latents decoded to PIL images.
- reference: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.__call__`` with the same DDIM scheduler,
  steps, eta, guidance scale and batch (``num_images_per_prompt`` images of each prompt), ``output_type="pil"``:
  the stock generation loop, which keeps neither the chain nor log-probs.

Both encode the prompts, run ``steps`` UNet calls of 2 x batch inputs (classifier-free guidance) and decode with
the VAE; one iteration = one batch of images. Each side runs in a fresh process (``benchmarks.common``).

    python -m benchmarks.sampling [--arch tiny|sd15|sdxl] [--batch 8] [--images-per-group 2] [--steps 20]
        [--eta 1.0] [--guidance 5.0] [--dtype fp32|bf16] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common

MODULE = "benchmarks.sampling"


def _prompts(args) -> list[str]:
    """One prompt per group, G images each."""
    return [f"a photo of animal {i}" for i in range(args.batch // args.images_per_group)]


def run_side(args) -> dict:
    from prefdiff.sampling.sampler import SamplingConfig, sample_groups

    device = common.device_of(args)
    pipe = common.build_pipeline(args, device)
    prompts, g = _prompts(args), args.images_per_group
    if args.side == "prefdiff":
        cfg = SamplingConfig(num_steps=args.steps, eta=args.eta, guidance_scale=args.guidance)
        seeds = list(range(len(prompts)))

        def once():
            groups = list(sample_groups(pipe, prompts, seeds, g, cfg, batch_size=args.batch))
            assert sum(len(gr.images) for gr in groups) == args.batch
    else:
        def once():
            out = pipe(prompt=prompts, num_images_per_prompt=g, num_inference_steps=args.steps, eta=args.eta,
                       guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(0),
                       output_type="pil")
            assert len(out.images) == args.batch
    mem_kind = common.reset_peak_memory(device)
    timed = common.time_repeats(once, device, args.repeats)
    return common.side_result(args, device, pipe, timed, mem_kind, fwd_samples_grad=0,
                              fwd_samples_nograd=args.steps * 2 * args.batch,
                              images_per_s=round(args.batch / min(timed[0]), 3))


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description="sampling with log-probs: prefdiff vs stock diffusers pipeline")
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="images per iteration (one UNet batch; x2 for guidance)")
    parser.add_argument("--images-per-group", type=int, default=2, help="G images per prompt (shared x_T in prefdiff)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.batch % args.images_per_group:
        parser.error(f"--batch {args.batch} must be a multiple of --images-per-group {args.images_per_group}")
    compared = common.run_or_compare(MODULE, args, argv, run_side, {
        "batch_images": args.batch, "images_per_group": args.images_per_group, "steps": args.steps, "eta": args.eta,
        "guidance": args.guidance})
    if compared is None:
        return None
    results, config = compared
    return common.report("sampling one batch (prefdiff with chain + log-probs vs stock pipeline)", config, results,
                         names={"reference": "stock diffusers"})


if __name__ == "__main__":
    main()
