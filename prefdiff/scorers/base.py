"""The one scorer interface (label judges and evaluation metrics alike), and the plumbing scorers share.

A scorer turns ``images`` (+ ``prompts``) into one raw float32 value per sample::

    scores = scorer.score(images, prompts)      # torch.float32 [N] on the CPU

* ``higher_is_better``: orientation of the value (True for every scorer here).
* ``needs_prompt``: whether the value depends on the prompt. When False, ``prompts`` may be omitted; when given,
  its length must still match the number of images.
* Images: a list of PIL images, a list of uint8 HWC numpy arrays (or one uint8 NHWC array), or a float tensor
  [N,3,H,W] in [0,1] (a decoded diffusion batch). Float tensors become uint8 PIL images first, as
  ``diffusers``' ``numpy_to_pil`` does (``round(x*255)``), so every scorer sees exactly the images a user would
  save; the image processors are the PIL backends of ``transformers`` (``CLIPImageProcessorPil``,
  ``BlipImageProcessorPil``), which reproduce the original torchvision-on-PIL pipelines.
* Loading is lazy: constructing a scorer only stores where its weights are; the first ``score`` (or ``load``)
  resolves them from a local directory, a local checkpoint file or a Hugging Face hub id. With
  ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) nothing is downloaded; when something is not there,
  loading raises one :class:`ScorerWeightsMissing` saying what was looked for and how to provide it.
  ``available()`` answers the same question from file/cache existence only, without loading anything.
* Device/dtype: ``device="auto"`` picks CUDA when present. ``dtype`` (fp16/bf16) applies to the transformer
  backbone on CUDA only; projections, heads, normalisation, cosines and the returned values are fp32. On the
  CPU everything is fp32 (a half ``dtype`` is ignored with a warning).
* Batching: images are scored ``batch_size`` at a time under ``torch.inference_mode()`` with the models in
  ``eval()``; results do not depend on ``batch_size`` (tested to 1e-6).
* ``from_components(...)``: build a scorer around already-constructed modules (tests use tiny random models).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_TRUE = {"1", "true", "yes", "on"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model")


class ScorerWeightsMissing(Exception):
    """A scorer's weights (or tokenizer/processor files) are not where it looked.

    ``scorer``: the scorer's name; ``looked_for``: what was searched (hub id + cache dir, or a path);
    ``how_to_provide``: what to do about it.
    """

    def __init__(self, scorer: str, looked_for: str, how_to_provide: str) -> None:
        self.scorer = scorer
        self.looked_for = looked_for
        self.how_to_provide = how_to_provide
        super().__init__(f"scorer {scorer!r}: weights not available. Looked for: {looked_for}. "
                         f"How to provide them: {how_to_provide}")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read at call time."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def looks_like_path(source: str | os.PathLike) -> bool:
    """A local path (existing, absolute, relative with ./ or ~, or a checkpoint file name) rather than a hub id."""
    if isinstance(source, os.PathLike):
        return True
    s = str(source)
    return (s.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(os.path.expanduser(s))
            or s.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or s.count("/") > 1)


def hub_cached_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of ``filename`` of hub repo ``repo_id`` in the local HF cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # malformed repo id and the like: not cached
        return None
    return found if isinstance(found, str) else None


@dataclass(frozen=True)
class Requirement:
    """One thing a scorer needs on disk. ``kind``: ``model`` (a save_pretrained dir / hub repo with config +
    weights), ``image_processor``, ``tokenizer``, ``file`` (a local file) or ``hub_file`` (one file of a hub
    repo). ``arg`` names the constructor argument that points at it (for the error message)."""

    what: str
    kind: str
    source: str
    arg: str
    filename: str | None = None
    convert_hint: str | None = None


def _dir_has(path: Path, names: Sequence[str]) -> bool:
    return any((path / n).is_file() for n in names)


def check_requirement(req: Requirement, local_files_only: bool) -> tuple[bool, str]:
    """(present?, what was looked for). Only file/cache existence; nothing is loaded or downloaded."""
    if req.kind == "file":
        path = Path(os.path.expanduser(req.source))
        return path.is_file(), f"{req.what}: file {path}"
    if looks_like_path(req.source):
        path = Path(os.path.expanduser(req.source))
        needed = {"model": ("config.json",), "image_processor": ("preprocessor_config.json",),
                  "tokenizer": _TOKENIZER_FILES, "hub_file": (req.filename or "",)}[req.kind]
        ok = path.is_dir() and _dir_has(path, needed)
        if ok and req.kind == "model":
            ok = _dir_has(path, _WEIGHT_FILES)
        return ok, f"{req.what}: local directory {path} (with {' or '.join(needed)})"
    cache = hf_cache_dir()
    if req.kind == "hub_file":
        names: tuple[str, ...] = (req.filename or "",)
        ok = hub_cached_file(req.source, names[0]) is not None
    elif req.kind == "model":
        ok = (hub_cached_file(req.source, "config.json") is not None
              and any(hub_cached_file(req.source, n) is not None for n in _WEIGHT_FILES))
        names = ("config.json", "model.safetensors|pytorch_model.bin")
    elif req.kind == "image_processor":
        names = ("preprocessor_config.json",)
        ok = hub_cached_file(req.source, names[0]) is not None
    else:
        names = _TOKENIZER_FILES
        ok = any(hub_cached_file(req.source, n) is not None for n in names)
    where = f"{req.what}: hub id {req.source!r} ({', '.join(names)}) in the HF cache {cache}"
    if not ok and not local_files_only:
        return True, where + " (not cached; will be downloaded on first use)"
    return ok, where


def how_to_provide(req: Requirement) -> str:
    if req.kind == "file" or looks_like_path(req.source):
        hint = f"put it at {req.source} or pass {req.arg}=<path> to the scorer"
    else:
        file_part = f" {req.filename}" if req.kind == "hub_file" else ""
        hint = (f"on a machine with network run `huggingface-cli download {req.source}{file_part}` (or `hf download`) "
                f"and copy its HF cache ({hf_cache_dir()}) here (or set HF_HOME/HF_HUB_CACHE to it), or save the files "
                f"to a local directory and pass {req.arg}=<that dir>")
    if req.convert_hint:
        hint += f"; {req.convert_hint}"
    return hint


def missing_error(scorer: str, missing: list[Requirement], local_files_only: bool) -> ScorerWeightsMissing:
    looked = "; ".join(check_requirement(r, local_files_only)[1] for r in missing)
    groups: dict[tuple, list[Requirement]] = {}
    for r in missing:  # one hint per place (a hub repo's model + processor + tokenizer share one download)
        groups.setdefault((r.kind == "file", r.source, r.kind == "hub_file"), []).append(r)
    hints = []
    for reqs in groups.values():
        args = "/".join(dict.fromkeys(r.arg for r in reqs))
        files = " ".join(dict.fromkeys(r.filename for r in reqs if r.filename)) or None
        hint = how_to_provide(Requirement(reqs[0].what, reqs[0].kind, reqs[0].source, args, files,
                                          reqs[0].convert_hint))
        if hint not in hints:
            hints.append(hint)
    how = " | ".join(hints)
    if local_files_only:
        how += " (HF_HUB_OFFLINE/local_files_only is set, so nothing is downloaded)"
    return ScorerWeightsMissing(scorer, looked, how)


# ---------------------------------------------------------------------------------------------------- images


def _tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] (or [3,H,W]) float in [0,1] or uint8 -> uint8 NHWC."""
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"image tensors must be [N,3,H,W] (or [3,H,W] in a list); got shape {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        u8 = t
    elif t.is_floating_point():
        x = t.to(torch.float32)
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise ValueError("float image tensors must be finite and in [0, 1] (decode and clamp first); "
                             f"got min {float(x.min()):.4g}, max {float(x.max()):.4g}")
        u8 = (x * 255.0).round().to(torch.uint8)  # diffusers' numpy_to_pil: round(x * 255)
    else:
        raise ValueError(f"image tensors must be float in [0,1] or uint8; got {t.dtype}")
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 HWC; got dtype {a.dtype} (convert floats with round(x*255))")
    if a.ndim == 2:
        return Image.fromarray(a, mode="L").convert("RGB")
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"numpy images must be uint8 HxWx3 (or HxWx4 / HxW); got shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def to_pil_images(images: Any) -> list[Image.Image]:
    """Normalise accepted image inputs to a list of RGB PIL images (see the module docstring)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"an image tensor batch must be [N,3,H,W]; got shape {tuple(images.shape)}")
        return [Image.fromarray(a) for a in _tensor_to_uint8(images)]
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError("a numpy image batch must be uint8 [N,H,W,3]; pass single images as a list")
        return [_array_to_pil(a) for a in images]
    if isinstance(images, (Image.Image, str, bytes)):
        raise TypeError("images must be a sequence (list of PIL images / uint8 HWC arrays) or an [N,3,H,W] tensor")
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append(im if im.mode == "RGB" else im.convert("RGB"))
        elif isinstance(im, np.ndarray):
            out.append(_array_to_pil(im))
        elif isinstance(im, torch.Tensor):
            out.append(Image.fromarray(_tensor_to_uint8(im)[0]))
        else:
            raise TypeError(f"image {i}: unsupported type {type(im).__name__} (PIL image, uint8 HWC array or tensor)")
    return out


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int, int, int]:
    """torchvision ``CenterCrop`` offsets: ``int(round((size - crop) / 2))`` (Python rounding, half to even)."""
    left = int(round((width - crop_w) / 2.0))
    top = int(round((height - crop_h) / 2.0))
    return left, top, left + crop_w, top + crop_h


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def resize_shortest_center_crop(image: Image.Image, shortest: int, crop_h: int, crop_w: int,
                                resample: int = Image.BICUBIC) -> Image.Image:
    """torchvision ``Resize(shortest)`` + ``CenterCrop`` on a PIL image (what CLIP/BLIP/ImageReward use)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != shortest:
        new_long = int(shortest * long / short)
        new_w, new_h = (shortest, new_long) if w <= h else (new_long, shortest)
        image = image.resize((new_w, new_h), resample=resample)
    w, h = image.size
    if (w, h) != (crop_w, crop_h):
        if w < crop_w or h < crop_h:
            raise ValueError(f"image {w}x{h} smaller than the crop {crop_w}x{crop_h} after resizing")
        image = image.crop(center_crop_box(w, h, crop_w, crop_h))
    return image


def clip_pixel_values(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """Pixel values from a PIL-backend image processor, with torchvision's exact geometry.

    For a shortest-edge resize + center crop processor (CLIP style), the resize and crop are done here with
    torchvision's formulas (``transformers``' ``center_crop`` uses ``(size - crop) // 2``, which is one pixel
    off torchvision's ``round((size - crop) / 2)`` when the excess is 3 mod 4, e.g. 300x401 -> 224), and the
    processor then only rescales and normalises. Other processors (e.g. BLIP's fixed 384x384) run unchanged.
    """
    shortest = _size_get(getattr(processor, "size", None), "shortest_edge")
    crop = getattr(processor, "crop_size", None)
    crop_h, crop_w = _size_get(crop, "height"), _size_get(crop, "width")
    if (getattr(processor, "do_resize", False) and shortest and getattr(processor, "do_center_crop", False)
            and crop_h and crop_w):
        resample = processor.resample if processor.resample is not None else Image.BICUBIC
        prepared = [resize_shortest_center_crop(im, int(shortest), int(crop_h), int(crop_w), int(resample))
                    for im in images]
        out = processor(images=prepared, do_resize=False, do_center_crop=False, return_tensors="pt")
    else:
        out = processor(images=list(images), return_tensors="pt")
    return out["pixel_values"].to(torch.float32)


def clip_image_processor(image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                         std: Sequence[float] = OPENAI_CLIP_STD) -> Any:
    """The OpenAI CLIP preprocessing (Resize shortest side bicubic, CenterCrop, /255, Normalize) as a PIL processor."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size},
                                 resample=Image.BICUBIC, image_mean=list(mean), image_std=list(std))


# ---------------------------------------------------------------------------------------------------- heads


class MLPHead(nn.Module):
    """``input -> 1024 -> 128 -> 64 -> 16 -> 1`` linear stack with dropout and no activations.

    The LAION improved-aesthetic-predictor head and ImageReward's reward head share this layout (state-dict
    keys ``layers.{0,2,4,6,7}``); without nonlinearities it is one affine map in eval mode.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [input_size], b []) with ``forward(x) == x @ w + b`` in eval mode (the composed linear layers)."""
        w, b = None, None
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                lw, lb = layer.weight.double(), layer.bias.double()
                w, b = (lw, lb) if w is None else (lw @ w, lw @ b + lb)
        return w[0], b[0]


# ---------------------------------------------------------------------------------------------------- base


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype}: must be float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: must be one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def cast_modules(modules: Sequence[nn.Module | None], dtype: torch.dtype) -> None:
    for m in modules:
        if m is not None:
            m.to(dtype)


class Scorer:
    """Base class. Subclasses set ``name``/``needs_prompt``, implement ``requirements``, ``_load``,
    ``_score_batch`` and ``params``, and provide a ``from_components`` classmethod."""

    name: str = "scorer"
    higher_is_better: bool = True
    needs_prompt: bool = True

    def __init__(self, *, device: str | torch.device = "auto", dtype: Any = None, batch_size: int = 16,
                 local_files_only: bool | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
        self.batch_size = batch_size
        self.requested_dtype = parse_dtype(dtype)
        self._device_arg = device
        self.local_files_only = local_files_only
        self._loaded = False

    # ---- device / dtype
    @property
    def device(self) -> torch.device:
        if self._device_arg in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self._device_arg)

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The requested half dtype on CUDA; float32 otherwise."""
        if self.requested_dtype != torch.float32 and self.device.type != "cuda":
            if not getattr(self, "_warned_dtype", False):
                warnings.warn(f"{self.name}: dtype {self.requested_dtype} is only used on CUDA; running float32 on "
                              f"{self.device}", stacklevel=3)
                self._warned_dtype = True
            return torch.float32
        return self.requested_dtype

    @property
    def offline(self) -> bool:
        return hub_offline() if self.local_files_only is None else bool(self.local_files_only)

    # ---- weights
    def requirements(self) -> list[Requirement]:
        return []

    def available(self) -> tuple[bool, str]:
        """Cheap check (file/cache existence only): (True, what was found) or (False, why not + how to fix)."""
        if self._loaded:
            return True, f"{self.name}: loaded"
        reqs = self.requirements()
        results = [(r, *check_requirement(r, self.offline)) for r in reqs]
        missing = [r for r, ok, _ in results if not ok]
        if missing:
            return False, str(missing_error(self.name, missing, self.offline))
        found = "; ".join(where for _, _, where in results) or "no weights needed"
        return True, f"{self.name}: {found}"

    def load(self) -> "Scorer":
        if not self._loaded:
            missing = [r for r in self.requirements() if not check_requirement(r, self.offline)[0]]
            if missing:
                raise missing_error(self.name, missing, self.offline)
            try:
                self._load()
            except ScorerWeightsMissing:
                raise
            except OSError as err:  # transformers' "can't find / not cached" errors
                raise ScorerWeightsMissing(self.name, "; ".join(f"{r.what}: {r.source}" for r in self.requirements()),
                                           f"loading failed with {type(err).__name__}: {err}") from err
            self._loaded = True
        return self

    def _load(self) -> None:
        raise NotImplementedError

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"local_files_only": self.offline}

    # ---- scoring
    def _check_prompts(self, prompts: Sequence[str] | None, n: int) -> list[str] | None:
        if prompts is None:
            if self.needs_prompt:
                raise ValueError(f"{self.name} needs one prompt per image; got prompts=None")
            return None
        if isinstance(prompts, str):
            raise TypeError(f"{self.name}: prompts must be a list of strings, not a single string")
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{self.name}: {n} images but {len(prompts)} prompts; need one each")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"{self.name}: prompts must be strings; got {type(p).__name__}")
        return prompts

    def score(self, images: Any, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Raw per-sample scores, float32 [N] on the CPU."""
        pil = to_pil_images(images)
        texts = self._check_prompts(prompts, len(pil))
        if not pil:
            return torch.zeros(0, dtype=torch.float32)
        self.load()
        out = []
        with torch.inference_mode():
            for i in range(0, len(pil), self.batch_size):
                batch_texts = texts[i:i + self.batch_size] if texts is not None else None
                values = self._score_batch(pil[i:i + self.batch_size], batch_texts)
                out.append(values.detach().to("cpu", torch.float32).reshape(-1))
        result = torch.cat(out)
        if result.shape != (len(pil),):
            raise RuntimeError(f"{self.name}: produced {tuple(result.shape)} scores for {len(pil)} images")
        return result

    __call__ = score

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    # ---- identity
    def params(self) -> dict[str, Any]:
        """What defines this scorer's numbers (sources, version, constants) - record it next to the scores."""
        return {}

    def describe(self) -> dict[str, Any]:
        effective = self.requested_dtype if self.device.type == "cuda" else torch.float32
        return {"name": self.name, "higher_is_better": self.higher_is_better, "needs_prompt": self.needs_prompt,
                "device": str(self.device), "backbone_dtype": str(self.requested_dtype).removeprefix("torch."),
                "effective_backbone_dtype": str(effective).removeprefix("torch."), **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}(name={self.name!r}{', ' if args else ''}{args})"

    # ---- helpers for subclasses
    def _mark_loaded(self) -> "Scorer":
        self._loaded = True
        return self



class WeightlessScorer(Scorer):
    """A scorer computed from the pixels alone (JPEG size, ink coverage): nothing to load or inject."""

    def _load(self) -> None:
        pass

    @classmethod
    def from_components(cls, **kw: Any) -> "WeightlessScorer":
        """No components to inject; for interface uniformity."""
        return cls(**kw)._mark_loaded()


def scores_as_decimals(scores: torch.Tensor) -> list[float]:
    """Each float32 score as the float64 of its shortest decimal repr (``str(np.float32(s))``), for storing.

    The shortest repr round-trips to the same float32, so order and ties are exactly the float32 scores', and a
    float32 that holds a short decimal gives that decimal back: a JPEG size of 12.345 kB is stored as 12.345,
    not as the float32's exact binary value 12.345000267028809.
    """
    return [float(str(s)) for s in scores.detach().to("cpu", torch.float32).numpy()]


def as_float_features(out: Any) -> torch.Tensor:
    """transformers 5 returns ``BaseModelOutputWithPooling`` from ``get_*_features``; older versions a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(p=2, dim=-1, keepdim=True)
