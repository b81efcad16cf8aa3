"""What every benchmark shares: the architectures, the two sides in fresh processes, timing, memory and MFU.

Architectures (``--arch``):

- ``tiny``: prefdiff's built-in ``builtin:tiny-sd`` (64 px, ~0.8 M UNet parameters); runs on a CPU.
- ``sd15`` / ``sdxl``: the full-size Stable Diffusion 1.5 (512 px) / SDXL base (1024 px) architectures with
  RANDOM weights, built from the configs below (the hub's ``unet/config.json``, ``vae/config.json`` and
  text-encoder configs written in code), so no download is needed. Speed and memory depend on the shapes,
  not on the values, so they stand in for the real checkpoints in timings. The tokenizer is prefdiff's
  generated character-level CLIP tokenizer (77 tokens, as CLIP's), whose ids are valid for the real vocabulary
  size; it affects only the text encoders, which run once per batch.

Two sides in fresh processes: ``run_sides`` runs ``python -m <benchmark> --side prefdiff`` and ``--side
reference`` one after the other, each a new interpreter, so each side's peak memory is its own (peak RSS is a
per-process high-water mark: measured in one process, the second side would inherit the first one's peak).
Each side prints one ``RESULT {json}`` line that the parent collects.

Memory: on a GPU ``torch.cuda.max_memory_allocated`` after a reset at the start of the measured work (so the
weights are counted, the one-off construction in fp32 is not); on a CPU the peak RSS (``VmHWM``) after the same
reset (writing 5 to ``/proc/self/clear_refs``, Linux >= 4.0; where that is refused, the lifetime peak, said so
in ``mem_kind``).

MFU (GPU only): UNet forward FLOPs of ONE sample counted with ``torch.utils.flop_counter.FlopCounterMode``,
times the samples each side pushes through the UNet per iteration (x3 for a forward that is back-propagated,
x1 for a no-grad forward; the usual 6N-style convention, although a LoRA backward skips the base weights'
gradients), divided by the median time and the device's dense bf16 peak. VAE and text encoders are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

ARCHS = ("tiny", "sd15", "sdxl")
RESOLUTION = {"tiny": 64, "sd15": 512, "sdxl": 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}

# runwayml/stable-diffusion-v1-5 unet/config.json (sample_size set from --resolution)
SD15_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, act_fn="silu",
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    act_fn="silu",
)
# the SD / SDXL VAE (vae/config.json; SDXL differs in its scaling factor and force_upcast)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu",
)
# CLIP ViT-L/14's text tower (SD 1.5's encoder, SDXL's first) and OpenCLIP ViT-bigG/14's (SDXL's second)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
CLIP_VOCAB = 49408


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=ARCHS, default="tiny",
                        help="tiny (builtin:tiny-sd, CPU) | sd15 (512 px) | sdxl (1024 px): random weights")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size in pixels (default: the architecture's: tiny 64, sd15 512, sdxl 1024)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="fp32 | bf16 (frozen weights in bf16 and the training step under bf16 autocast)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: known GPUs, e.g. H200 989)")
    parser.add_argument("--side", choices=("both", "prefdiff", "reference"), default="both",
                        help="both: each side in its own fresh process (default); one side: run it here")


def device_of(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def resolution_of(args) -> int:
    res = args.resolution or RESOLUTION[args.arch]
    if res % 8:
        raise SystemExit(f"error: --resolution {res}: must be a multiple of 8 (the VAE's factor)")
    return res


def autocast(args, device: torch.device):
    """bf16 autocast for a training step when --dtype bf16 (accelerate's mixed_precision="bf16"), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()


def _tokenizer():
    from prefdiff.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(77)


def _text_encoder(tokenizer, spec: dict, *, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_pipeline(args, device: torch.device | None = None):
    """The ``--arch`` pipeline on ``device`` in ``--dtype``, DDIM scheduler, eval mode, frozen, progress off.

    Full-size random weights are created directly on the device (``torch.device`` as the default device:
    initialising SDXL's 2.6 B UNet parameters on a GPU takes seconds, on a CPU minutes), seeded with 0.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel

    from prefdiff.models.loading import load_pipeline
    from prefdiff.models.tiny import SD15_SCHEDULER_CONFIG, SDXL_VAE_SCALING_FACTOR

    device = device or device_of(args)
    dtype = DTYPES[args.dtype]
    res = resolution_of(args)
    if args.arch == "tiny":
        if res != RESOLUTION["tiny"]:
            raise SystemExit("error: --resolution: the tiny model has one size, 64 px")
        return load_pipeline("builtin:tiny-sd", dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype],
                             device=str(device))
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    with torch.device(device):
        if args.arch == "sd15":
            unet = UNet2DConditionModel(sample_size=res // 8, **SD15_UNET)
            vae = AutoencoderKL(sample_size=res, scaling_factor=0.18215, **VAE)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=_text_encoder(tokenizer, CLIP_L, projection=False), tokenizer=tokenizer,
                unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        else:
            unet = UNet2DConditionModel(sample_size=res // 8, **SDXL_UNET)
            vae = AutoencoderKL(sample_size=res, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True, **VAE)
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=_text_encoder(tokenizer, CLIP_L, projection=False),
                text_encoder_2=_text_encoder(tokenizer, CLIP_BIGG, projection=True), tokenizer=tokenizer,
                tokenizer_2=_tokenizer(), unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
                force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of ``repeats`` calls of ``fn`` after one untimed warm-up (allocator,
    autotuning, lazy init).

    CPU seconds are reported because a shared CPU machine's wall time depends on what else runs: with other
    jobs on the cores, a side's wall time grows by waiting, its CPU seconds far less (with one torch thread they
    are the work done; with more, spinning threads add some)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        began, began_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - began_cpu)
    return walls, cpus


def reset_peak_memory(device: torch.device) -> str:
    """Start a fresh peak-memory window; returns what ``peak_memory`` will measure."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "peak RSS (VmHWM, reset after setup)"
    except OSError:
        return "peak RSS (process lifetime: /proc/self/clear_refs refused)"


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA max allocated, or the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def unet_sample_flops(pipe, device: torch.device) -> int | None:
    """Forward FLOPs of the UNet for ONE sample at the pipeline's resolution (GPU only; None on a CPU, where a
    full-size forward just to count would cost minutes and MFU is not reported)."""
    if device.type != "cuda":
        return None
    from torch.utils.flop_counter import FlopCounterMode

    from prefdiff.sampling.guidance import encode_prompts
    from prefdiff.sampling.sampler import latent_shape

    unet = pipe.unet
    x = torch.randn(1, *latent_shape(pipe), device=device, dtype=unet.dtype)
    t = torch.tensor([500], device=device)
    cond = encode_prompts(pipe, ["a photo"]).to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, **cond.unet_kwargs(unet.dtype))
    return int(counter.get_total_flops())


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"


def side_result(args, device: torch.device, pipe, timed: tuple[list[float], list[float]], mem_kind: str, *,
                fwd_samples_grad: int, fwd_samples_nograd: int, **extra) -> dict:
    """One side's numbers; ``timed``: ``time_repeats``' output; ``fwd_samples_*``: samples through the UNet per
    iteration, with and without grad."""
    times, cpus = timed
    mem = peak_memory(device)  # before counting FLOPs, whose forward is not part of the measured work
    flops = unet_sample_flops(pipe, device)
    med = statistics.median(times)
    out = {"times_s": [round(t, 5) for t in times], "median_s": round(med, 5), "min_s": round(min(times), 5),
           "max_s": round(max(times), 5), "cpu_s": [round(t, 5) for t in cpus],
           "median_cpu_s": round(statistics.median(cpus), 5), "peak_mem_bytes": mem, "mem_kind": mem_kind,
           "unet_samples_fwd_grad": fwd_samples_grad, "unet_samples_fwd_nograd": fwd_samples_nograd, **extra}
    peak = peak_tflops(args, device)
    if flops is not None:
        total = flops * (3 * fwd_samples_grad + fwd_samples_nograd)
        out["unet_fwd_flops_per_sample"] = flops
        out["achieved_tflops"] = round(total / med / 1e12, 2)
        if peak is not None:
            out["mfu"] = round(total / med / (peak * 1e12), 4)
    return out


def emit(result: dict) -> None:
    """A side's result line for ``run_sides``."""
    print("RESULT " + json.dumps(result), flush=True)


def run_sides(module: str, argv: list[str], sides=("prefdiff", "reference")) -> dict[str, dict]:
    """Run each side as ``python -m module argv --side S`` in a fresh process; its ``RESULT`` line, parsed.

    The children's other output passes through. A side that fails is reported with its exit status instead of
    stopping the other.
    """
    results = {}
    for side in sides:
        proc = subprocess.run([sys.executable, "-m", module, *argv, "--side", side], stdout=subprocess.PIPE,
                              text=True, env=os.environ.copy())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        for ln in proc.stdout.splitlines():
            if not ln.startswith("RESULT "):
                print(ln)
        if proc.returncode != 0 or not lines:
            results[side] = {"error": f"side {side} exited with status {proc.returncode}"}
        else:
            results[side] = json.loads(lines[-1][len("RESULT "):])
    return results


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report(title: str, config: dict, results: dict[str, dict], *, ours: str = "prefdiff",
           theirs: str = "reference", names: dict[str, str] | None = None) -> dict:
    """Print the config, each side's median/min/max, peak memory and MFU, and the ratios; returns it all.

    Exits with status 1 after printing when a side failed."""
    names = names or {}
    summary: dict = {"benchmark": title, **config, "sides": results}
    print(f"== {title}")
    print("   " + ", ".join(f"{k} {v}" for k, v in config.items()))
    for side, r in results.items():
        label = names.get(side, side)
        if "error" in r:
            print(f"   {label}: {r['error']}")
            continue
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        tf = f", {r['achieved_tflops']} TFLOP/s" if "achieved_tflops" in r else ""
        cpu = f", CPU {r['median_cpu_s']:.4f} s" if not r["mem_kind"].startswith("cuda") else ""
        print(f"   {label}: median {r['median_s']:.4f} s (min {r['min_s']:.4f}, max {r['max_s']:.4f}, "
              f"{len(r['times_s'])} repeats{cpu}), peak memory {_gib(r['peak_mem_bytes'])} ({r['mem_kind']}){tf}{mfu}")
    a, b = results.get(ours, {}), results.get(theirs, {})
    if "median_s" in a and "median_s" in b:
        summary["speedup"] = round(b["median_s"] / a["median_s"], 3)
        summary["speedup_min_max"] = [round(b["min_s"] / a["max_s"], 3), round(b["max_s"] / a["min_s"], 3)]
        summary["memory_ratio"] = round(a["peak_mem_bytes"] / b["peak_mem_bytes"], 3)
        summary["cpu_speedup"] = round(b["median_cpu_s"] / a["median_cpu_s"], 3)
        cpu = "" if a["mem_kind"].startswith("cuda") else f", CPU seconds {summary['cpu_speedup']:.2f}x"
        print(f"   ratio {names.get(theirs, theirs)} / {names.get(ours, ours)} time: {summary['speedup']:.2f}x "
              f"(range over repeats {summary['speedup_min_max'][0]:.2f}-{summary['speedup_min_max'][1]:.2f}{cpu}); "
              f"memory {names.get(ours, ours)} / {names.get(theirs, theirs)}: {summary['memory_ratio']:.2f}x")
    print("SUMMARY " + json.dumps(summary), flush=True)
    if any("error" in r for r in results.values()):
        raise SystemExit(1)  # a failed side fails the command (scripts/gpu_bench.sh reports it)
    return summary


def side_argv(argv: list[str] | None) -> list[str]:
    """The command line to hand to each side's process (``--side`` removed: ``run_sides`` adds its own)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--side":
            skip = True
            continue
        if a.startswith("--side="):
            continue
        out.append(a)
    return out


def run_or_compare(module: str, args, argv: list[str] | None, run_side, config: dict) -> tuple[dict, dict] | None:
    """A benchmark's command: with ``--side prefdiff|reference`` run that side here and print its result (None);
    else run both sides in fresh processes and return their results with the printed configuration (the shared
    keys, then ``config``)."""
    if args.side != "both":
        emit(run_side(args))
        return None
    results = run_sides(module, side_argv(argv))
    shared = {"device": device_name(device_of(args)), "arch": args.arch, "resolution": resolution_of(args),
              "dtype": args.dtype}
    return results, shared | config
