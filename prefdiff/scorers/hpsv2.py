"""HPSv2 (Wu et al. 2023): cosine of a fine-tuned open_clip ViT-H-14, run as a transformers ``CLIPModel``.

``score = cos(image, text)`` with **no logit scale** (HPSv2's ``img_score.py``; typical values 0.2-0.3).

* Versions: ``v2.0`` (``HPS_v2_compressed.pt``) and ``v2.1`` (``HPS_v2.1_compressed.pt``) from the hub repo
  ``xswu/HPSv2``. Their scores are not comparable, so the version is part of the scorer's identity
  (registry names ``hpsv2.0`` / ``hpsv2.1``, ``params()["version"]``) and is never guessed: the constructor
  requires it, and a source whose version is detectable (the checkpoint's file name, or the ``hpsv2.json``
  manifest that ``scripts/convert_hpsv2.py`` writes) must declare the same version or loading is refused.
  Where the version is not detectable (a renamed file, a directory without manifest) the caller's declaration
  is used and ``params()["version_source"]`` says so.
* Weights: the open_clip state dict converted by ``convert_open_clip_state_dict`` (in memory from a ``.pt``,
  or once with ``scripts/convert_hpsv2.py`` into a ``save_pretrained`` directory). Architecture ViT-H-14:
  vision 32 x 1280 (16 heads of 80, patch 14, 224 px), text 24 x 1024 (16 heads), embed 1024, exact GELU,
  LayerNorm eps 1e-5.
* Images: HPSv2's ``preprocess_val`` = ``ToTensor`` -> ``ResizeMaxSize(224)`` -> ``Normalize(OpenAI)``: the
  float tensor is resized so its longest side is 224 (bicubic, ``antialias=True`` as torchvision >= 0.17
  does for tensors; set ``antialias=False`` to mimic older torchvision) and zero-padded (black) to a centred
  square. Implemented with ``torch.nn.functional.interpolate``, which is what torchvision calls. For square
  images this is a plain resize to 224 (on floats, so it is not the uint8 PIL resize of the CLIP processor).
* Text: the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` tokenizer (same BPE as open_clip's), 77 tokens with
  truncation that keeps the end-of-text token; pooling at the end-of-text token as open_clip does.
* HPSv2 itself runs under CUDA autocast; report fp32 numbers for parity checks.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prefdiff.scorers.base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Requirement, hub_cached_file,
                                   looks_like_path)
from prefdiff.scorers.clip_score import CLIPFamilyScorer
from prefdiff.scorers.convert import (ConversionReport, convert_open_clip_state_dict, load_checkpoint_file,
                                      load_strict, unwrap_state_dict)

HPSV2_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_HPSV2_REPO = "xswu/HPSv2"
DEFAULT_HPSV2_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MANIFEST = "hpsv2.json"


class HPSv2VersionMismatch(ValueError):
    """The source declares a different HPSv2 version than the scorer was asked for."""


def normalize_version(version: Any) -> str:
    v = str(version).strip().lower().removeprefix("hpsv").removeprefix("hps").removeprefix("v")
    v = {"2": "2.0", "2.0": "2.0", "2.1": "2.1"}.get(v)
    if v is None:
        raise ValueError(f"HPSv2 version {version!r}: must be 'v2.0' or 'v2.1' (scores are not comparable across "
                         "versions, so it is always explicit)")
    return f"v{v}"


def detect_hpsv2_version(name: str | os.PathLike) -> str | None:
    """Version from a checkpoint file name (``HPS_v2.1_compressed.pt`` -> v2.1, ``HPS_v2_compressed.pt`` /
    ``HPS_v2.pt`` -> v2.0), or None when the name says nothing."""
    base = os.path.splitext(os.path.basename(os.fspath(name)))[0]
    if re.search(r"hps_?v2\.1(?!\d)", base, re.IGNORECASE):
        return "v2.1"
    if re.search(r"hps_?v2(\.0)?(?![.\d])", base, re.IGNORECASE):
        return "v2.0"
    return None


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(os.path.expanduser(directory)) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def hpsv2_clip_config() -> Any:
    """open_clip ViT-H-14 as a transformers ``CLIPConfig``."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=1024),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024),
        projection_dim=1024)


def load_hpsv2_checkpoint(path: str | os.PathLike, *, config: Any = None) -> tuple[Any, ConversionReport]:
    """transformers ``CLIPModel`` from an (open_clip) HPSv2 checkpoint, strictly accounted."""
    from transformers import CLIPModel

    model = CLIPModel(config or hpsv2_clip_config())
    sd = unwrap_state_dict(load_checkpoint_file(path))
    converted, report = convert_open_clip_state_dict(sd, model.state_dict(), source=str(path))
    load_strict(model, converted)
    return model.eval(), report


def hps_pixel_values(images: list[Image.Image], image_size: int, *, antialias: bool = True,
                     mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                     std: tuple[float, ...] = OPENAI_CLIP_STD) -> torch.Tensor:
    """HPSv2's ``ToTensor -> ResizeMaxSize(image_size, fill=0) -> Normalize`` on RGB PIL images."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    out = []
    for im in images:
        t = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        h, w = t.shape[1:]
        scale = image_size / float(max(h, w))
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            t = F.interpolate(t[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)[0]
        h, w = t.shape[1:]
        if (h, w) != (image_size, image_size):
            pad_h, pad_w = image_size - h, image_size - w
            t = F.pad(t, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        out.append((t - mean_t) / std_t)
    return torch.stack(out)


class HPSv2Scorer(CLIPFamilyScorer):
    name = "hpsv2"

    def __init__(self, version: str, source: str | None = None, *, tokenizer: str = DEFAULT_HPSV2_TOKENIZER,
                 antialias: bool = True, max_length: int = 77, **kw: Any) -> None:
        self.version = normalize_version(version)
        source = DEFAULT_HPSV2_REPO if source is None else str(source)
        super().__init__(source, tokenizer, max_length=max_length, **kw)
        self.name = f"hpsv2.{self.version[-1]}"
        self.antialias = antialias
        self.conversion: dict | None = None
        self.version_source = "declared by caller"
        if self._kind() == "file":
            self._check_declared(detect_hpsv2_version(self.model_source), "checkpoint file name")

    # ---- where the weights are
    def _kind(self) -> str:
        if looks_like_path(self.model_source):
            return "dir" if Path(os.path.expanduser(self.model_source)).is_dir() else "file"
        return "hub"

    def _check_declared(self, found: str | None, how: str) -> None:
        if found is None:
            self.version_source = "declared by caller (not detectable from the source)"
            return
        if found != self.version:
            raise HPSv2VersionMismatch(f"{self.name}: the source {self.model_source} is HPSv2 {found} (from its {how}) "
                                       f"but the scorer was asked for {self.version}; HPSv2 versions are never "
                                       f"mixed - use hpsv2.{found[-1]} or the {self.version} checkpoint")
        self.version_source = how

    def check_version(self) -> None:
        kind = self._kind()
        if kind == "dir":
            manifest = read_manifest(self.model_source)
            declared = normalize_version(manifest["version"]) if manifest and "version" in manifest else None
            self._check_declared(declared, f"{MANIFEST} manifest")
        elif kind == "file":
            self._check_declared(detect_hpsv2_version(self.model_source), "checkpoint file name")
        else:
            self.version_source = f"hub file name {HPSV2_FILES[self.version]}"

    def _tokenizer_in_source(self) -> bool:
        path = Path(os.path.expanduser(self.model_source))
        return self._kind() == "dir" and any((path / n).is_file() for n in ("tokenizer.json", "vocab.json"))

    def requirements(self) -> list[Requirement]:
        hint = "or convert the checkpoint once with scripts/convert_hpsv2.py and pass source=<output dir>"
        kind = self._kind()
        if kind == "hub":
            reqs = [Requirement(f"HPSv2 {self.version} checkpoint", "hub_file", self.model_source, "source",
                                HPSV2_FILES[self.version], hint)]
        elif kind == "dir":
            reqs = [Requirement(f"converted HPSv2 {self.version} dir", "model", self.model_source, "source", None,
                                hint)]
        else:
            reqs = [Requirement(f"HPSv2 {self.version} checkpoint", "file", self.model_source, "source", None, hint)]
        if not self._tokenizer_in_source():
            reqs.append(Requirement("CLIP-H tokenizer", "tokenizer", self.processor_source, "tokenizer"))
        return reqs

    def available(self) -> tuple[bool, str]:
        try:
            self.check_version()
        except HPSv2VersionMismatch as err:
            return False, str(err)
        return super().available()

    def load(self) -> "HPSv2Scorer":
        if not self._loaded:
            self.check_version()
        return super().load()

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPModel

        kw = self._from_pretrained_kwargs()
        kind = self._kind()
        if kind == "dir":
            model = CLIPModel.from_pretrained(os.path.expanduser(self.model_source), dtype=torch.float32, **kw)
        else:
            if kind == "hub":
                from huggingface_hub import hf_hub_download

                filename = HPSV2_FILES[self.version]
                path = (hub_cached_file(self.model_source, filename)
                        or hf_hub_download(self.model_source, filename, **kw))
            else:
                path = os.path.expanduser(self.model_source)
            model, report = load_hpsv2_checkpoint(path)
            self.conversion = report.to_dict()
        tok_src = os.path.expanduser(self.model_source) if self._tokenizer_in_source() else self.processor_source
        self._setup(model, None, AutoTokenizer.from_pretrained(tok_src, **kw))

    @classmethod
    def from_components(cls, model: Any, image_processor: Any = None, tokenizer: Any = None, *,
                        version: str, **kw: Any) -> "HPSv2Scorer":
        """A loaded scorer around a prebuilt ``CLIPModel`` and CLIP tokenizer; ``version`` is required."""
        if tokenizer is None:
            raise ValueError("HPSv2Scorer.from_components needs a tokenizer")
        scorer = cls(version, **kw)
        scorer.model_source = scorer.processor_source = "from_components"
        scorer._setup(model, image_processor, tokenizer)
        return scorer._mark_loaded()

    # ---- scoring
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return hps_pixel_values(images, self.model.config.vision_config.image_size, antialias=self.antialias)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        return self.cosine(images, prompts)

    def params(self) -> dict[str, Any]:
        return {"version": self.version, "version_source": self.version_source, "source": self.model_source,
                "tokenizer": self.processor_source, "antialias": self.antialias, "max_length": self.max_length}


def _fixed_version(version: str) -> Any:
    """``HPSv2Scorer`` with ``version`` fixed, taking its other arguments (the registry checks them by signature)."""
    def make(**kw: Any) -> HPSv2Scorer:
        return HPSv2Scorer(version, **kw)

    own = inspect.signature(HPSv2Scorer.__init__).parameters.items()
    make.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p for name, p in own if name not in ("self", "version")])
    return make


# The registry's hpsv2.0 / hpsv2.1 (prefdiff.catalog.SCORERS): the version is part of the name, never guessed.
hpsv2_0 = _fixed_version("v2.0")
hpsv2_1 = _fixed_version("v2.1")
