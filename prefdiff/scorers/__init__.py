"""Every scorer behind one interface: ``score(images, prompts) -> float32 [N]`` of raw per-sample values.

The same scorers judge the label stage's groups (``label.judge``) and report in evaluation (``evaluate.judge``,
``evaluate.scorers``). ``base.py`` holds the interface, ``registry.py`` resolves names from
``prefdiff.catalog.SCORERS``. A leaf package: it imports only the core of prefdiff (``prefdiff.catalog``,
``prefdiff.data``), and importing it does not import transformers; scorer modules import it when used.
"""

from prefdiff.scorers.base import Scorer, ScorerWeightsMissing, scores_as_decimals, to_pil_images
from prefdiff.scorers.registry import available, canonical_name, get_scorer, scorer_arguments, scorer_names

__all__ = ["Scorer", "ScorerWeightsMissing", "available", "canonical_name", "get_scorer", "scorer_arguments",
           "scorer_names", "scores_as_decimals", "to_pil_images"]
