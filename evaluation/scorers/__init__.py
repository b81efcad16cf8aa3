"""Evaluation scorers behind one interface: ``score(images, prompts) -> float32 [N]`` of raw per-sample values.

See ``evaluation/scorers/base.py`` for the interface and ``registry.py`` for the names. Importing this package
does not import transformers; scorer modules import it when used.
"""

from evaluation.scorers.base import Scorer, ScorerWeightsMissing, to_pil_images
from evaluation.scorers.registry import available, canonical_name, get_scorer, scorer_names

__all__ = ["Scorer", "ScorerWeightsMissing", "available", "canonical_name", "get_scorer", "scorer_names",
           "to_pil_images"]
