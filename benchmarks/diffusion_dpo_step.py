"""Time one Diffusion-DPO optimizer step: prefdiff's library step vs the diffusers example's step structure.

- prefdiff: the method ``prefdiff.training.methods.diffusion_dpo.DiffusionDPO`` on an image-pair preference
  dataset (``ImagePairWriter``), trained by ``prefdiff.training.fit.accumulate`` on a ``TrainableUNet``, exactly
  as ``fit`` runs one optimizer step: the micro-batch's PNGs decoded, VAE posterior sample, one policy forward
  on winners and losers (2B), one no-grad reference forward with adapters disabled (no second UNet), the loss,
  backward through accelerate, clip and AdamW step. Prompts are encoded once per dataset (``PromptTable``).
- reference: the loop body of diffusers ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
  (the SD 1.5 script; read at huggingface/diffusers 58eb52c, lines 806-897), written out below: pixel values
  [B, 6, H, W] chunked into a concatenated winner/loser batch, VAE encode in chunks of
  ``vae_encode_batch_size`` (8), noise drawn for half and repeated, timesteps repeated, the prompt encoded by
  the text encoder every step, the policy forward, per-sample MSE, ``unwrap_model(unet).disable_adapters()``,
  a no-grad reference forward, ``enable_adapters()``, ``-logsigmoid(beta_dpo * logits)``,
  ``accelerator.backward``, clip, ``optimizer.step()``. Its LoRA is peft's ``LoraConfig(r, lora_alpha=r,
  init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0])`` added with
  ``unet.add_adapter``; under bf16 mixed precision the script keeps the LoRA weights in bf16 (it upcasts them
  only for fp16), prefdiff keeps them in fp32. For ``--arch sdxl`` the conditioning is SDXL's (both text
  encoders, pooled embeds, time ids: the SDXL script's loop, which also encodes every step), computed with
  prefdiff's ``encode_prompts``; the rest of the structure is the same.

Both read the same PNG pairs from disk every step (the diffusers script decodes its images in the data
loader every step too) and use the same batch, rank, beta (official 5000 = diffusers 2500) and lr.

    python -m benchmarks.diffusion_dpo_step [--arch tiny|sd15|sdxl] [--batch 4] [--rank 4] [--dtype fp32|bf16]
        [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common

MODULE = "benchmarks.diffusion_dpo_step"
PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
BETA_OFFICIAL = 5000.0  # = diffusers --beta_dpo 2500 (the diffusers script drops the 1/2)
LR = 1e-8  # the scripts' SD 1.5 lr; the value does not change the time


def write_pairs(out_dir: Path, pairs: int, resolution: int) -> Path:
    """``pairs`` image pairs of seeded random pixels (PNG) with captions, as an imported dataset."""
    import io

    from PIL import Image

    from prefdiff.data.preferences import ImagePairWriter

    def png(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    judge = {"name": "benchmark", "higher_is_better": True, "params": {}}
    with ImagePairWriter(out_dir, judge=judge, shard_bytes=128 << 20) as writer:
        for i in range(pairs):
            w, l = (png(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(2))
            writer.add_pair(f"a photo of animal {i}", w, l)
    return out_dir


def _params(args):
    import yaml

    from prefdiff.config import merged, parse_params

    overrides = {
        "model": {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[args.dtype], "device": args.device},
        "train": {"method": "diffusion_dpo", "finetune": "lora", "reference": "base", "lr": LR, "epochs": 1,
                  "batch_size": args.batch, "gradient_accumulation_steps": 1, "lora_rank": args.rank,
                  "lora_alpha": float(args.rank), "mixed_precision": "bf16" if args.dtype == "bf16" else "no",
                  "diffusion_dpo": {"beta": BETA_OFFICIAL, "beta_convention": "official", "empty_prompt_prob": 0.0}},
    }
    return parse_params(merged(yaml.safe_load(PARAMS.read_text()), overrides), str(PARAMS))


def prefdiff_side(args, pipe, data: Path, device):
    """One optimizer step = ``accumulate`` of one micro-batch of ``--batch`` pairs, as ``fit`` plans it."""
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.training.fit import FitContext, StepPlan, accumulate
    from prefdiff.training.methods.diffusion_dpo import DiffusionDPO
    from prefdiff.training.trainable import TrainableUNet

    params = _params(args)
    quiet = lambda line: None  # noqa: E731 - the library's progress lines are not the benchmark's output
    model = TrainableUNet(params, need_reference_copy=DiffusionDPO.needs_reference_copy, progress=quiet, pipe=pipe)
    method = DiffusionDPO(FitContext(params, model, PreferenceStore.open(data), None, quiet))
    rows = torch.arange(args.batch)
    counter = iter(range(10**9))

    def step():
        b = next(counter)  # a new micro-batch index each call: fresh (t, eps) draws, as successive steps
        plan = StepPlan(epoch=0, step=b + 1, epoch_done=False, micro_batches=[(b, rows)])
        accumulate(model, method, plan, params.train.seed, None)

    return step


def _pixels(image_ref) -> torch.Tensor:
    """transforms.ToTensor() + Normalize([0.5], [0.5]) of one RGB image (a stored image: ``read_bytes()``, as the
    diffusers script decodes its dataset's bytes): [3, H, W] in [-1, 1]."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image_ref.read_bytes())) as image:
        a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(a).permute(2, 0, 1) - 0.5) / 0.5


def diffusers_side(args, pipe, data: Path, device):
    """The diffusers example's step (its loop body, lines 806-897), on the same pairs."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.models.kinds import is_sdxl
    from prefdiff.sampling.guidance import encode_prompts

    accelerator = Accelerator(mixed_precision="bf16" if args.dtype == "bf16" else "no")
    weight_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params_to_optimize = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_to_optimize, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    pairs = PreferenceStore.open(data).image_pairs()[: args.batch]
    sdxl = is_sdxl(pipe)
    vae_encode_batch_size, beta_dpo, max_grad_norm = 8, BETA_OFFICIAL / 2, 1.0

    def step():
        # the data loader's transform and collate (label_0 = 1: winner first), then the loop body
        batch = {"pixel_values": torch.stack([torch.cat([_pixels(p.winner_image), _pixels(p.loser_image)])
                                              for p in pairs]).to(device),
                 "captions": [p.prompt for p in pairs]}
        with accelerator.accumulate(unet):
            pixel_values = batch["pixel_values"].to(dtype=weight_dtype)
            feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1))
            latents = []
            for i in range(0, feed_pixel_values.shape[0], vae_encode_batch_size):
                latents.append(vae.encode(feed_pixel_values[i : i + vae_encode_batch_size]).latent_dist.sample())
            latents = torch.cat(latents, dim=0)
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
            bsz = latents.shape[0] // 2
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device,
                                      dtype=torch.long).repeat(2)
            noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
            if sdxl:  # the SDXL script: both encoders, pooled embeds and time ids, encoded every step
                cond = encode_prompts(pipe, batch["captions"]).to(device).expand(2 * bsz)
                unet_kwargs = cond.unet_kwargs(weight_dtype)
            else:  # encode_prompt(text_encoder, batch["input_ids"]).repeat(2, 1, 1)
                with torch.no_grad():
                    ids = pipe.tokenizer(batch["captions"], max_length=pipe.tokenizer.model_max_length,
                                         padding="max_length", truncation=True, return_tensors="pt").input_ids
                    encoder_hidden_states = text_encoder(ids.to(device), attention_mask=None)[0]
                unet_kwargs = {"encoder_hidden_states": encoder_hidden_states.repeat(2, 1, 1)}
            model_pred = unet(noisy_model_input, timesteps, **unet_kwargs).sample
            target = noise
            model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
            model_losses_w, model_losses_l = model_losses.chunk(2)
            model_diff = model_losses_w - model_losses_l
            accelerator.unwrap_model(unet).disable_adapters()
            with torch.no_grad():
                ref_preds = unet(noisy_model_input, timesteps, **unet_kwargs).sample.detach()
                ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
                ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
                ref_losses_w, ref_losses_l = ref_loss.chunk(2)
                ref_diff = ref_losses_w - ref_losses_l
            accelerator.unwrap_model(unet).enable_adapters()
            logits = ref_diff - model_diff
            loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params_to_optimize, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()

    return step


def run_side(args) -> dict:
    device = common.device_of(args)
    pipe = common.build_pipeline(args, device)
    with tempfile.TemporaryDirectory(prefix="prefdiff-bench-dpo-") as tmp:
        data = write_pairs(Path(tmp) / "pairs", args.batch, common.resolution_of(args))
        make = prefdiff_side if args.side == "prefdiff" else diffusers_side
        step = make(args, pipe, data, device)
        mem_kind = common.reset_peak_memory(device)
        timed = common.time_repeats(step, device, args.repeats)
    n = 2 * args.batch  # winners and losers
    return common.side_result(args, device, pipe, timed, mem_kind, fwd_samples_grad=n, fwd_samples_nograd=n)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description="Diffusion-DPO step: prefdiff vs the diffusers example's step")
    common.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per optimizer step (UNet batch 2x)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank; the diffusers script's default)")
    args = parser.parse_args(argv)
    compared = common.run_or_compare(MODULE, args, argv, run_side,
                                     {"pairs_per_step": args.batch, "lora_rank": args.rank})
    if compared is None:
        return None
    results, config = compared
    return common.report(f"one Diffusion-DPO optimizer step ({args.batch} pairs)", config, results,
                         names={"reference": "diffusers example"})


if __name__ == "__main__":
    main()
