"""Simulated annotators: a judge's preference seen through Bradley-Terry noise, for testing human-feedback
paths (several annotators, noisy and position-biased choices, intransitive labels) without people.

The model (Bradley & Terry 1952, the choice model behind reward learning from human comparisons).
Annotator k has an accuracy ``a_k`` in (0.5, 1) and a position bias ``b_k`` (log-odds added in favour of
the image shown first, e.g. on the left). The judge gives each image a utility u = its score (or -score for a
judge where lower is better). Shown a pair of one prompt group as (first, second), k chooses the first with

    P(first) = sigmoid((u_first - u_second) / tau_k + b_k)                                                (1)

where tau_k > 0 is k's temperature. tau_k is calibrated on the pairs k labels: with margins
m = |u_a - u_b|, float64 [n] over the n pairs the judge decides (m > 0), tau_k solves

    (1/n) * sum_i sigmoid(m_i / tau_k) = a_k                                                              (2)

i.e. with b_k = 0 the expected share of k's choices that agree with the judge is exactly a_k. The left side
falls strictly from 1 (tau -> 0) to 0.5 (tau -> inf), so (2) has one root; it lies in
[min m / logit(a_k), max m / logit(a_k)] (every term >= a_k at the lower end, <= a_k at the upper end) and
is found by bisection in log tau. Pairs the judge ties (m = 0) stay out of (2): they carry no preference to
agree with (counted as 0.5 agreement they would cap the reachable accuracy at 1 - share_of_ties / 2), and
on them (1) reduces to sigmoid(b_k). A person always picks one, so every simulated pair is decided
(tie=False), judge ties included. If the judge ties every pair there is nothing to follow: ValueError.

Groups go to annotators round-robin (group_id % K for K annotators); k decides every C(G, 2) pair of its
groups independently, so its labels may be intransitive, as people's are. For each pair, which image is
shown first and the choice are two uniform draws that are a pure function of (seed, k, group_id, the two
image ids) through SHA-256, so labels are reproducible and do not depend on the order groups are processed
in, and the position bias is not aligned with image ids.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prefdiff.data.preferences import PreferencePair, write_preferences
from prefdiff.labeling.pairs import judge_metadata, pairs_from_groups, score_trajectories

if TYPE_CHECKING:
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.scorers import Scorer

# Assignment rule recorded in the dataset index (what ``simulate_annotators`` does).
ASSIGNMENT = "group_id % number of annotators"
_BISECTION_STEPS = 200  # each halves log(hi / lo); the loop stops earlier at relative width 1e-13


@dataclass(frozen=True)
class Annotator:
    """One simulated person: ``accuracy`` in (0.5, 1) and position ``bias`` (log-odds for the first shown)."""

    accuracy: float
    bias: float = 0.0

    def __post_init__(self) -> None:
        if not 0.5 < self.accuracy < 1.0:  # also refuses NaN
            raise ValueError(f"annotator accuracy {self.accuracy!r}: must be strictly between 0.5 (a coin flip) "
                             "and 1 (the judge itself)")
        if not math.isfinite(self.bias):
            raise ValueError(f"annotator bias {self.bias!r}: must be a finite log-odds")


@dataclass(frozen=True)
class AnnotatorReport:
    """What annotator ``annotator`` did (counts over the pairs of its groups)."""

    annotator: int
    accuracy: float
    bias: float
    temperature: float | None  # tau of Eq. (1); None when the judge decides none of its pairs
    num_groups: int
    num_pairs: int
    num_judge_ties: int  # pairs the judge scored equal: decided by the bias alone
    num_agree: int  # pairs the judge decides where the annotator chose the judge's preferred image
    num_first: int  # pairs where the image shown first was chosen
    expected_first: float  # sum over its pairs of P(first) of Eq. (1): what num_first should be near

    @property
    def num_decided_by_judge(self) -> int:
        return self.num_pairs - self.num_judge_ties

    @property
    def agreement(self) -> float | None:
        """Share of the judge-decided pairs where the annotator agreed with the judge (None: no such pair)."""
        n = self.num_decided_by_judge
        return self.num_agree / n if n else None

    def as_json(self) -> dict[str, Any]:
        return {"annotator": self.annotator, "accuracy": self.accuracy, "bias": self.bias,
                "temperature": self.temperature, "num_groups": self.num_groups, "num_pairs": self.num_pairs,
                "num_judge_ties": self.num_judge_ties, "num_agree": self.num_agree, "num_first": self.num_first,
                "agreement": self.agreement}


@dataclass(frozen=True)
class SimulatedLabels:
    """The annotators' pairs (in ``pairs_from_groups`` order), the image shown first per pair, and reports."""

    pairs: list[PreferencePair]
    shown_first: list[int]  # aligned with pairs
    reports: list[AnnotatorReport]  # one per annotator, in index order

    @property
    def agreement(self) -> float | None:
        """All annotators together: agreeing choices / pairs the judge decides (None: no such pair)."""
        decided = sum(r.num_decided_by_judge for r in self.reports)
        return sum(r.num_agree for r in self.reports) / decided if decided else None


@dataclass
class _Tally:
    groups: set[int] = field(default_factory=set)
    pairs: int = 0
    ties: int = 0
    agree: int = 0
    first: int = 0
    p_first: list[float] = field(default_factory=list)  # summed with math.fsum: exact, in any order


def sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def calibrate_temperature(margins: Sequence[float], accuracy: float) -> float:
    """tau solving Eq. (2): mean_i sigmoid(margins_i / tau) = accuracy, for judge margins > 0.

    Deterministic: the margins are sorted first, so the result does not depend on their order.
    """
    Annotator(accuracy)  # the accuracy check
    m = np.sort(np.asarray(margins, dtype=np.float64))
    if m.size == 0:
        raise ValueError("no judge margins to calibrate on: the judge decides none of the pairs")
    if not (np.all(np.isfinite(m)) and m[0] > 0):
        raise ValueError(f"judge margins must be finite and > 0 (judge ties stay out); got min {m[0]}, max {m[-1]}")
    logit = math.log(accuracy / (1.0 - accuracy))
    lo, hi = float(m[0]) / logit, float(m[-1]) / logit

    def expected_agreement(tau: float) -> float:
        return float(np.mean(1.0 / (1.0 + np.exp(-m / tau))))

    for _ in range(_BISECTION_STEPS):
        mid = math.sqrt(lo * hi)
        if hi / lo - 1.0 <= 1e-13 or not lo < mid < hi:
            break
        if expected_agreement(mid) > accuracy:  # too faithful to the judge: more noise, larger tau
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def probability_first(difference: float, temperature: float | None, bias: float) -> float:
    """P(first) of Eq. (1) for ``difference`` = u_first - u_second; with no temperature (the judge decides
    none of the annotator's pairs) the bias alone decides."""
    return sigmoid((difference / temperature if temperature is not None else 0.0) + bias)


def uniforms(seed: int, annotator: int, group_id: int, id_a: int, id_b: int) -> tuple[float, float]:
    """Two uniforms in [0, 1) (which image is shown first, the choice), a pure function of the integers.

    SHA-256 of their 8-byte little-endian encodings, as ``prefdiff.training.fit.rng`` seeds its
    generators: the same draws in every process and Python version. 53 bits each, a float64's precision.
    """
    digest = hashlib.sha256(struct.pack("<5q", seed, annotator, group_id, id_a, id_b)).digest()
    return ((int.from_bytes(digest[0:8], "little") >> 11) * 2.0**-53,
            (int.from_bytes(digest[8:16], "little") >> 11) * 2.0**-53)


def simulate_annotators(
    groups: Sequence[Mapping[str, Any]],
    scores: Mapping[int, float],
    annotators: Sequence[Annotator],
    *,
    seed: int,
    higher_is_better: bool = True,
    judge_name: str = "the judge",
) -> SimulatedLabels:
    """Every C(G, 2) pair of every group decided by annotator ``group_id % len(annotators)`` by Eq. (1).

    ``groups`` and ``scores`` as for :func:`prefdiff.labeling.pairs.pairs_from_groups` (same pair order).
    Each pair's winner is the chosen image; its scores are the judge's scores of the winner and the loser as
    given (so the winner may have the worse score); ``tie`` is False; ``annotator`` is the index.
    """
    if not annotators:
        raise ValueError("no annotators: give at least one, e.g. [Annotator(accuracy=0.85)]")
    judged = pairs_from_groups(list(groups), scores, higher_is_better=higher_is_better)
    if judged and all(p.tie for p in judged):
        raise ValueError(f"{judge_name} scored both images of all {len(judged)} pairs equally: the simulated "
                         "annotators have no preference to follow (is the judge constant on these images?)")
    k_of = [p.group_id % len(annotators) for p in judged]
    temperatures: list[float | None] = []
    for k, annotator in enumerate(annotators):
        margins = [abs(p.winner_score - p.loser_score) for p, kp in zip(judged, k_of) if kp == k and not p.tie]
        temperatures.append(calibrate_temperature(margins, annotator.accuracy) if margins else None)

    pairs: list[PreferencePair] = []
    shown_first: list[int] = []
    tallies = [_Tally() for _ in annotators]
    for p, k in zip(judged, k_of):
        low, high = min(p.winner, p.loser), max(p.winner, p.loser)
        u_position, u_choice = uniforms(seed, k, p.group_id, low, high)
        first, second = (low, high) if u_position < 0.5 else (high, low)
        # utility difference u_first - u_second: the judge's margin, signed by who is shown first
        margin = abs(p.winner_score - p.loser_score)
        difference = 0.0 if p.tie else (margin if first == p.winner else -margin)
        p_first = probability_first(difference, temperatures[k], annotators[k].bias)
        chosen, other = (first, second) if u_choice < p_first else (second, first)
        score = {p.winner: p.winner_score, p.loser: p.loser_score}
        pairs.append(PreferencePair(group_id=p.group_id, prompt=p.prompt, winner=chosen, loser=other,
                                    winner_score=score[chosen], loser_score=score[other], tie=False, annotator=k))
        shown_first.append(first)
        t = tallies[k]
        t.groups.add(p.group_id)
        t.pairs += 1
        t.ties += int(p.tie)
        t.agree += int(not p.tie and chosen == p.winner)
        t.first += int(chosen == first)
        t.p_first.append(p_first)
    reports = [
        AnnotatorReport(annotator=k, accuracy=a.accuracy, bias=a.bias, temperature=temperatures[k],
                        num_groups=len(t.groups), num_pairs=t.pairs, num_judge_ties=t.ties, num_agree=t.agree,
                        num_first=t.first, expected_first=math.fsum(t.p_first))
        for k, (a, t) in enumerate(zip(annotators, tallies))
    ]
    return SimulatedLabels(pairs=pairs, shown_first=shown_first, reports=reports)


def label_with_annotators(
    store: TrajectoryStore,
    judge: Scorer,
    annotators: Sequence[Annotator],
    out_dir: Path,
    *,
    seed: int,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> SimulatedLabels:
    """The label step with simulated annotators: score every image with ``judge``
    (:func:`~prefdiff.labeling.pairs.score_trajectories`), let the annotators choose, write the dataset.

    The index records the judge as for judge labels, plus ``annotators`` (model, seed, assignment and each
    annotator's settings, calibrated temperature and counts).
    """
    scores = score_trajectories(store, judge, batch_size=batch_size, progress=progress)
    labels = simulate_annotators(store.groups(), scores, annotators, seed=seed,
                                 higher_is_better=judge.higher_is_better, judge_name=f"judge {judge.name!r}")
    meta = {"model": "bradley_terry", "seed": seed, "assignment": ASSIGNMENT,
            "annotators": [r.as_json() for r in labels.reports]}
    write_preferences(Path(out_dir), labels.pairs, judge=judge_metadata(judge), trajectories=store, annotators=meta)
    return labels


__all__ = [
    "ASSIGNMENT", "Annotator", "AnnotatorReport", "SimulatedLabels", "calibrate_temperature", "label_with_annotators",
    "probability_first", "sigmoid", "simulate_annotators", "uniforms",
]
