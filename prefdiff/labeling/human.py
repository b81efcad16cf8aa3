"""People's labels -> preference pairs: read the label log, combine several annotators, measure agreement.

What D3PO (Yang et al., CVPR 2024) does with human feedback, and what this module reproduces:

* Eq. 14 (the loss, :mod:`prefdiff.training.losses`): a preference is a pair of images of the same prompt
  and initial noise (one prompt group of the trajectory store) with the official code's label h:
  h = [1, -1] (the first is better), [-1, 1] (the second) or [0, 0] (no preference, no gradient).
  *Pair mode* of the labeling page records exactly that choice: ``first`` / ``second`` / ``tie``.
* Sec. 5.2 and Appendix Fig. 15 (the labeling website): people do not rank; they *tag* images of a group
  (``deformed``, ``unsafe``; here any of ``label.human.tags``, e.g. ``wrong digit``) and "non-selected
  images are more favorable". *Tag mode*: within a group, every untagged image is preferred over every
  tagged image, and no order is assumed within either set (:func:`tag_mode_pairs`); a group where all or
  none of the images are tagged gives no pair.

The log (``label.human.log``, which the labeling page appends to; README "From labels to preferences") is
read by :class:`~prefdiff.labeling.label_log.LabelLog`, the one reader of the label-log contract, which the
labeling server replays too: its effective labels (label records no undo names) are the input here, and it
refuses, with one line naming the file and line, a log of another trajectory dataset or anything malformed
except a torn last line (no newline: never acknowledged), which it ignores. :func:`label_from_log` also
refuses a log made in another mode or with other tags than ``label.human``.

Several annotators (:func:`preferences_from_labels`). The unit is an *item*: one unordered image pair of a
group, ``(group_id, a, b)`` with ``a < b``. Each annotator of the group votes on the items it judged:
``1`` = a preferred, ``0`` = b preferred, ``0.5`` = no preference (the encoding of
:mod:`prefdiff.agreement`). Pair mode: the one pair shown. Tag mode: every C(G, 2) pair of the group —
untagged-vs-tagged pairs by the rule above, pairs within one set 0.5 (the annotator looked at both and
put them in the same set; counting that as no vote would let one annotator's tag outvote two who found
both images fine). The outcome is :data:`COMBINATION_RULE`: the plurality of the votes
(:func:`prefdiff.agreement.majority_vote`, ``rule="plurality"``); an item whose most frequent vote is 0.5
is a *tie* and an item with two or more most frequent votes an *even split*; both are dropped (no
preference to train on). A decided item is a :class:`~prefdiff.data.preferences.PreferencePair`
whose scores are the shares of the item's voters who preferred the winner / the loser (1 and 0 when one
annotator decided, whose index the pair then names). Only groups labeled by at least
``annotators_per_group`` annotators count; the others are left out and counted.

Agreement on the items of the counted groups: Cohen's kappa (two annotators, on the items both judged)
or Fleiss' kappa (three or more, on the items every annotator judged), categories {0, 0.5, 1}; and each
annotator's agreement with the outcome, over the items with at least two voters and a majority.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prefdiff.agreement import cohens_kappa, fleiss_kappa_from_labels, majority_vote
from prefdiff.data.preferences import PreferencePair, workspace_ref, write_preferences
from prefdiff.labeling.label_log import MODES, Label, LabelLog, LabelLogError, PairLabel

if TYPE_CHECKING:
    from prefdiff.data.trajectories import TrajectoryStore

__all__ = [
    "COMBINATION_RULE", "HUMAN_JUDGE", "HumanPreferences", "label_from_log", "label_votes", "preferences_from_labels",
    "tag_mode_pairs",
]

COMBINATION_RULE = (
    "per (group, unordered image pair): the plurality of the annotators' votes (a preferred | b preferred | "
    "no preference); a plurality of no preference is a tie and two or more equally frequent votes an even "
    "split, both dropped; only groups labeled by at least annotators_per_group annotators count"
)
# write_preferences records who chose as the dataset's judge
HUMAN_JUDGE = {"name": "human", "higher_is_better": True,
               "params": {"scores": "share of the pair's annotators preferring each image"}}
_MISSING = -1.0  # an annotator who did not judge the item (prefdiff.agreement's missing label)
_NO_MAJORITY = float("nan")  # majority_vote's tie_value: an even split

Item = tuple[int, int, int]  # (group_id, lower image id, higher image id)


# -- votes ---------------------------------------------------------------------------------------------------
def tag_mode_pairs(image_ids: Sequence[int], tagged: Iterable[int]) -> list[tuple[int, int]]:
    """D3PO Sec. 5.2 (Appendix Fig. 15): every untagged image of the group beats every tagged one.

    Returns ``(winner, loser)`` pairs, untagged in ``image_ids`` order, then tagged in that order; none when
    all or none are tagged. No order is assumed within the untagged or the tagged set.
    """
    marked = set(tagged)
    unmarked = [i for i in image_ids if i not in marked]
    return [(w, lo) for w in unmarked for lo in image_ids if lo in marked]


def label_votes(label: Label) -> dict[tuple[int, int], float]:
    """One annotator's votes ``{(a, b): v}`` (a < b; 1 = a preferred, 0 = b, 0.5 = no preference).

    Pair mode: the shown pair, by its D3PO label h for (first, second) (Sec. 4.1: [1,-1] / [-1,1] / [0,0]),
    whose first entry maps to the vote for the first image as (h0 + 1) / 2. Tag mode: every pair of the group;
    the untagged-over-tagged pairs of :func:`tag_mode_pairs` decided, the pairs within one set 0.5.
    """
    if isinstance(label, PairLabel):
        first, second = label.image_ids
        for_first = (label.h[0] + 1) / 2
        return {(min(first, second), max(first, second)): for_first if first < second else 1.0 - for_first}
    votes = {pair: 0.5 for pair in itertools.combinations(sorted(label.image_ids), 2)}
    for winner, loser in tag_mode_pairs(label.image_ids, label.tagged):
        votes[(min(winner, loser), max(winner, loser))] = 1.0 if winner < loser else 0.0
    return votes


# -- combination -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HumanPreferences:
    """The combined labels: the pairs to train on and what the combination measured."""

    pairs: list[PreferencePair]
    annotators: list[str]  # sorted; PreferencePair.annotator indexes this list
    mode: str
    groups_labeled: int  # groups with at least one effective label
    groups_left_out: int  # ... of them labeled by fewer than annotators_per_group annotators
    annotators_per_group: int
    items: int  # image pairs of the counted groups that someone judged
    ties_dropped: int  # items whose plurality vote is "no preference"
    splits_dropped: int  # items with two or more equally frequent votes
    kappa_kind: str | None  # "cohen" | "fleiss" | None (fewer than 2 annotators)
    kappa: float | None  # None: no shared item; nan: every vote in one category (kappa is 0/0)
    kappa_items: int  # the shared items it is computed on
    majority_agreement: dict[str, float | None]  # annotator -> share agreeing with the outcome (None: no item)
    majority_items: dict[str, int]  # annotator -> items with >= 2 voters and a majority that it judged
    labels_per_annotator: dict[str, int]  # effective labels in the counted groups
    tagged: list[tuple[str, int, frozenset[str]]]  # tag mode: (annotator, image_id, tags) in the counted groups

    @property
    def groups_used(self) -> int:
        return self.groups_labeled - self.groups_left_out

    def metadata(self, log: LabelLog) -> dict[str, Any]:
        """``index["annotators"]`` of the preference dataset: the rule, the log and the measurements."""
        return {
            "source": "human", "log": workspace_ref(log.path), "log_sha256": log.replayed_sha256,
            "dataset_sha256": log.header.dataset_sha256, "mode": self.mode, "tags": list(log.header.tags),
            "combination": COMBINATION_RULE, "annotators_per_group": self.annotators_per_group,
            "groups_labeled": self.groups_labeled, "groups_left_out": self.groups_left_out, "items": self.items,
            "ties_dropped": self.ties_dropped, "splits_dropped": self.splits_dropped,
            "kappa": {"kind": self.kappa_kind, "value": _json_float(self.kappa), "items": self.kappa_items},
            "annotators": [{"name": a, "labels": self.labels_per_annotator[a],
                            "majority_agreement": self.majority_agreement[a],
                            "majority_items": self.majority_items[a]} for a in self.annotators],
        }


def _json_float(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def preferences_from_labels(labels: Sequence[Label], groups: Sequence[Mapping[str, Any]], *,
                            annotators_per_group: int = 1, mode: str = "pair") -> HumanPreferences:
    """Combine effective labels into pairs by :data:`COMBINATION_RULE` (module docstring); pure."""
    if isinstance(annotators_per_group, bool) or not isinstance(annotators_per_group, int) or annotators_per_group < 1:
        raise ValueError(f"annotators_per_group={annotators_per_group!r}: must be an integer >= 1")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {', '.join(MODES)}")
    prompts = {int(g["group_id"]): str(g["prompt"]) for g in groups}
    by_group: dict[int, set[str]] = {}
    for lab in labels:
        by_group.setdefault(lab.group_id, set()).add(lab.annotator)
    counted = {g for g, who in by_group.items() if len(who) >= annotators_per_group}
    kept = [lab for lab in labels if lab.group_id in counted]
    annotators = sorted({lab.annotator for lab in kept})
    column = {a: k for k, a in enumerate(annotators)}

    votes: dict[Item, dict[str, float]] = {}
    for lab in kept:
        for (a, b), v in label_votes(lab).items():
            votes.setdefault((lab.group_id, a, b), {})[lab.annotator] = v
    items = sorted(votes)
    matrix = np.full((len(items), len(annotators)), _MISSING)  # [items, annotators]
    for r, item in enumerate(items):
        for who, v in votes[item].items():
            matrix[r, column[who]] = v
    outcome = (majority_vote(matrix, missing=_MISSING, rule="plurality", tie_value=_NO_MAJORITY)
               if items else np.zeros(0))

    pairs: list[PreferencePair] = []
    for r, (g, a, b) in enumerate(items):
        if outcome[r] not in (0.0, 1.0):
            continue
        winner, loser = (a, b) if outcome[r] == 1.0 else (b, a)
        cast = list(votes[(g, a, b)].values())
        share_a = sum(v == 1.0 for v in cast) / len(cast)
        share_b = sum(v == 0.0 for v in cast) / len(cast)
        w_share, l_share = (share_a, share_b) if winner == a else (share_b, share_a)
        voters = list(votes[(g, a, b)])
        pairs.append(PreferencePair(group_id=g, prompt=prompts[g], winner=winner, loser=loser,
                                    winner_score=w_share, loser_score=l_share, tie=False,
                                    annotator=column[voters[0]] if len(voters) == 1 else None))

    kind, kappa, shared = _kappa(matrix)
    present = matrix != _MISSING
    judged_by_many = present.sum(axis=1) >= 2
    decided = ~np.isnan(outcome)
    agreement: dict[str, float | None] = {}
    compared: dict[str, int] = {}
    for a, k in column.items():
        rows = judged_by_many & decided & present[:, k]
        compared[a] = int(rows.sum())
        agreement[a] = float((matrix[rows, k] == outcome[rows]).mean()) if compared[a] else None
    tagged = [(lab.annotator, i, frozenset(t)) for lab in kept if not isinstance(lab, PairLabel)
              for i, t in sorted(lab.tags.items())]
    return HumanPreferences(
        pairs=pairs, annotators=annotators, mode=mode, groups_labeled=len(by_group),
        groups_left_out=len(by_group) - len(counted), annotators_per_group=annotators_per_group,
        items=len(items), ties_dropped=int((outcome == 0.5).sum()), splits_dropped=int((~decided).sum()),
        kappa_kind=kind, kappa=kappa, kappa_items=shared, majority_agreement=agreement, majority_items=compared,
        labels_per_annotator={a: sum(lab.annotator == a for lab in kept) for a in annotators}, tagged=tagged,
    )


def _kappa(matrix: np.ndarray) -> tuple[str | None, float | None, int]:
    """(kind, kappa, shared items): Cohen for 2 annotators, Fleiss for more, on the items all of them judged."""
    k = matrix.shape[1]
    if k < 2:
        return None, None, 0
    shared = matrix[(matrix != _MISSING).all(axis=1)]
    if shared.shape[0] == 0:
        return ("cohen" if k == 2 else "fleiss"), None, 0
    if k == 2:
        return "cohen", cohens_kappa(shared[:, 0], shared[:, 1], missing=_MISSING), shared.shape[0]
    return "fleiss", fleiss_kappa_from_labels(shared, categories=[0.0, 0.5, 1.0], missing=_MISSING), shared.shape[0]


def label_from_log(store: TrajectoryStore, log_path: Path, out_dir: Path, *, mode: str, tags: Sequence[str],
                   annotators_per_group: int) -> tuple[HumanPreferences, LabelLog]:
    """The label step with people: read the log for ``store`` (a TrajectoryStore), combine, write the
    preference dataset to ``out_dir`` (``index["annotators"]`` = :meth:`HumanPreferences.metadata`).

    ``mode`` / ``tags`` (params ``label.human``) must be the log's: labels made in another mode or with
    other tags mean something else. Raises :class:`~prefdiff.labeling.label_log.LabelLogError` for a log
    that cannot be used and when no pair results (nothing to train on), saying what was counted.
    """
    log = LabelLog.open(log_path, store, annotators_per_group=annotators_per_group)
    log.check_settings(mode, tags)
    labels = log.effective_labels()
    prefs = preferences_from_labels(labels, store.groups(), annotators_per_group=annotators_per_group,
                                    mode=log.header.mode)
    if not prefs.pairs:
        raise LabelLogError(
            f"{log.path}: no preference pair to train on: {len(labels)} effective label(s) over "
            f"{prefs.groups_labeled} group(s), {prefs.groups_used} labeled by >= {annotators_per_group} "
            f"annotator(s) (label.human.annotators_per_group); {prefs.ties_dropped} tie(s) and "
            f"{prefs.splits_dropped} even split(s) dropped — label more groups")
    write_preferences(Path(out_dir), prefs.pairs, judge=HUMAN_JUDGE, trajectories=store,
                      annotators=prefs.metadata(log))
    return prefs, log
