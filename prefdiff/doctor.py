"""``prefdiff doctor``: before a long run, check that this machine can do what params.yaml asks.

Checks, one line each (``ok``, ``problem`` with the fix, or ``skip`` when an earlier problem hides the input):

- ``params``  : params.yaml validates (``prefdiff.config``), and the sample stage's prompt set can be read.
- ``weights`` : ``model.source`` resolves offline (built-in, local diffusers directory, or a hub id in the
  local Hugging Face cache) and every weighted component named by ``model_index.json`` has its
  ``config.json`` and a complete weights file (each safetensors header parses and its tensors end exactly
  at the end of the file, so a truncated download is caught without loading anything).
- ``device``  : ``model.device`` exists on this machine (``auto`` says what it picks).
- ``memory``  : free memory of that device (RAM for the CPU, ``cudaMemGetInfo`` for a GPU) against a
  lower bound of what sampling and training hold at once (:func:`estimate`).
- ``disk``    : free disk of the workspace against the sample stage's trajectory store, twice (the
  workspace copy and DVC's cache copy).

The estimates are lower bounds from the params and the model's configs (activations are not counted): a
problem means the run cannot fit; ``ok`` means it is not ruled out.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from prefdiff.catalog import BUILTIN_MODELS, BUILTIN_PREFIX, resolve
from prefdiff.config import Params, ParamsError, load_params

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FP32 = 4
# Bytes per element of each safetensors dtype code (the file header names one per tensor).
_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# model_index.json components that hold no weights.
_UNWEIGHTED = re.compile(r"Tokenizer|Scheduler|FeatureExtractor|ImageProcessor|Processor")
# The non-variant weights files diffusers/transformers load when no variant is asked for (loading.py asks none).
_WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)")
CLASSIFIER_FREE_GUIDANCE = 2  # each UNet call runs the conditional and the unconditional branch
VAE_SCALE = 8  # SD's VAE: image side = 8 x latent side (PNG size bound)
ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, fp32


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "problem" | "skip"
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<8} {self.name:<8} {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from the model: parameter counts and the latent shape [C, H, W]."""

    parameters: int  # every weighted component
    unet_parameters: int
    latent_shape: tuple[int, int, int]
    where: str  # what was read


@dataclass(frozen=True)
class Needs:
    images: int
    trajectory_bytes: int  # the sample stage's store (latent chains, log-probs, PNG upper bound)
    disk_bytes: int
    memory_bytes: int
    memory_why: str


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def safetensors_parameters(path: Path) -> int:
    """Element count of a safetensors file from its header; ValueError if the file is truncated or not one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path}: header length {header_len} exceeds the file ({size} bytes): truncated")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: safetensors header is not JSON: corrupt") from None
    numel, end = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel += math.prod(info["shape"])
        end = max(end, info["data_offsets"][1])
    if 8 + header_len + end != size:
        raise ValueError(f"{path}: tensors end at byte {8 + header_len + end} but the file has {size}: truncated "
                         "or corrupt")
    return numel


def _component_parameters(directory: Path, component: str) -> int:
    """Parameters of one weighted component directory; ValueError naming what is missing or broken."""
    comp = directory / component
    if not (comp / "config.json").is_file():
        raise ValueError(f"{comp}/config.json is missing")
    files = sorted(p for p in comp.iterdir() if _WEIGHT_FILE.fullmatch(p.name))
    if not files:
        present = ", ".join(sorted(p.name for p in comp.iterdir())) or "nothing"
        raise ValueError(f"{comp}/ has no weights file (diffusion_pytorch_model.safetensors or model.safetensors; "
                         f"variant files such as *.fp16.safetensors are not loaded); it holds {present}")
    for index in comp.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (comp / s).is_file())
        if missing:
            raise ValueError(f"{index} names shards that are missing: {', '.join(missing)}")
    total = 0
    for f in files:
        total += safetensors_parameters(f) if f.suffix == ".safetensors" else f.stat().st_size // FP32
    return total


def _latent_shape(unet_config: dict) -> tuple[int, int, int]:
    side = unet_config.get("sample_size", 64)
    h, w = (side, side) if isinstance(side, int) else tuple(side)
    return int(unet_config.get("in_channels", 4)), int(h), int(w)


def directory_shape(directory: Path) -> ModelShape:
    """A diffusers pipeline directory's shape; ValueError naming the missing or broken file."""
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{directory} has no model_index.json (not a diffusers pipeline directory)")
    index = json.loads(index_file.read_text())
    weighted = [name for name, spec in index.items()
                if isinstance(spec, list) and len(spec) == 2 and all(spec) and not _UNWEIGHTED.search(spec[1])]
    if "unet" not in weighted:
        raise ValueError(f"{index_file} names no unet component")
    counts = {name: _component_parameters(directory, name) for name in weighted}
    unet_config = json.loads((directory / "unet" / "config.json").read_text())
    return ModelShape(parameters=sum(counts.values()), unet_parameters=counts["unet"],
                      latent_shape=_latent_shape(unet_config),
                      where=f"{directory} ({', '.join(weighted)})")


def resolve_source(params: Params, root: Path) -> Path | None:
    """The directory ``model.source`` loads from, or None for a pipeline prefdiff builds in code.

    Raises ``prefdiff.models.loading.ModelNotFoundError`` (with the fix) when it is not on this machine."""
    from prefdiff.models.loading import _locate

    source = params.model.source
    if source.startswith(BUILTIN_PREFIX):
        if source == BUILTIN_PREFIX + "digits":
            from prefdiff.models.digits import DIGITS_DIR

            return DIGITS_DIR
        return None
    local = Path(source).expanduser()
    if not local.is_absolute() and (root / local).exists():
        source = str(root / local)  # stages run in the workspace: a relative dir is relative to it
    return _locate(source, params.model.revision)


def model_shape(params: Params, root: Path) -> ModelShape:
    directory = resolve_source(params, root)
    if directory is not None:
        return directory_shape(directory)
    source = params.model.source
    pipe = resolve(BUILTIN_MODELS[source[len(BUILTIN_PREFIX):]])()  # tiny: built in code in a second
    modules = [m for m in (getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")) if m]
    return ModelShape(parameters=sum(p.numel() for m in modules for p in m.parameters()),
                      unet_parameters=sum(p.numel() for p in pipe.unet.parameters()),
                      latent_shape=_latent_shape(dict(pipe.unet.config)), where=f"{source} (built in code)")


def sampled_images(params: Params, num_prompts: int) -> int:
    """Images the sample stage stores (none when the pairs are imported: ``label.source: pickapic``)."""
    if params.label.source == "pickapic":
        return 0
    return num_prompts * params.sample.groups_per_prompt * params.sample.images_per_group


def estimate(params: Params, shape: ModelShape, num_prompts: int) -> Needs:
    """Lower bounds of what a round holds on disk and in the device's memory.

    Disk: each sampled image stores its fp32 latent chain [T+1, C, H, W] and log-probs [T] (prefdiff.data.
    trajectories) and a PNG of at most 3 bytes per pixel; DVC's cache holds a second copy of the outputs.
    Memory: the weights in ``model.dtype``, plus the larger of the sampler's chains for one batch (fp32,
    x2 for classifier-free guidance) and, with ``train.finetune: full``, the reference copy of the UNet,
    its fp32 gradients and AdamW's two fp32 states. Activations are not counted."""
    c, h, w = shape.latent_shape
    steps = params.sampling.num_steps
    latent = c * h * w
    png = 3 * (h * VAE_SCALE) * (w * VAE_SCALE)
    images = sampled_images(params, num_prompts)
    per_image = (steps + 1) * latent * FP32 + steps * FP32 + png
    trajectory_bytes = images * per_image
    weights = shape.parameters * DTYPE_BYTES[params.model.dtype]
    chains = params.sample.batch_size * CLASSIFIER_FREE_GUIDANCE * (steps + 1) * latent * FP32
    full = 0
    if params.train.finetune == "full":
        full = shape.unet_parameters * (DTYPE_BYTES[params.model.dtype] + FP32 + ADAM_STATES * FP32)
    why = (f"weights {human_bytes(weights)} ({shape.parameters / 1e6:.1f} M parameters in {params.model.dtype}) + "
           + (f"full fine-tuning {human_bytes(full)} (reference UNet, fp32 gradients, AdamW states)" if full >= chains
              else f"one sampling batch of chains {human_bytes(chains)} ({params.sample.batch_size} images x "
                   f"{CLASSIFIER_FREE_GUIDANCE} guidance branches x {steps + 1} latents of {c}x{h}x{w} fp32)"))
    return Needs(images=images, trajectory_bytes=trajectory_bytes, disk_bytes=2 * trajectory_bytes,
                 memory_bytes=weights + max(chains, full), memory_why=why)


def check_device(device: str) -> tuple[Check, str | None]:
    """Whether ``model.device`` exists here; returns the check and the concrete device (None if absent)."""
    import torch

    if device == "auto":
        chosen = "cuda:0" if torch.cuda.is_available() else "cpu"
        what = f"{chosen} ({torch.cuda.get_device_name(0)})" if chosen != "cpu" else "cpu (no CUDA device)"
        return Check("device", "ok", f"model.device = auto picks {what}"), chosen
    if device == "cpu":
        return Check("device", "ok", "model.device = cpu"), "cpu"
    if device == "mps":
        if torch.backends.mps.is_available():
            return Check("device", "ok", "model.device = mps"), "mps"
        return Check("device", "problem", "model.device = mps but this machine has no Apple MPS device",
                     "set model.device: cpu (or auto)"), None
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        return Check("device", "problem", f"model.device = {device} but this machine has no CUDA device ({build})",
                     "set model.device: cpu (or auto), or run on a machine with a GPU"), None
    if index >= count:
        return Check("device", "problem", f"model.device = {device} but this machine has {count} CUDA device(s) "
                     f"(cuda:0..cuda:{count - 1})", f"set model.device: cuda:0..cuda:{count - 1} (or auto)"), None
    name = f"cuda:{index}"
    return Check("device", "ok", f"model.device = {device}: {torch.cuda.get_device_name(index)}"), name


def free_memory(device: str) -> tuple[int, str]:
    """Free bytes on ``device`` and what they are (``cpu``: MemAvailable; ``cuda:N``: cudaMemGetInfo)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(int(device.partition(":")[2] or 0))
        return int(free), f"free on {device}"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM available"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM free"


def run_checks(params_path: Path) -> list[Check]:
    """Every check for the workspace of ``params_path`` (its directory), in order; raises ParamsError if the
    params are invalid (nothing else can be checked without them)."""
    from prefdiff.prompts import get_prompt_set

    params = load_params(params_path)
    root = params_path.resolve().parent
    checks: list[Check] = []
    num_prompts: int | None = None
    try:
        num_prompts = len(get_prompt_set(params.sample.prompt_set, params.sample.num_prompts, root=root))
        checks.append(Check("params", "ok", f"{params_path} is valid; sample.prompt_set "
                            f"{params.sample.prompt_set!r}: {num_prompts} prompts"))
    except (ValueError, OSError) as err:
        checks.append(Check("params", "problem", f"sample.prompt_set: {err}", "fix the prompt set or its file"))

    shape: ModelShape | None = None
    try:
        shape = model_shape(params, root)
        latents = "x".join(map(str, shape.latent_shape))
        checks.append(Check("weights", "ok", f"model.source = {params.model.source}: {shape.where}, "
                            f"{shape.parameters / 1e6:.2f} M parameters, latents {latents}"))
    except (ValueError, OSError) as err:  # ModelNotFoundError is a FileNotFoundError
        fix = ("download it on a machine with network (`hf download <id>`) and copy the Hugging Face cache here, "
               "or set model.source to a complete diffusers directory")
        checks.append(Check("weights", "problem", f"model.source = {params.model.source}: {err}", fix))

    device_check, device = check_device(params.model.device)
    checks.append(device_check)

    if shape is None or num_prompts is None:
        why = "needs the model's config (weights problem above)" if shape is None else "needs the prompt count"
        checks += [Check("memory", "skip", why), Check("disk", "skip", why)]
        return checks
    needs = estimate(params, shape, num_prompts)
    if device is None:
        checks.append(Check("memory", "skip", "needs a device (device problem above)"))
    else:
        free, what = free_memory(device)
        ok = needs.memory_bytes <= free
        checks.append(Check("memory", "ok" if ok else "problem",
                            f"needs at least {human_bytes(needs.memory_bytes)} ({needs.memory_why}); "
                            f"{human_bytes(free)} {what}",
                            "" if ok else "lower sample.batch_size, use model.dtype: float16/bfloat16, "
                                          "train.finetune: lora, or a device with more memory"))
    usage = shutil.disk_usage(root)
    ok = needs.disk_bytes <= usage.free
    c, h, w = shape.latent_shape
    checks.append(Check("disk", "ok" if ok else "problem",
                        f"needs at least {human_bytes(needs.disk_bytes)} for data/trajectories ({needs.images} images "
                        f"x {params.sampling.num_steps + 1} latents of {c}x{h}x{w} fp32 + PNG, x2 for DVC's cache); "
                        f"{human_bytes(usage.free)} free on {root}",
                        "" if ok else "free disk space, or lower sample.groups_per_prompt / sample.num_prompts / "
                                      "sampling.num_steps"))
    return checks


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="prefdiff doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the params file; its directory is the workspace (default: ./params.yaml)")
    args = parser.parse_args(argv)
    try:
        checks = run_checks(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for check in checks:
        print(check.line(), flush=True)
    problems = [c.name for c in checks if c.status == "problem"]
    print(f"{len(problems)} problem(s): {', '.join(problems)}" if problems else "all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
