"""Digit accuracy: how often a sample shows the digit its prompt names (the built-in ``digits`` model's quality).

The evaluate stage adds it when every evaluation prompt names one digit (``prefdiff.prompts.prompted_digit``).
A sample is correct when the ``digit_alignment`` scorer's classifier gives the prompted digit its highest
probability (argmax; an exact tie goes to the lower digit, as ``numpy.argmax`` does). Per model, over N
samples with C correct:

* ``accuracy = C / N``; ``*_low`` / ``*_high``: the 95% prompt-clustered percentile bootstrap of the mean of
  the 0/1 correctness (``evaluation.stats.cluster_bootstrap_ci``; the seeds of one prompt are not independent
  trials), the headline interval as for the win-rate; ``*_wilson_low`` / ``*_wilson_high``: Wilson on C of N
  (``evaluation.stats.wilson_interval``), treating every sample as independent.
* ``gain = trained - base`` with the same bootstrap on the per-sample difference. Baseline, trained and gain
  use one seed, so they are computed on the same resampled prompts (a paired comparison).
* ``per_digit``: for each digit named by some prompt, the number of samples and both accuracies.

Plus :func:`digit_sample_grid`: one row per digit, baseline samples then the trained samples of the same seeds,
each labelled with the classifier's prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from evaluation.grid import paired_rows_grid
from evaluation.stats import cluster_bootstrap_ci, wilson_interval
from prefdiff.prompts import prompted_digit

__all__ = ["DIGIT_SCORER", "GRID_TILE_MIN_SIDE", "accuracy_rows", "digit_accuracy", "digit_sample_grid",
           "per_digit_rows", "predicted_digits", "prompted_digits"]

DIGIT_SCORER = "digit_alignment"  # the scorer whose classifier decides which digit a sample shows
GRID_TILE_MIN_SIDE = 64  # px: smaller samples are enlarged (nearest neighbour, whole factor) so a person can see them
RIGHT, WRONG = (0, 110, 0), (200, 0, 0)  # label colours: the classifier reads the prompted digit, or another one


def prompted_digits(prompts: Sequence[str]) -> list[int] | None:
    """The digit each prompt names, or None when some prompt names no digit (or several): then the evaluation
    is not a digit evaluation and reports no digit accuracy."""
    try:
        return [prompted_digit(p) for p in prompts]
    except ValueError:
        return None


def predicted_digits(probabilities: Any) -> np.ndarray:
    """[N] int64: the most probable digit of each row of ``probabilities`` [N, 10]."""
    p = np.asarray(probabilities)
    if p.ndim != 2 or p.shape[1] != 10:
        raise ValueError(f"probabilities: shape {p.shape}; expected [N, 10] (one probability per digit 0-9)")
    return p.argmax(axis=1).astype(np.int64)


def digit_accuracy(prompted: Sequence[int], base_pred: Sequence[int], trained_pred: Sequence[int],
                   prompts: Sequence[str], *, n_boot: int, seed: int, confidence: float = 0.95) -> dict[str, Any]:
    """The ``digit_accuracy`` block of metrics/eval.json (definitions: module docstring). Index i is one
    (prompt, seed) sample; ``prompts[i]`` is its cluster for the bootstrap."""
    target = np.asarray(prompted, dtype=np.int64)
    n = int(target.size)
    if n == 0:
        raise ValueError("prompted: empty; digit accuracy needs at least one sample")
    for name, pred in (("base_pred", base_pred), ("trained_pred", trained_pred), ("prompts", prompts)):
        if len(pred) != n:
            raise ValueError(f"digit_accuracy: {name} has length {len(pred)} but prompted has {n}; they must be equal")
    correct = {"base": (np.asarray(base_pred) == target).astype(np.float64),
               "trained": (np.asarray(trained_pred) == target).astype(np.float64)}
    out: dict[str, Any] = {"n": n, "n_prompts": len(set(prompts)), "interval": "prompt-clustered bootstrap"}
    for side, ok in correct.items():
        low, high = cluster_bootstrap_ci(ok, prompts, np.mean, n_boot=n_boot, confidence=confidence, seed=seed)
        wilson_low, wilson_high = wilson_interval(float(ok.sum()), n, confidence)
        out |= {side: float(ok.mean()), f"{side}_low": low, f"{side}_high": high,
                f"{side}_wilson_low": wilson_low, f"{side}_wilson_high": wilson_high}
    gain = correct["trained"] - correct["base"]
    gain_low, gain_high = cluster_bootstrap_ci(gain, prompts, np.mean, n_boot=n_boot, confidence=confidence, seed=seed)
    out |= {"gain": float(gain.mean()), "gain_low": gain_low, "gain_high": gain_high}
    # keyed by the digit (a string: JSON keys) so the flat metric names read digit_accuracy/per_digit/7/base
    out["per_digit"] = {str(d): {"n": int((target == d).sum()), "base": float(correct["base"][target == d].mean()),
                                 "trained": float(correct["trained"][target == d].mean())}
                        for d in sorted(set(target.tolist()))}
    return out


def accuracy_rows(block: dict[str, Any], baseline: str) -> list[dict[str, Any]]:
    """The report's digit-accuracy table: baseline, trained and their difference, each with its intervals."""
    rows = [{"model": label, "accuracy": block[side], "ci": (block[f"{side}_low"], block[f"{side}_high"]),
             "ci_wilson": (block[f"{side}_wilson_low"], block[f"{side}_wilson_high"]), "n": block["n"]}
            for label, side in ((baseline, "base"), ("trained", "trained"))]
    rows.append({"model": f"trained - {baseline}", "accuracy": block["gain"],
                 "ci": (block["gain_low"], block["gain_high"]), "ci_wilson": None, "n": block["n"]})
    return rows


def per_digit_rows(block: dict[str, Any], baseline: str) -> list[dict[str, Any]]:
    """The report's per-digit table: digit, samples, baseline accuracy, trained accuracy."""
    return [{"digit": int(d), "n": m["n"], f"{baseline} accuracy": m["base"], "trained accuracy": m["trained"]}
            for d, m in block["per_digit"].items()]


def _enlarged(im: Image.Image, min_side: int) -> Image.Image:
    factor = -(-min_side // min(im.size))  # ceil: the smallest whole factor reaching min_side
    return im if factor <= 1 else im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)


def digit_sample_grid(base_images: Sequence[Image.Image], trained_images: Sequence[Image.Image],
                      prompted: Sequence[int], base_pred: Sequence[int], trained_pred: Sequence[int],
                      order: Sequence[int], *, per_digit: int, baseline: str = "base",
                      min_side: int = GRID_TILE_MIN_SIDE) -> Image.Image:
    """One row per prompted digit (ascending): the first ``per_digit`` samples of that digit in ``order``
    (sample indices), baseline then trained of the same seeds, each labelled ``pred <digit>`` (green when it is
    the prompted digit, red otherwise). A digit with fewer samples than the longest row is padded with blank tiles."""
    if per_digit < 1:
        raise ValueError(f"per_digit={per_digit!r}: must be >= 1")
    digits = sorted(set(int(d) for d in prompted))
    chosen = {d: [i for i in order if prompted[i] == d][:per_digit] for d in digits}
    width = max(len(c) for c in chosen.values())
    tile = _enlarged(base_images[0], min_side)
    blank = Image.new("RGB", tile.size, (255, 255, 255))

    def side(images: Sequence[Image.Image], pred: Sequence[int]):
        """(tiles, labels, label colours), one row per digit, padded to ``width``."""
        rows, labels, colors = [], [], []
        for d in digits:
            missing = width - len(chosen[d])
            rows.append([_enlarged(images[i], min_side) for i in chosen[d]] + [blank] * missing)
            labels.append([f"pred {int(pred[i])}" for i in chosen[d]] + [""] * missing)
            colors.append([RIGHT if int(pred[i]) == d else WRONG for i in chosen[d]] + [RIGHT] * missing)
        return rows, labels, colors

    base_rows, base_labels, base_colors = side(base_images, base_pred)
    trained_rows, trained_labels, trained_colors = side(trained_images, trained_pred)
    return paired_rows_grid(base_rows, trained_rows, row_labels=[f"digit {d}" for d in digits],
                            base_labels=base_labels, trained_labels=trained_labels, base_title=baseline,
                            trained_title="trained", base_label_colors=base_colors,
                            trained_label_colors=trained_colors)
