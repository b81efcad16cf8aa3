"""The champion gate: a pure decision between a candidate evaluation and the incumbent champion.

Numbers from two evaluations are comparable only under one evaluation protocol (the primary judge and its
parameters, the base model, sampling, prompts and seeds: ``evaluation.evaluate.evaluation_protocol``,
summarised by its fingerprint). The gate therefore compares the candidate's gate metric with

* the incumbent's stored value, when the incumbent was gated under the same protocol and metric;
* the incumbent's score *in the candidate's own evaluation*, when that evaluation used the incumbent as
  its baseline (``evaluate.baseline: champion``: both were scored under one protocol, paired);
* nothing, otherwise: the candidate cannot be ranked against the incumbent, becomes a challenger, and the
  decision says how to rank it (evaluate again with ``evaluate.baseline: champion``).

With no incumbent the bar is the base model's score in the same evaluation (``base_metric``). A candidate
is promoted only if it beats the bar by more than ``min_improvement``, and, when ``min_win_rate_low`` is
set, the lower end of the prompt-clustered bootstrap interval of its win-rate over the evaluation's
baseline exceeds it.

A non-finite number anywhere in the comparison (the candidate's value, the bar, the margin, the win-rate
bound the rule uses) is refused with ``GateInputError`` before any decision: a NaN compares false with
everything, so it would silently never promote (or, as a margin, never let anything promote), and a
version registered with such a number is not one the gate has judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROMOTE = "promote"
CHALLENGER = "challenger"
RE_EVALUATE = "re-evaluate"  # not comparable: registered as challenger until scored under one protocol


class GateInputError(ValueError):
    """A number the gate cannot judge (non-finite metric, bar or margin); the message names it."""


@dataclass(frozen=True)
class GateRule:
    metric: str  # key of metrics/eval.json, higher is better
    base_metric: str | None  # the baseline's score in the same evaluation (None: no bar for a first version)
    min_improvement: float = 0.0
    min_win_rate_low: float | None = None  # bootstrap lower bound of the win-rate that must be exceeded


@dataclass(frozen=True)
class Candidate:
    value: float  # metrics[rule.metric]
    protocol: str  # protocol fingerprint of its evaluation
    baseline_value: float | None  # metrics[rule.base_metric]: the baseline's score in the same evaluation
    baseline_version: int | None  # the champion version that was the baseline (None: the base model)
    win_rate_low: float | None  # bootstrap lower bound of the win-rate over that baseline


@dataclass(frozen=True)
class Incumbent:
    version: int
    value: float
    metric: str  # the gate metric it was gated on
    protocol: str | None  # None: registered without a protocol fingerprint (before fingerprints existed)


@dataclass(frozen=True)
class Decision:
    action: str  # PROMOTE | CHALLENGER | RE_EVALUATE
    compared_to: float | None  # the bar the value was compared with (None: nothing comparable)
    # "champion vN" | "champion vN (re-evaluated)" | "base" | "vN (this evaluation's baseline)" | "none"
    compared_with: str
    reason: str

    @property
    def promote(self) -> bool:
        return self.action == PROMOTE


def _short(fingerprint: str | None) -> str:
    return "none recorded" if not fingerprint else fingerprint[:12]


def _bar(candidate: Candidate, incumbent: Incumbent | None, rule: GateRule) -> tuple[float | None, str, str | None]:
    """(bar, what it is, why nothing is comparable or None)."""
    if incumbent is None:
        if rule.base_metric is None:
            return None, "none", None
        version = candidate.baseline_version
        return candidate.baseline_value, "base" if version is None else f"v{version} (this evaluation's baseline)", None
    if incumbent.protocol == candidate.protocol and incumbent.metric == rule.metric:
        return incumbent.value, f"champion v{incumbent.version}", None
    if candidate.baseline_version == incumbent.version and candidate.baseline_value is not None:
        return candidate.baseline_value, f"champion v{incumbent.version} (re-evaluated)", None
    differs = (f"gated on {incumbent.metric!r}, this run on {rule.metric!r}" if incumbent.metric != rule.metric
               else f"evaluated under protocol {_short(incumbent.protocol)}, this candidate under "
                    f"{_short(candidate.protocol)}")
    return None, "none", (f"champion v{incumbent.version} was {differs}: the numbers are not comparable. To rank "
                          f"this candidate against v{incumbent.version}, evaluate it with evaluate.baseline: "
                          f"champion (scores both under one protocol) and register again")


def _refuse_non_finite(what: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise GateInputError(f"{what} is {value!r}: the gate compares finite numbers only; "
                             "fix the evaluation (or the params) and run evaluate and register again")


def check_finite(candidate: Candidate, rule: GateRule) -> None:
    """``GateInputError`` naming the first non-finite number of this candidate or rule the gate would use."""
    _refuse_non_finite("register.min_improvement", float(rule.min_improvement))
    _refuse_non_finite("register.min_win_rate_low", rule.min_win_rate_low)
    _refuse_non_finite(f"the gate metric {rule.metric!r}", candidate.value)
    if rule.base_metric is not None:
        _refuse_non_finite(f"the base metric {rule.base_metric!r}", candidate.baseline_value)
    if rule.min_win_rate_low is not None:
        _refuse_non_finite("the win-rate's bootstrap lower bound 'win_rate_low'", candidate.win_rate_low)


def decide(candidate: Candidate, incumbent: Incumbent | None, rule: GateRule) -> Decision:
    """Promote, keep as challenger, or ask for a re-evaluation; the reason says which number decided.
    Raises ``GateInputError`` for a non-finite number (``check_finite``, and the incumbent's stored value)."""
    check_finite(candidate, rule)
    if incumbent is not None:
        _refuse_non_finite(f"champion v{incumbent.version}'s stored gate value", incumbent.value)
    bar, compared_with, incomparable = _bar(candidate, incumbent, rule)
    if incomparable is not None:
        return Decision(RE_EVALUATE, None, compared_with, incomparable)
    name = f"{rule.metric} {candidate.value!r}"
    if bar is not None and not candidate.value > bar + rule.min_improvement:
        return Decision(CHALLENGER, bar, compared_with,
                        f"{name} does not beat {compared_with} {bar!r} by more than {rule.min_improvement!r}")
    if rule.min_win_rate_low is not None:
        low = candidate.win_rate_low
        if low is None or not low > rule.min_win_rate_low:
            return Decision(CHALLENGER, bar, compared_with,
                            f"win-rate bootstrap lower bound {low!r} is not above {rule.min_win_rate_low!r}")
    beats = "no bar" if bar is None else f"beats {compared_with} {bar!r} by more than {rule.min_improvement!r}"
    return Decision(PROMOTE, bar, compared_with, f"{name} {beats}")
