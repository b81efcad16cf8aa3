"""Small statistics for base-vs-trained evaluation (pure; numpy only at import).

Conventions
-----------
* Scores are "higher is better" everywhere (judges flip sign themselves, see SPEC).
* Intervals are two-sided at ``confidence`` (default 0.95).
* Win rate counts a tie as half a win: ``win_rate = (W + T/2) / (W + L + T)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = ["MeanCI", "WinRate", "mean_ci", "paired_outcomes", "wilson_interval", "win_rate"]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: must be in the open interval (0, 1)")


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values (NaN/inf); only finite numbers are allowed")
    return arr


@dataclass(frozen=True)
class MeanCI:
    """Mean with a Student-t interval. ``std`` is the sample std (ddof=1; 0.0 when n=1)."""

    mean: float
    low: float
    high: float
    n: int
    std: float
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WinRate:
    """Win rate with ties counted as 1/2 and a Wilson interval on ``wins + ties/2`` out of ``n``."""

    win_rate: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Student-t confidence interval for the mean.

    ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the ddof=1 sample std —
    identical to ``scipy.stats.t.interval(confidence, n-1, loc=mean, scale=s/sqrt(n))``.
    n=1: the interval is degenerate (low = high = mean) and ``note`` says so.
    n=0: ValueError. Zero spread gives low = high = mean.
    """
    _check_confidence(confidence)
    x = _as_1d(values, "values")
    n = int(x.size)
    if n == 0:
        raise ValueError("values: empty; mean_ci needs at least 1 value")
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, mean, mean, 1, 0.0, note="n=1: no spread estimate, interval is degenerate")
    std = float(x.std(ddof=1))
    if std == 0.0:
        return MeanCI(mean, mean, mean, n, 0.0, note="zero spread: interval is degenerate")
    from scipy.stats import t  # scipy only when needed (keeps import light)

    half = float(t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n, std)


def paired_outcomes(
    trained: Sequence[float] | np.ndarray,
    base: Sequence[float] | np.ndarray,
    tie_margin: float = 0.0,
) -> np.ndarray:
    """Per-pair outcome of trained vs base scores (higher is better).

    Returns int array: +1 where ``trained - base > tie_margin``, -1 where ``< -tie_margin``,
    0 (tie) where ``|trained - base| <= tie_margin``. Pairs are matched by index (same prompt, seed).
    """
    if tie_margin < 0:
        raise ValueError(f"tie_margin={tie_margin!r}: must be >= 0")
    t = _as_1d(trained, "trained")
    b = _as_1d(base, "base")
    if t.size != b.size:
        raise ValueError(f"paired_outcomes: trained has length {t.size} but base has length {b.size}; they must be equal")
    diff = t - b
    out = np.zeros(diff.shape, dtype=np.int64)
    out[diff > tie_margin] = 1
    out[diff < -tie_margin] = -1
    return out


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p = successes / n``.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the two-sided normal
    quantile (1.959963984540054 at 95%). ``successes`` may be fractional (ties counted as 1/2).
    Matches ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` for integer k.
    """
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n={n!r}: wilson_interval needs n >= 1")
    if not 0.0 <= successes <= n:
        raise ValueError(f"successes={successes!r}: must be in [0, n={n}]")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # exact bounds at the edges (the closed form leaves ~1e-17 rounding residue there)
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def win_rate(outcomes: Sequence[int] | np.ndarray, confidence: float = 0.95) -> WinRate:
    """Win rate of trained over base from ``paired_outcomes`` (+1 win, -1 loss, 0 tie).

    Convention: a tie counts as half a win and half a loss, so
    ``win_rate = (W + T/2) / n`` with ``n = W + L + T``, and ``(low, high)`` is the Wilson
    interval on ``successes = W + T/2`` out of ``n``. 0.5 means "no better than base".
    Empty outcomes -> ValueError.
    """
    o = np.asarray(outcomes).reshape(-1)
    bad = ~np.isin(o, (-1, 0, 1))
    if bad.any():
        raise ValueError(f"outcomes: value {o[bad][0]!r} not allowed; use +1 (win), -1 (loss), 0 (tie)")
    wins, losses, ties = int((o == 1).sum()), int((o == -1).sum()), int((o == 0).sum())
    n = wins + losses + ties
    if n == 0:
        raise ValueError("outcomes: empty; win_rate needs at least 1 outcome")
    successes = wins + 0.5 * ties
    low, high = wilson_interval(successes, n, confidence)
    return WinRate(successes / n, low, high, wins, losses, ties, n)
