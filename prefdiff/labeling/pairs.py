"""Group scores -> preference pairs, and the whole label step over a trajectory store.

The judge is any scorer of ``prefdiff.scorers`` (``label.judge``): the JPEG-size task of the first round, or a
learned scorer ranking the candidates, the Diffusion-DPO paper's AI-feedback setting.
D3PO (Yang et al. 2024) compares images generated from the same prompt, so pairs never cross groups:
each group of G images yields all C(G, 2) pairs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from prefdiff.data.preferences import LabelSummary, PreferencePair, summarize, write_preferences
from prefdiff.scorers import Scorer, get_scorer, scorer_arguments, scores_as_decimals

if TYPE_CHECKING:
    from prefdiff.data.trajectories import TrajectoryStore

__all__ = [
    "LabelSummary", "judge_metadata", "judge_scorer", "label_trajectories", "pairs_from_groups", "score_trajectories",
    "summarize",
]


def judge_scorer(name: str, args: Mapping[str, Any], jpeg_quality: int) -> Scorer:
    """Scorer ``name`` built with ``args`` (``label.judge_args``); a scorer that takes a JPEG ``quality`` (the
    JPEG-size scorers) gets ``label.jpeg_quality``. Unknown names/arguments raise ValueError listing the valid ones."""
    kwargs = dict(args)
    if "quality" in scorer_arguments(name):
        if "quality" in kwargs:
            raise ValueError(f"judge {name!r}: quality={kwargs['quality']!r} in the judge's arguments; "
                             "set label.jpeg_quality instead")
        kwargs["quality"] = jpeg_quality
    return get_scorer(name, **kwargs)


def pairs_from_groups(
    groups: list[dict], scores: Mapping[int, float], *, higher_is_better: bool = True, tie_margin: float = 0.0
) -> list[PreferencePair]:
    """All C(G,2) pairs per group (itertools.combinations over ``image_ids`` in order).

    The better score wins (higher, unless ``higher_is_better=False``); scores within ``tie_margin`` of each
    other (``|a - b| <= tie_margin``; 0: exactly equal) give ``tie=True`` with winner/loser the two ids
    ascending: a judge's near-equal scores are no preference, and ties are not trained on. Scores are stored
    as given (not negated).
    """
    if not (math.isfinite(tie_margin) and tie_margin >= 0):
        raise ValueError(f"tie_margin={tie_margin!r}: must be a finite number >= 0")
    pairs: list[PreferencePair] = []
    for g in groups:
        for a, b in itertools.combinations(g["image_ids"], 2):
            sa, sb = _score(scores, a), _score(scores, b)
            if abs(sa - sb) <= tie_margin:
                win, lose, tie = min(a, b), max(a, b), True
            else:
                a_better = sa > sb if higher_is_better else sa < sb
                win, lose, tie = (a, b, False) if a_better else (b, a, False)
            pairs.append(
                PreferencePair(
                    group_id=int(g["group_id"]), prompt=str(g["prompt"]), winner=int(win), loser=int(lose),
                    winner_score=_score(scores, win), loser_score=_score(scores, lose), tie=tie,
                )
            )
    return pairs


def _score(scores: Mapping[int, float], image_id: int) -> float:
    if image_id not in scores:
        raise KeyError(f"image_id {image_id}: no score (scored ids: {len(scores)})")
    s = float(scores[image_id])
    if not math.isfinite(s):  # NaN compares false both ways and would silently pick a winner
        raise ValueError(f"image_id {image_id}: score {s} is not finite")
    return s


def score_trajectories(
    store: TrajectoryStore,
    judge: Scorer,
    *,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """Score every final PNG of ``store`` with ``judge`` in batches: ``{image_id: score}``.

    Scores are their float32 values' shortest decimals (``scores_as_decimals``): the same order and ties as
    the float32 scores, and JPEG sizes exact in kB. ``progress`` receives lines like "scored 64/90 images"
    (default: print).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    report = progress or print
    n = store.num_images
    scores: dict[int, float] = {}
    for start in range(0, n, batch_size):
        ids = list(range(start, min(start + batch_size, n)))
        images = []
        for i in ids:
            with Image.open(store.png_path(i)) as im:
                images.append(im.convert("RGB"))  # decode now; the file handle closes here
        batch = judge.score(images, [store.prompt_of(i) for i in ids])
        if len(batch) != len(ids):
            raise ValueError(f"judge {judge.name!r} returned {len(batch)} scores for {len(ids)} images")
        scores.update(zip(ids, scores_as_decimals(batch)))
        report(f"scored {len(scores)}/{n} images")
    return scores


def judge_metadata(judge: Scorer) -> dict[str, Any]:
    """What a preference dataset's index records about its judge."""
    return {"name": judge.name, "higher_is_better": bool(judge.higher_is_better), "params": judge.params()}


def label_trajectories(
    store: TrajectoryStore,
    judge: Scorer,
    out_dir: Path,
    *,
    batch_size: int = 64,
    tie_margin: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Score every final PNG with ``judge`` (:func:`score_trajectories`), build pairs (``tie_margin``: see
    :func:`pairs_from_groups`), write the dataset.

    Returns the index path; the counts are ``PreferenceStore.open(out_dir).summary()``.
    """
    scores = score_trajectories(store, judge, batch_size=batch_size, progress=progress)
    pairs = pairs_from_groups(store.groups(), scores, higher_is_better=judge.higher_is_better,
                              tie_margin=tie_margin)
    return write_preferences(Path(out_dir), pairs, judge=judge_metadata(judge), trajectories=store)
