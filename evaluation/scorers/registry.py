"""Scorers by name: ``get_scorer(name, **kwargs)``, ``scorer_names()``, ``available(name, **kwargs)``.

| name | class | value | needs |
|---|---|---|---|
| ``clip_score`` | CLIPScorer | ``max(100*cos, 0)`` per sample (torchmetrics' formula) | openai/clip-vit-large-patch14 |
| ``clip_cosine`` | CLIPCosineScorer | raw ``cos`` | openai/clip-vit-large-patch14 |
| ``pickscore`` | PickScorer | ``logit_scale.exp()*cos`` | yuvalkirstain/PickScore_v1 + laion CLIP-H processor |
| ``laion_aesthetic`` (``aesthetic``) | LaionAestheticScorer | MLP(normalised CLIP-L/14 embedding) | CLIP-L/14 + head |
| ``blip_itc`` (``blip``) | BlipITCScorer | ITC cosine, model_large.pth @224: "BLIP score" | model_large.pth, BERT tok |
| ``blip_itm`` | BlipITMScorer | ITM probability | Salesforce/blip-itm-large-coco |
| ``image_reward`` | ImageRewardScorer | normalised ImageReward | THUDM/ImageReward (+ bert-base-uncased) |
| ``hpsv2.0`` / ``hpsv2.1`` | HPSv2Scorer | ``cos`` of HPSv2 v2.0 / v2.1 | xswu/HPSv2 file (+ laion CLIP-H tokenizer) |
| ``jpeg_compressibility`` | JpegCompressibilityScorer | ``-kB`` at JPEG q95 | nothing |
| ``jpeg_incompressibility`` | JpegIncompressibilityScorer | ``+kB`` at JPEG q95 | nothing |

Keyword arguments go to the scorer's constructor (sources, ``device``, ``dtype``, ``batch_size``,
``local_files_only``, ...). Constructing a scorer loads nothing; ``available`` checks files/caches only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from evaluation.scorers.base import Scorer

ALIASES = {"blip": "blip_itc", "aesthetic": "laion_aesthetic"}


def _factories() -> dict[str, Callable[..., Scorer]]:
    from evaluation.scorers.aesthetic import LaionAestheticScorer
    from evaluation.scorers.blip import BlipITCScorer, BlipITMScorer
    from evaluation.scorers.clip_score import CLIPCosineScorer, CLIPScorer
    from evaluation.scorers.hpsv2 import HPSv2Scorer
    from evaluation.scorers.image_reward import ImageRewardScorer
    from evaluation.scorers.jpeg import JpegCompressibilityScorer, JpegIncompressibilityScorer
    from evaluation.scorers.pickscore import PickScorer

    def hps(version: str) -> Callable[..., Scorer]:
        def make(**kw: Any) -> Scorer:
            return HPSv2Scorer(version, **kw)
        make.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p for name, p in inspect.signature(HPSv2Scorer.__init__).parameters.items()
             if name not in ("self", "version")])
        return make

    return {
        "clip_score": CLIPScorer,
        "clip_cosine": CLIPCosineScorer,
        "pickscore": PickScorer,
        "laion_aesthetic": LaionAestheticScorer,
        "blip_itc": BlipITCScorer,
        "blip_itm": BlipITMScorer,
        "image_reward": ImageRewardScorer,
        "hpsv2.0": hps("v2.0"),
        "hpsv2.1": hps("v2.1"),
        "jpeg_compressibility": JpegCompressibilityScorer,
        "jpeg_incompressibility": JpegIncompressibilityScorer,
    }


_CANONICAL = ("clip_score", "clip_cosine", "pickscore", "laion_aesthetic", "blip_itc", "blip_itm", "image_reward",
              "hpsv2.0", "hpsv2.1", "jpeg_compressibility", "jpeg_incompressibility")
NO_WEIGHTS = ("jpeg_compressibility", "jpeg_incompressibility")


def scorer_names(include_aliases: bool = True) -> list[str]:
    """Valid names for ``get_scorer`` (sorted)."""
    return sorted(_CANONICAL + (tuple(ALIASES) if include_aliases else ()))


def canonical_name(name: str) -> str:
    if name in ALIASES:
        return ALIASES[name]
    if name not in _CANONICAL:
        hint = " (HPSv2 needs its version: hpsv2.0 or hpsv2.1)" if name.lower().startswith("hps") else ""
        raise ValueError(f"unknown scorer {name!r}{hint}; valid names: {', '.join(scorer_names())}")
    return name


def _allowed_params(factory: Callable[..., Scorer]) -> list[str]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = [p for n, p in inspect.signature(target).parameters.items() if n != "self"]
    names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names + ["device", "dtype", "batch_size", "local_files_only"]


def get_scorer(name: str, **kwargs: Any) -> Scorer:
    """A scorer by registry name (aliases allowed). Nothing is loaded until its first ``score``."""
    factory = _factories()[canonical_name(name)]
    allowed = _allowed_params(factory)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"scorer {name!r}: unknown arguments {unknown}; allowed: {', '.join(sorted(set(allowed)))}")
    return factory(**kwargs)


def available(name: str, **kwargs: Any) -> tuple[bool, str]:
    """(usable?, reason) from file/cache existence only - no model is loaded. Unknown names raise ValueError;
    bad arguments (e.g. a checkpoint of the wrong HPSv2 version) give (False, the error)."""
    canonical_name(name)
    try:
        scorer = get_scorer(name, **kwargs)
    except ValueError as err:
        return False, str(err)
    return scorer.available()
