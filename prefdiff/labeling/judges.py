"""Judges: score final images; the label stage turns scores into preference pairs.

The JPEG judges are the DDPO/D3PO "compressibility" task (Black et al. 2023, sec. 6.1): the reward is the
size of the image encoded as JPEG. Both are oriented so that a HIGHER score is better:
``jpeg_incompressibility`` = +size_kB (prefer detailed images), ``jpeg_compressibility`` = -size_kB
(prefer simple, flat images). Size is ``buf.tell() / 1000`` (decimal kB) at JPEG quality 95.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class Judge(Protocol):
    name: str
    higher_is_better: bool
    params: dict[str, Any]  # recorded in the preference index so a label run is reproducible

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """float64 [N], one score per image (prompts may be ignored)."""
        ...


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (1 kB = 1000 bytes) of ``image`` as RGB JPEG at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def _check_quality(quality: Any) -> int:
    # PIL accepts 1..95 as meaningful (above 95 disables parts of the compressor); bool is not a quality.
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"judge param quality={quality!r}: must be an int in 1..95")
    return quality


class JpegSizeJudge:
    """Score = sign * JPEG size (kB). ``sign=+1``: incompressibility, ``sign=-1``: compressibility."""

    higher_is_better = True

    def __init__(self, name: str, sign: float, quality: int = 95) -> None:
        self.name = name
        self.sign = float(sign)
        self.quality = _check_quality(quality)
        self.params: dict[str, Any] = {"quality": self.quality}

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(prompts) != len(images):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts; need one each")
        return np.array([self.sign * jpeg_size_kb(im, self.quality) for im in images], dtype=np.float64)

    def __repr__(self) -> str:
        return f"JpegSizeJudge(name={self.name!r}, quality={self.quality})"


def jpeg_compressibility(quality: int = 95) -> JpegSizeJudge:
    return JpegSizeJudge("jpeg_compressibility", -1.0, quality)


def jpeg_incompressibility(quality: int = 95) -> JpegSizeJudge:
    return JpegSizeJudge("jpeg_incompressibility", +1.0, quality)


JUDGES: dict[str, Callable[..., Judge]] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


class ScorerJudge:
    """Any evaluation scorer (PickScore, ImageReward, aesthetic, CLIP, HPSv2, ...) as a label judge: the
    Diffusion-DPO paper's AI-feedback setting, where a scorer ranks the candidates instead of people."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.name = scorer.name
        self.higher_is_better = bool(scorer.higher_is_better)
        self.params: dict[str, Any] = dict(scorer.params())

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self.scorer.score(images, prompts).double().numpy()

    def __repr__(self) -> str:
        return f"ScorerJudge({self.scorer!r})"


def judge_names() -> list[str]:
    """The JPEG judges plus every evaluation scorer (``evaluation.scorers.registry``)."""
    from evaluation.scorers.registry import scorer_names

    return sorted(set(JUDGES) | set(scorer_names()))


def make_judge(name: str, **params: Any) -> Judge:
    """Build a judge; unknown names/params raise ValueError listing what is allowed.

    JPEG judges take ``quality``; a scorer judge takes its constructor's keyword arguments (sources,
    device, dtype, batch_size) and ignores ``quality``.
    """
    if name in JUDGES:
        factory = JUDGES[name]
        allowed = list(inspect.signature(factory).parameters)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"judge {name!r}: unknown params {unknown}; allowed: {', '.join(allowed) or '(none)'}")
        return factory(**params)
    if name not in judge_names():
        raise ValueError(f"unknown judge {name!r}; allowed: {', '.join(judge_names())}")
    from evaluation.scorers.registry import get_scorer

    params.pop("quality", None)
    return ScorerJudge(get_scorer(name, **params))
