"""Small statistics for base-vs-trained evaluation (pure; numpy only at import).

Conventions
-----------
* Scores are "higher is better" by default (a scorer whose raw value is lower-is-better says so);
  ``paired_outcomes`` and ``win_rate_summary`` take ``higher_is_better=False`` for raw lower-is-better scores.
* Intervals are two-sided at ``confidence`` (default 0.95).
* Win rate counts a tie as half a win: ``win_rate = (W + T/2) / (W + L + T)``.

Win-rate methodology: paired comparison on the
same (prompt, seed); outcome per pair with a tie margin; report W/L/T, ``(W + T/2)/N`` and ``W/(W+L)``;
Wilson intervals; a prompt-clustered percentile bootstrap (resample prompts, all seeds of a prompt
together) because seeds of one prompt are not independent; a two-sided sign test on W vs L with ties
dropped; optionally Wilcoxon / paired t on the raw score differences. :func:`win_rate_summary` does all
of it in one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = [
    "MeanCI", "WinRate", "WinRateSummary", "cluster_bootstrap_ci", "mean_ci", "paired_outcomes", "sign_test",
    "wilson_interval", "win_rate", "win_rate_summary",
]


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
    higher_is_better: bool = True,
) -> np.ndarray:
    """Per-pair outcome of trained vs base scores.

    Returns int array: +1 (trained wins) where ``trained - base > tie_margin``, -1 where
    ``< -tie_margin``, 0 (tie) where ``|trained - base| <= tie_margin``. With
    ``higher_is_better=False`` (e.g. a loss or a file size) the difference is ``base - trained``, so
    +1 still means "trained is better". Pairs are matched by index (same prompt, seed).
    """
    if not tie_margin >= 0:  # also rejects NaN
        raise ValueError(f"tie_margin={tie_margin!r}: must be >= 0")
    t = _as_1d(trained, "trained")
    b = _as_1d(base, "base")
    if t.size != b.size:
        raise ValueError(f"paired_outcomes: trained has length {t.size} but base has length {b.size}; they must be equal")
    diff = t - b if higher_is_better else b - t
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


# --------------------------------------------------------------------------------------------------
# sign test, cluster bootstrap, full paired summary


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of ``wins`` vs ``losses`` (ties already dropped), H0: P(win) = 1/2.

    With ``n = wins + losses`` and ``k = min(wins, losses)``:
    ``p = min(1, 2 * sum_{i=0..k} C(n, i) / 2**n)``, computed exactly in integers. For p0 = 1/2 the
    binomial is symmetric, so this equals ``scipy.stats.binomtest(wins, n, 0.5).pvalue`` (which sums
    all outcomes no more likely than the observed one). ``wins == losses`` gives 1.0.
    ``n = 0`` (no decisive pair) gives 1.0: no evidence against H0.
    """
    for name, v in (("wins", wins), ("losses", losses)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name}={v!r}: must be a non-negative integer")
    wins, losses = int(wins), int(losses)
    n = wins + losses
    k = min(wins, losses)
    if n == 0 or 2 * k == n:
        return 1.0
    term, tail = 1, 1  # C(n, 0)
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i  # C(n, i), exact
        tail += term
    return min(1.0, (2 * tail) / (1 << n))  # int / int: correctly rounded float even for huge n


def _cluster_codes(clusters: Sequence[Hashable], n: int, name: str = "clusters") -> np.ndarray:
    """Map arbitrary hashable cluster labels to 0..G-1 in order of first appearance (deterministic)."""
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"{name}: has length {len(labels)} but the values have length {n}; they must be equal")
    mapping: dict = {}
    return np.fromiter((mapping.setdefault(c, len(mapping)) for c in labels), dtype=np.int64, count=n)


def _boot_index_chunks(rng: np.random.Generator, n_clusters: int, n_boot: int):
    """Resampled cluster indices, [chunk, n_clusters] at a time (bounded memory, same stream for any stat)."""
    rows = max(1, min(n_boot, 4_000_000 // max(n_clusters, 1)))
    done = 0
    while done < n_boot:
        m = min(rows, n_boot - done)
        yield rng.integers(0, n_clusters, size=(m, n_clusters))
        done += m


def cluster_bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[Hashable],
    stat: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(values)`` resampling whole clusters.

    Each of ``n_boot`` resamples draws G clusters (G = number of distinct labels in ``clusters``) with
    replacement and applies ``stat`` to the concatenated values of the drawn clusters (a cluster drawn
    twice contributes its values twice). The interval is the ``(1-confidence)/2`` and
    ``(1+confidence)/2`` quantiles (numpy "linear") of the resampled statistics. Deterministic for a
    given ``seed`` and input order (clusters are numbered by first appearance). With one value per
    cluster this is the ordinary iid percentile bootstrap. ``stat is np.mean`` takes a vectorised path
    (cluster sums / counts) that draws the same resamples as the generic path.
    """
    _check_confidence(confidence)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: must be a positive integer")
    x = _as_1d(values, "values")
    if x.size == 0:
        raise ValueError("values: empty; cluster_bootstrap_ci needs at least 1 value")
    codes = _cluster_codes(clusters, x.size)
    n_clusters = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot), dtype=np.float64)
    pos = 0
    if stat is np.mean:
        sums = np.bincount(codes, weights=x, minlength=n_clusters)
        counts = np.bincount(codes, minlength=n_clusters).astype(np.float64)
        for idx in _boot_index_chunks(rng, n_clusters, int(n_boot)):
            boots[pos:pos + len(idx)] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
            pos += len(idx)
    else:
        order = np.argsort(codes, kind="stable")
        members = np.split(x[order], np.cumsum(np.bincount(codes, minlength=n_clusters))[:-1])
        for idx in _boot_index_chunks(rng, n_clusters, int(n_boot)):
            for row in idx:
                boots[pos] = float(stat(np.concatenate([members[g] for g in row])))
                pos += 1
    alpha = 1.0 - confidence
    low, high = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


@dataclass(frozen=True)
class WinRateSummary:
    """Everything about "A vs B" on paired samples; see :func:`win_rate_summary` for definitions.

    Intervals are ``(low, high)`` tuples; ``nan`` marks a quantity that is undefined for the data
    (``decisive_rate`` without decisive pairs, ``wilcoxon_p`` without non-zero differences).
    """

    n: int
    n_prompts: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    win_rate_ci_wilson: tuple[float, float]
    win_rate_ci_bootstrap: tuple[float, float]
    decisive_rate: float
    decisive_rate_ci_wilson: tuple[float, float]
    sign_test_p: float
    mean_diff: float
    mean_diff_ci: tuple[float, float]
    wilcoxon_p: float
    tie_margin: float
    higher_is_better: bool
    confidence: float
    n_boot: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        """Flat ``{prefix + name: number}`` for metrics files; names are stable (part of the API).

        The prefix is prepended verbatim, so pass the separator yourself (``"pickscore_"``). Keys, in
        order: n, n_prompts, wins, losses, ties, win_rate, win_rate_wilson_low, win_rate_wilson_high,
        win_rate_boot_low, win_rate_boot_high, decisive_rate, decisive_rate_low, decisive_rate_high,
        sign_test_p, mean_diff, mean_diff_low, mean_diff_high, wilcoxon_p, tie_margin, confidence.
        """
        flat: dict[str, float | int] = {
            "n": self.n, "n_prompts": self.n_prompts, "wins": self.wins, "losses": self.losses, "ties": self.ties,
            "win_rate": self.win_rate,
            "win_rate_wilson_low": self.win_rate_ci_wilson[0], "win_rate_wilson_high": self.win_rate_ci_wilson[1],
            "win_rate_boot_low": self.win_rate_ci_bootstrap[0], "win_rate_boot_high": self.win_rate_ci_bootstrap[1],
            "decisive_rate": self.decisive_rate,
            "decisive_rate_low": self.decisive_rate_ci_wilson[0], "decisive_rate_high": self.decisive_rate_ci_wilson[1],
            "sign_test_p": self.sign_test_p,
            "mean_diff": self.mean_diff, "mean_diff_low": self.mean_diff_ci[0], "mean_diff_high": self.mean_diff_ci[1],
            "wilcoxon_p": self.wilcoxon_p, "tie_margin": self.tie_margin, "confidence": self.confidence,
        }
        return {f"{prefix}{k}": v for k, v in flat.items()}


def _wilcoxon_p(diff: np.ndarray) -> float:
    nonzero = diff[diff != 0.0]
    if nonzero.size == 0:
        return float("nan")
    import warnings

    from scipy.stats import wilcoxon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(wilcoxon(nonzero).pvalue)
        except ValueError:
            return float("nan")
    return p


def win_rate_summary(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    prompt_ids: Sequence[Hashable],
    *,
    tie_margin: float = 0.0,
    higher_is_better: bool = True,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> WinRateSummary:
    """Paired comparison of A (e.g. trained) against B (e.g. base); index i is one (prompt, seed).

    ``prompt_ids[i]`` names the prompt of pair i (any hashable); pairs sharing a prompt are one cluster.

    * outcomes: :func:`paired_outcomes` (``a`` is "trained"): win / loss / tie with ``tie_margin``.
    * ``win_rate = (W + T/2) / n``; ``win_rate_ci_wilson`` = Wilson on ``W + T/2`` of ``n`` (treats
      pairs as independent); ``win_rate_ci_bootstrap`` = :func:`cluster_bootstrap_ci` of the per-pair
      points (1 win, 1/2 tie, 0 loss) with ``prompt_ids`` as clusters — the interval to trust when
      a prompt has several seeds.
    * ``decisive_rate = W / (W + L)`` with a Wilson interval over ``W + L`` (nan if ``W + L = 0``).
    * ``sign_test_p`` = :func:`sign_test` (W, L) = ``scipy.stats.binomtest(W, W+L, 0.5).pvalue``.
    * ``mean_diff`` = mean of the raw ``a - b`` (score units, NOT flipped by ``higher_is_better``)
      with the paired Student-t interval of :func:`mean_ci`.
    * ``wilcoxon_p`` = two-sided ``scipy.stats.wilcoxon`` on the non-zero raw differences (nan if none).

    The sign test, Wilson intervals, t interval and Wilcoxon assume independent pairs; with several
    seeds per prompt they are optimistic — compare with the bootstrap interval.
    """
    _check_confidence(confidence)
    a = _as_1d(scores_a, "scores_a")
    b = _as_1d(scores_b, "scores_b")
    if a.size != b.size:
        raise ValueError(f"win_rate_summary: scores_a has length {a.size} but scores_b has length {b.size}")
    if a.size == 0:
        raise ValueError("scores_a: empty; win_rate_summary needs at least 1 pair")
    codes = _cluster_codes(prompt_ids, a.size, "prompt_ids")
    outcomes = paired_outcomes(a, b, tie_margin, higher_is_better=higher_is_better)
    wr = win_rate(outcomes, confidence)
    points = np.where(outcomes == 1, 1.0, np.where(outcomes == 0, 0.5, 0.0))
    boot = cluster_bootstrap_ci(points, codes, np.mean, n_boot=n_boot, confidence=confidence, seed=seed)
    decisive = wr.wins + wr.losses
    if decisive:
        decisive_rate = wr.wins / decisive
        decisive_ci = wilson_interval(wr.wins, decisive, confidence)
    else:
        decisive_rate, decisive_ci = float("nan"), (float("nan"), float("nan"))
    diff = a - b
    md = mean_ci(diff, confidence)
    return WinRateSummary(
        n=wr.n, n_prompts=int(codes.max()) + 1, wins=wr.wins, losses=wr.losses, ties=wr.ties,
        win_rate=wr.win_rate, win_rate_ci_wilson=(wr.low, wr.high), win_rate_ci_bootstrap=boot,
        decisive_rate=decisive_rate, decisive_rate_ci_wilson=decisive_ci,
        sign_test_p=sign_test(wr.wins, wr.losses),
        mean_diff=md.mean, mean_diff_ci=(md.low, md.high), wilcoxon_p=_wilcoxon_p(diff),
        tie_margin=float(tie_margin), higher_is_better=bool(higher_is_better), confidence=float(confidence),
        n_boot=int(n_boot),
    )
