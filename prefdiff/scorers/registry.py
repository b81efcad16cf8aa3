"""Scorers by name: ``get_scorer(name, **kwargs)``, ``scorer_names()``, ``available(name, **kwargs)``.

The names and where each scorer lives are ``prefdiff.catalog.SCORERS`` (+ ``SCORER_ALIASES``); a new scorer is
one module here plus one line there.

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

from prefdiff.catalog import SCORER_ALIASES, SCORERS, resolve
from prefdiff.scorers.base import Scorer


def scorer_names() -> list[str]:
    """Valid names for ``get_scorer``, aliases included (sorted)."""
    return sorted([*SCORERS, *SCORER_ALIASES])


def canonical_name(name: str) -> str:
    """The ``SCORERS`` name of ``name`` (an alias resolved); unknown names raise ValueError listing the valid ones."""
    if name in SCORER_ALIASES:
        return SCORER_ALIASES[name]
    if name not in SCORERS:
        hint = " (HPSv2 needs its version: hpsv2.0 or hpsv2.1)" if name.lower().startswith("hps") else ""
        raise ValueError(f"unknown scorer {name!r}{hint}; valid names: {', '.join(scorer_names())}")
    return name


def scorer_arguments(name: str) -> list[str]:
    """The keyword arguments scorer ``name`` accepts (its own, then the common ``Scorer`` ones)."""
    factory: Callable[..., Scorer] = resolve(SCORERS[canonical_name(name)])
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = [p for n, p in inspect.signature(target).parameters.items() if n != "self"]
    names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names + [n for n in inspect.signature(Scorer.__init__).parameters if n != "self" and n not in names]


def get_scorer(name: str, **kwargs: Any) -> Scorer:
    """A scorer by registry name (aliases allowed). Nothing is loaded until its first ``score``."""
    allowed = scorer_arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"scorer {name!r}: unknown arguments {unknown}; allowed: {', '.join(sorted(set(allowed)))}")
    return resolve(SCORERS[canonical_name(name)])(**kwargs)


def available(name: str, **kwargs: Any) -> tuple[bool, str]:
    """(usable?, reason) from file/cache existence only - no model is loaded. Unknown names raise ValueError;
    bad arguments (e.g. a checkpoint of the wrong HPSv2 version) give (False, the error)."""
    canonical_name(name)
    try:
        scorer = get_scorer(name, **kwargs)
    except ValueError as err:
        return False, str(err)
    return scorer.available()
