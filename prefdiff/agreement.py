"""Several annotators per item: majority vote and chance-corrected agreement (Cohen's and Fleiss' κ).

Label matrices are ``[n_items, n_annotators]`` arrays of numbers. For pairwise preferences the
convention is ``1`` = the first image (A) preferred, ``0`` = the second (B) preferred, ``0.5`` = the
annotator called it a tie; any other finite numbers are allowed as categories too (e.g. ``0/1`` for
"tag present"). A missing label (annotator did not see the item) is ``missing`` (default ``-1``) or NaN.

Pure numpy; nothing is fitted. Formulas:

* Cohen (1960): ``κ = (p_o - p_e) / (1 - p_e)``, ``p_o`` = fraction of items both raters put in the
  same category, ``p_e = Σ_k p_A(k) p_B(k)`` from each rater's own marginals (what
  ``sklearn.metrics.cohen_kappa_score`` computes without weights).
* Fleiss (1971): ``P_i = (Σ_j n_ij² - n) / (n (n-1))``, ``P̄ = mean_i P_i``, ``p_j = Σ_i n_ij / (N n)``,
  ``P̄_e = Σ_j p_j²``, ``κ = (P̄ - P̄_e) / (1 - P̄_e)``; every item needs the same number ``n >= 2`` of
  ratings. With two raters it equals Scott's π (pooled marginals), not Cohen's κ.

Both return ``nan`` when chance agreement is 1 (every rating in one category): κ is 0/0 there.

Pure math with no project imports, so it sits in the bottom layer: the label stage's combination of
several people (:mod:`prefdiff.labeling.human`, below the evaluation suite) and the evaluation suite both
use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["cohens_kappa", "fleiss_kappa", "fleiss_kappa_from_labels", "label_counts", "majority_vote"]


def _labels_2d(labels, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: must be 2-D [n_items, n_annotators], got shape {arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{name}: contains inf; use {-1} or NaN for a missing label")
    return arr


def _present(arr: np.ndarray, missing: float) -> np.ndarray:
    return ~(np.isnan(arr) | (arr == missing))


def majority_vote(
    labels: Sequence[Sequence[float]] | np.ndarray,
    *,
    missing: float = -1,
    rule: Literal["plurality", "decisive"] = "plurality",
    tie_value: float = 0.5,
) -> np.ndarray:
    """Per-item outcome of several annotators' labels; returns a float array ``[n_items]``.

    Missing labels (``missing`` or NaN) are ignored; an item with no label at all gives NaN.

    ``rule="plurality"`` (default, any categories): the most frequent label of the item. When two or
    more labels share the top count (e.g. one annotator says A, one says B; or A, B, tie) the result
    is ``tie_value`` (0.5 = "tie" for preference labels). A unanimous or majority ``0.5`` stays 0.5.

    ``rule="decisive"`` (preference labels 0 / 0.5 / 1 only): tie votes abstain and the side with more
    decisive votes wins: 1 if ``#1 > #0``, 0 if ``#0 > #1``, else ``tie_value``. Equivalent to
    thresholding the mean vote at 1/2 (a 0.5 vote pulls neither way), so ``[1, 0.5, 0.5]`` gives 1
    here but 0.5 under plurality.
    """
    arr = _labels_2d(labels)
    present = _present(arr, missing)
    out = np.full(arr.shape[0], np.nan)
    if rule == "decisive":
        vals = arr[present]
        bad = ~np.isin(vals, (0.0, 0.5, 1.0))
        if bad.any():
            raise ValueError(f"labels: value {vals[bad][0]!r} not allowed with rule='decisive'; use 0, 0.5, 1")
        ones = ((arr == 1.0) & present).sum(axis=1)
        zeros = ((arr == 0.0) & present).sum(axis=1)
        any_vote = present.any(axis=1)
        out[any_vote] = tie_value
        out[any_vote & (ones > zeros)] = 1.0
        out[any_vote & (zeros > ones)] = 0.0
        return out
    if rule != "plurality":
        raise ValueError(f"rule={rule!r}: use 'plurality' or 'decisive'")
    for i in range(arr.shape[0]):
        vals = arr[i][present[i]]
        if vals.size == 0:
            continue
        cats, counts = np.unique(vals, return_counts=True)
        top = counts == counts.max()
        out[i] = cats[top][0] if top.sum() == 1 else tie_value
    return out


def cohens_kappa(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    missing: float = -1,
) -> float:
    """Cohen's κ between two annotators' labels of the same items (unweighted; any categories).

    Items where either label is missing (``missing`` or NaN) are dropped. Categories are the union of
    the labels seen. ``nan`` when no item is left or when ``p_e = 1`` (both raters used one and the
    same single category: agreement cannot be told from chance).
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"cohens_kappa: a has length {x.size} but b has length {y.size}; they must be equal")
    keep = _present(x, missing) & _present(y, missing)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return float("nan")
    cats = np.union1d(x, y)
    pa = np.array([(x == c).mean() for c in cats])
    pb = np.array([(y == c).mean() for c in cats])
    p_o = float((x == y).mean())
    p_e = float(pa @ pb)
    if np.isclose(p_e, 1.0, rtol=0.0, atol=1e-12):
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: Sequence[Sequence[int]] | np.ndarray) -> float:
    """Fleiss' κ from a count table ``counts[i, j]`` = number of raters who put item i in category j.

    Every row must sum to the same ``n >= 2`` (raters need not be the same people across items).
    ``nan`` when ``P̄_e = 1`` (all ratings in one category).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"counts: must be a non-empty 2-D [n_items, n_categories] table, got shape {c.shape}")
    if (c < 0).any() or not np.all(c == np.round(c)):
        raise ValueError("counts: must be non-negative integers")
    per_item = c.sum(axis=1)
    n = per_item[0]
    if not np.all(per_item == n):
        bad = int(np.flatnonzero(per_item != n)[0])
        raise ValueError(f"counts: item {bad} has {int(per_item[bad])} ratings but item 0 has {int(n)}; "
                         "Fleiss' kappa needs the same number of ratings per item")
    if n < 2:
        raise ValueError(f"counts: each item has {int(n)} rating(s); Fleiss' kappa needs at least 2")
    p_i = ((c * c).sum(axis=1) - n) / (n * (n - 1.0))
    p_bar = float(p_i.mean())
    p_j = c.sum(axis=0) / (c.shape[0] * n)
    p_e = float((p_j * p_j).sum())
    if np.isclose(p_e, 1.0, rtol=0.0, atol=1e-12):
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)


def label_counts(
    labels: Sequence[Sequence[float]] | np.ndarray,
    *,
    categories: Sequence[float] | None = None,
    missing: float = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(counts [n_items, n_categories], categories)`` from a label matrix; missing labels not counted.

    ``categories`` defaults to the sorted distinct non-missing labels; a label outside a given list
    raises ValueError.
    """
    arr = _labels_2d(labels)
    present = _present(arr, missing)
    cats = np.unique(arr[present]) if categories is None else np.asarray(categories, dtype=np.float64)
    stray = present & ~np.isin(arr, cats)
    if stray.any():
        raise ValueError(f"labels: value {arr[stray][0]!r} is not in categories {cats.tolist()}")
    counts = np.zeros((arr.shape[0], cats.size), dtype=np.int64)
    for j, c in enumerate(cats):
        counts[:, j] = ((arr == c) & present).sum(axis=1)
    return counts, cats


def fleiss_kappa_from_labels(
    labels: Sequence[Sequence[float]] | np.ndarray,
    *,
    categories: Sequence[float] | None = None,
    missing: float = -1,
    drop_incomplete: bool = False,
) -> float:
    """Fleiss' κ from a ``[n_items, n_annotators]`` label matrix (see :func:`label_counts`).

    Fleiss' κ needs the same number of ratings per item: with missing labels either pass
    ``drop_incomplete=True`` (keep only the items every annotator labelled) or get a ValueError.
    """
    arr = _labels_2d(labels)
    if drop_incomplete:
        arr = arr[_present(arr, missing).all(axis=1)]
        if arr.shape[0] == 0:
            raise ValueError("labels: no item was labelled by every annotator (drop_incomplete=True)")
    counts, _ = label_counts(arr, categories=categories, missing=missing)
    return fleiss_kappa(counts)
