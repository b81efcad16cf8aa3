"""Load a text-to-image pipeline from the built-in tiny model, a hub id or a local directory.

One loader for every source, so the code path that loads real Stable Diffusion 1.5 / SDXL weights is the
one the tests exercise (they save the tiny pipelines to a temporary directory and load them back). Hub ids
are read from the local Hugging Face cache only: nothing is downloaded at run time. The pipeline class
(``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) comes from the directory's
``model_index.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from prefdiff.catalog import BUILTIN_MODELS, BUILTIN_PREFIX, resolve

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The requested base model is not available offline; the message says where we looked and what to do."""


class DeviceError(ValueError):
    """The requested device is not on this machine; the message names the key and the devices there are."""


# What each pipeline class needs from model_index.json (diffusers' __init__ arguments without defaults), and
# the components whose directory must hold weights.
REQUIRED_COMPONENTS = {
    "StableDiffusionPipeline": ("vae", "text_encoder", "tokenizer", "unet", "scheduler"),
    "StableDiffusionXLPipeline": ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
                                  "scheduler"),
}
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:0``.. and ``mps`` when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def device_problem(device: str, key: str = "model.device") -> str | None:
    """Why ``device`` cannot be used on this machine (None: it can), naming ``key`` and the devices there are."""
    if device in ("auto", "cpu"):
        return None
    have = available_devices()
    if device == "cuda" and any(d.startswith("cuda:") for d in have) or device in have:
        return None
    why = "this machine has no CUDA device" if device.startswith("cuda") else f"{device} is not available here"
    if device.startswith("cuda") and torch.version.cuda is None:
        why += f" (torch {torch.__version__} is a CPU-only build)"
    elif device.startswith("cuda:") and torch.cuda.is_available():
        why = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return f"{key} = {device!r}: {why}; available: {', '.join(['auto', *have])} (auto: the first CUDA device, else cpu)"


def resolve_device(device: str, key: str = "model.device") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU; DeviceError for a device that is
    not on this machine (torch would fail later with "Torch not compiled with CUDA enabled")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device, key)
    if problem is not None:
        raise DeviceError(problem)
    return torch.device(device)


def load_pipeline(source: str, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None):
    """Return a StableDiffusion(XL)Pipeline with a DDIM scheduler, on ``device`` in ``dtype``, in eval mode.

    ``source`` is ``builtin:tiny-sd`` / ``builtin:tiny-sdxl``, a local diffusers directory (with
    ``model_index.json``) or a hub id ``org/name`` already in the local Hugging Face cache. SD 1.5 and SDXL
    pipelines are supported (``prefdiff.sampling.guidance.is_sdxl`` tells them apart).
    """
    from diffusers import DDIMScheduler

    from prefdiff.models.kinds import is_sdxl

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype = {dtype!r}; allowed: {', '.join(DTYPES)}")
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            allowed = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise ValueError(f"model.source = {source!r}: unknown built-in model; allowed: {allowed}")
        pipe = resolve(BUILTIN_MODELS[name])()  # fp32 on the CPU, identical on every call
        if dtype != "float32":
            pipe = pipe.to(dtype=DTYPES[dtype])
    else:
        path = locate_model(source, revision)
        cls = _pipeline_class(path)
        extra = {"add_watermarker": False} if cls.__name__ == "StableDiffusionXLPipeline" else {
            "safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True, **extra)
        except (OSError, ValueError) as err:  # a file check_pipeline_dir cannot see: a variant, a shard, a config
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelNotFoundError(f"model.source = {source!r}: {path} cannot be loaded ({first}); re-save the "
                                     "pipeline with `save_pretrained(dir)` or re-download it") from None
        # The log-prob sampler is DDIM; keep the model's own noise schedule (betas, offset, spacing).
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if dtype == "float16" and is_sdxl(pipe) and pipe.vae.config.get("force_upcast", False):
        # SDXL's VAE overflows in fp16 (its config says force_upcast, as diffusers' SDXL pipeline does):
        # decode in fp32; decode_images casts the latents to the VAE's dtype.
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe.to(resolve_device(device))


def _pipeline_class(path: Path):
    """StableDiffusionPipeline or StableDiffusionXLPipeline, from ``model_index.json``'s ``_class_name``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = _model_index(path, str(path)).get("_class_name", "")
    return StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline


def _model_index(path: Path, source: str) -> dict:
    import json

    index = path / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"model.source = {source!r}: {index} is not valid JSON ({err}); re-save the "
                                 "pipeline with `save_pretrained(dir)`") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"model.source = {source!r}: {index} is not a JSON object; re-save the pipeline")
    return data


def check_pipeline_dir(path: Path, source: str) -> None:
    """Every component the pipeline class needs is listed in ``model_index.json`` and present on disk, and
    each model component's directory holds a config and a weight file: ModelNotFoundError naming the first
    one missing (diffusers' own error for it is a long traceback about a constructor argument)."""
    index = _model_index(path, source)
    cls = "StableDiffusionXLPipeline" if "XL" in str(index.get("_class_name", "")) else "StableDiffusionPipeline"
    where = f"model.source = {source!r}: {path / 'model_index.json'}"
    for name in REQUIRED_COMPONENTS[cls]:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise ModelNotFoundError(f"{where} lists no component {name!r} (found {entry!r}); a {cls} needs "
                                     f"{', '.join(REQUIRED_COMPONENTS[cls])}: re-save the pipeline with "
                                     "`save_pretrained(dir)`")
        folder = path / name
        if not folder.is_dir():
            raise ModelNotFoundError(f"model.source = {source!r}: component {name!r} is listed in model_index.json "
                                     f"but {folder} is missing; copy the whole pipeline directory")
        if name in WEIGHTED_COMPONENTS:
            if not (folder / "config.json").is_file():
                raise ModelNotFoundError(f"model.source = {source!r}: {folder / 'config.json'} is missing; copy the "
                                         "whole pipeline directory")
            if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir() if f.is_file()):
                raise ModelNotFoundError(f"model.source = {source!r}: no weight file in {folder} (expected e.g. "
                                         f"{'model' if name.startswith('text_encoder') else 'diffusion_pytorch_model'}"
                                         ".safetensors); copy the whole pipeline directory or re-download it")


def locate_model(source: str, revision: str | None = None) -> Path | None:
    """The checked pipeline directory of ``source`` (None for a builtin: model, built in memory): a local
    directory or the local Hugging Face cache, with every component and weight file (check_pipeline_dir).
    ModelNotFoundError otherwise; nothing is loaded, so a stage calls this first."""
    if source.startswith(BUILTIN_PREFIX):
        return None
    path = _locate(source, revision)
    check_pipeline_dir(path, source)
    return path


def _locate(source: str, revision: str | None) -> Path:
    """Map a local dir or a cached hub id to a directory holding ``model_index.json``."""
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"model.source = {source!r} is a local path but has no model_index.json; point it at a "
                "diffusers pipeline directory (one written by `pipe.save_pretrained(dir)`)"
            )
        return local
    if not _HUB_ID.fullmatch(source):
        raise ModelNotFoundError(
            f"model.source = {source!r} is neither a builtin: model, an existing local directory, nor a hub id "
            "of the form org/name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelNotFoundError(
            f"model.source = {source!r}: not in the local Hugging Face cache ({cache}, revision "
            f"{revision or 'main'}); prefdiff never downloads weights at run time. On a machine with network "
            f"run `hf download {source}` and copy the cache here (or set HF_HOME), or save the pipeline with "
            f"`save_pretrained(dir)` and set model.source to that dir. ({type(err).__name__})"
        ) from None


def model_fingerprint(pipe) -> str:
    """sha256 over the UNet's parameters (names, shapes, bytes): which base model made a dataset."""
    digest = hashlib.sha256()
    for name, tensor in sorted(pipe.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
