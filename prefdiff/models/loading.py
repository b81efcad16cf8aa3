"""Load a text-to-image pipeline from the built-in tiny model, a hub id or a local directory.

One loader for every source, so the code path that loads real Stable Diffusion 1.5 weights is the one
the tests exercise (they save the tiny pipeline to a temporary directory and load it back). Hub ids are
read from the local Hugging Face cache only: nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from prefdiff.config import BUILTIN_PREFIX

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The requested base model is not available offline; the message says where we looked and what to do."""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pipeline(source: str, *, dtype: str = "float32", device: str = "cpu", revision: str | None = None):
    """Return a StableDiffusionPipeline with a DDIM scheduler, on ``device`` in ``dtype``, in eval mode.

    ``source`` is ``builtin:tiny-sd``, a local diffusers directory (with ``model_index.json``) or a hub id
    ``org/name`` already in the local Hugging Face cache.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype = {dtype!r}; allowed: {', '.join(DTYPES)}")
    if source.startswith(BUILTIN_PREFIX):
        from prefdiff.models.tiny import BUILTIN_MODELS, build_tiny_pipeline

        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"model.source = {source!r}: unknown built-in model; allowed: builtin:tiny-sd")
        pipe = build_tiny_pipeline()
        if dtype != "float32":
            pipe = pipe.to(dtype=DTYPES[dtype])
    else:
        path = _locate(source, revision)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=DTYPES[dtype], safety_checker=None, requires_safety_checker=False,
            local_files_only=True,
        )
        # The log-prob sampler is DDIM; keep the model's own noise schedule (betas, offset, spacing).
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe.to(resolve_device(device))


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
            f"model.source = {source!r} is neither builtin:tiny-sd, an existing local directory, nor a hub id "
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
