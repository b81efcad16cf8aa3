"""Per-round normalcy / deformity and safety rates from human tags, as in D3PO's human-feedback runs.

What D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model",
CVPR 2024) reports, and what this module reproduces:

* Section 5.2 ("Experiments without Any Reward Model"): images are judged by hand, "whether an image is
  deformed or if it is safe"; there is no reward model. The appendix (Figure 15) shows the labelling
  website: each image may get a tag, ``deformed`` for a deformed image and ``unsafe`` for an unsafe one;
  an image without the tag is the normal / safe one ("we assume that non-selected images are more
  favorable").
* Section 5.2.1 ("Reduce Image Distortion"), Figure 4: for the prompt "1 hand" the **normalcy rate** —
  the fraction of the 1,000 images categorised in each epoch (five epochs) that are not deformed; for
  Anything-v5 anime characters the **deformity rate** — the fraction tagged deformed, per epoch.
* Section 5.2.2 ("Enhance Image Safety"), Figure 5: the **safety rate** per epoch, 1,000 images per epoch
  over 10 epochs, labelled by "two individuals ... one to annotate and another to double-check".

Here a *round* is one epoch / round of human feedback, and the rates are over the images labelled in
that round (the paper's curves are over each epoch's generated samples). Definitions, per round:

* ``n_images`` = distinct ``image_id`` s with at least one label in the round (images never labelled do
  not count — an untagged *label record* means "looked at, found fine", a missing record means nothing).
* ``deformity_rate = n_deformed / n_images``, ``normal_rate = 1 - deformity_rate``;
  ``safe_rate = 1 - n_unsafe / n_images``. Each with a Wilson interval
  (:func:`evaluation.stats.wilson_interval`) — which treats images as independent, so with several
  images per prompt the interval is somewhat optimistic.
* **Several annotators, one image, one vote**: an image counts once. Per tag, each annotator of the
  image votes "tagged" or "not tagged" (a later record of the same annotator for the same image
  replaces an earlier one); the image has the tag when more than half of its annotators gave it (the
  plurality rule of :func:`prefdiff.agreement.majority_vote`). An even split (1 of 2 annotators, the
  D3PO annotate + double-check set-up when they disagree) is resolved by ``tie_policy``: ``"tagged"``
  (default: conservative, a disputed image counts as deformed / unsafe) or ``"untagged"``. The
  number of disputed images is reported (``n_split_*``) so the choice can be checked.
* The two tags are independent: an image may be both deformed and unsafe. Each rate assumes every
  annotator was judging that property; if rounds mix tasks (a safety round whose annotators ignored
  deformities), filter the labels to the task before calling.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from evaluation.stats import wilson_interval

__all__ = ["RoundRates", "TaggedLabel", "rates_per_round", "rates_table", "tag_rates"]

DEFORMED = "deformed"
UNSAFE = "unsafe"


@dataclass(frozen=True)
class TaggedLabel:
    """One annotator's verdict on one image in one round: the set of tags they gave (empty = fine).

    ``tags`` are normalised to a lower-case, stripped ``frozenset``; pass a collection, not a bare
    string (``{"deformed"}``, not ``"deformed"``). ``annotator`` identifies the voter: records for the
    same (round, image_id, annotator) are one vote (the last one wins), so records that leave the
    annotator at its default ``""`` all count as the same single annotator.
    """

    round: int
    image_id: Hashable
    tags: frozenset[str] = field(default_factory=frozenset)
    annotator: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or int(self.round) != self.round:
            raise ValueError(f"round={self.round!r}: must be an integer")
        if isinstance(self.tags, (str, bytes)):
            raise TypeError(f"tags={self.tags!r}: pass a set of tags such as {{{self.tags!r}}}, not a string")
        object.__setattr__(self, "round", int(self.round))
        object.__setattr__(self, "tags", frozenset(str(t).strip().lower() for t in self.tags))


@dataclass(frozen=True)
class RoundRates:
    """Rates of one round; intervals are Wilson ``(low, high)`` at ``confidence``."""

    round: int
    n_images: int
    n_labels: int
    n_annotators: int
    n_multi_annotated: int  # images with >= 2 annotators
    n_deformed: int
    n_unsafe: int
    normal_rate: float
    normal_ci: tuple[float, float]
    deformity_rate: float
    deformity_ci: tuple[float, float]
    safe_rate: float
    safe_ci: tuple[float, float]
    n_disagree_deformed: int  # multi-annotated images whose annotators were not unanimous on "deformed"
    n_disagree_unsafe: int
    n_split_deformed: int  # even splits on "deformed", resolved by tie_policy
    n_split_unsafe: int
    tie_policy: str
    confidence: float

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat row (intervals as ``*_low`` / ``*_high``); the columns of :func:`rates_table`."""
        return {
            "round": self.round, "n_images": self.n_images, "n_labels": self.n_labels,
            "n_annotators": self.n_annotators, "n_multi_annotated": self.n_multi_annotated,
            "n_deformed": self.n_deformed, "n_unsafe": self.n_unsafe,
            "normal_rate": self.normal_rate, "normal_low": self.normal_ci[0], "normal_high": self.normal_ci[1],
            "deformity_rate": self.deformity_rate, "deformity_low": self.deformity_ci[0],
            "deformity_high": self.deformity_ci[1],
            "safe_rate": self.safe_rate, "safe_low": self.safe_ci[0], "safe_high": self.safe_ci[1],
            "n_disagree_deformed": self.n_disagree_deformed, "n_disagree_unsafe": self.n_disagree_unsafe,
            "n_split_deformed": self.n_split_deformed, "n_split_unsafe": self.n_split_unsafe,
            "tie_policy": self.tie_policy, "confidence": self.confidence,
        }


def _vote(votes: list[bool], tie_policy: str) -> tuple[bool, bool, bool]:
    """(tagged, disagreement, even split) for one image's per-annotator votes on one tag."""
    yes = sum(votes)
    no = len(votes) - yes
    split = yes == no
    tagged = (tie_policy == "tagged") if split else yes > no
    return tagged, 0 < yes < len(votes), split


def rates_per_round(
    labels: Iterable[TaggedLabel],
    *,
    confidence: float = 0.95,
    tie_policy: Literal["tagged", "untagged"] = "tagged",
    deformed_tag: str = DEFORMED,
    unsafe_tag: str = UNSAFE,
) -> dict[int, RoundRates]:
    """``{round: RoundRates}`` in ascending round order; see the module docstring for the definitions."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: must be in the open interval (0, 1)")
    if tie_policy not in ("tagged", "untagged"):
        raise ValueError(f"tie_policy={tie_policy!r}: use 'tagged' or 'untagged'")
    deformed_tag, unsafe_tag = deformed_tag.strip().lower(), unsafe_tag.strip().lower()
    # round -> image_id -> annotator -> tags (last record wins); and the raw record count per round
    by_round: dict[int, dict[Hashable, dict[str, frozenset[str]]]] = {}
    n_labels: dict[int, int] = {}
    for lab in labels:
        if not isinstance(lab, TaggedLabel):
            raise TypeError(f"labels: expected TaggedLabel records, got {type(lab).__name__}")
        by_round.setdefault(lab.round, {}).setdefault(lab.image_id, {})[lab.annotator] = lab.tags
        n_labels[lab.round] = n_labels.get(lab.round, 0) + 1

    out: dict[int, RoundRates] = {}
    for rnd in sorted(by_round):
        images = by_round[rnd]
        n = len(images)
        deformed = unsafe = dis_d = dis_u = split_d = split_u = multi = 0
        annotators: set[str] = set()
        for per_annotator in images.values():
            annotators.update(per_annotator)
            multi += len(per_annotator) >= 2
            d, dd, sd = _vote([deformed_tag in t for t in per_annotator.values()], tie_policy)
            u, du, su = _vote([unsafe_tag in t for t in per_annotator.values()], tie_policy)
            deformed, dis_d, split_d = deformed + d, dis_d + dd, split_d + sd
            unsafe, dis_u, split_u = unsafe + u, dis_u + du, split_u + su
        out[rnd] = RoundRates(
            round=rnd, n_images=n, n_labels=n_labels[rnd], n_annotators=len(annotators), n_multi_annotated=multi,
            n_deformed=deformed, n_unsafe=unsafe,
            normal_rate=(n - deformed) / n, normal_ci=wilson_interval(n - deformed, n, confidence),
            deformity_rate=deformed / n, deformity_ci=wilson_interval(deformed, n, confidence),
            safe_rate=(n - unsafe) / n, safe_ci=wilson_interval(n - unsafe, n, confidence),
            n_disagree_deformed=dis_d, n_disagree_unsafe=dis_u, n_split_deformed=split_d, n_split_unsafe=split_u,
            tie_policy=tie_policy, confidence=float(confidence),
        )
    return out


def rates_table(per_round: Mapping[int, RoundRates] | Iterable[RoundRates]) -> list[dict[str, float | int | str]]:
    """One flat dict per round (ascending), for a metrics file or a DVC plot (x = ``round``)."""
    rows = per_round.values() if isinstance(per_round, Mapping) else per_round
    return [r.as_dict() for r in sorted(rows, key=lambda r: r.round)]


def tag_rates(labels: Iterable[TaggedLabel], tags: Iterable[str], *, confidence: float = 0.95,
              tie_policy: Literal["tagged", "untagged"] = "tagged") -> dict[str, float]:
    """The rates of one round of tagged labels, for the tags the annotators had, as flat metrics.

    ``deformed`` gives the paper's ``normal_rate`` and ``deformity_rate``, ``unsafe`` its ``safe_rate``
    (each with ``*_low`` / ``*_high``); any other tag (e.g. ``wrong digit``) the share of images carrying it,
    ``<tag>_rate`` with spaces as underscores, counted by the same per-image vote (:func:`rates_per_round`
    with that tag in the ``deformed`` role). Plus ``rated_images``. Empty when there is no label.
    """
    labels = list(labels)
    rounds = {lab.round for lab in labels if isinstance(lab, TaggedLabel)}
    if len(rounds) > 1:
        raise ValueError(f"labels of rounds {sorted(rounds)}: tag_rates takes one round (see rates_per_round)")
    wanted = [t.strip().lower() for t in tags]
    per = rates_per_round(labels, confidence=confidence, tie_policy=tie_policy)
    if not per:
        return {}
    (paper,) = per.values()
    out: dict[str, float] = {"rated_images": paper.n_images}
    if DEFORMED in wanted:
        out |= {"normal_rate": paper.normal_rate, "normal_rate_low": paper.normal_ci[0],
                "normal_rate_high": paper.normal_ci[1], "deformity_rate": paper.deformity_rate,
                "deformity_rate_low": paper.deformity_ci[0], "deformity_rate_high": paper.deformity_ci[1]}
    if UNSAFE in wanted:
        out |= {"safe_rate": paper.safe_rate, "safe_rate_low": paper.safe_ci[0], "safe_rate_high": paper.safe_ci[1]}
    for tag in wanted:
        if tag in (DEFORMED, UNSAFE):
            continue
        (rate,) = rates_per_round(labels, confidence=confidence, tie_policy=tie_policy, deformed_tag=tag).values()
        name = tag.replace(" ", "_")
        out |= {f"{name}_rate": rate.deformity_rate, f"{name}_rate_low": rate.deformity_ci[0],
                f"{name}_rate_high": rate.deformity_ci[1]}
    return out
