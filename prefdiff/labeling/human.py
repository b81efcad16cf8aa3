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

The log (``label.human.log``, which the labeling page appends to; README "From labels to preferences"): an
append-only JSONL file, a header line ``{"kind": "header", "schema": 1, "dataset_sha256": ..., "mode": ...,
"tags": [...]}`` then one line per ``label`` or ``undo`` record, ``seq`` increasing by 1. The *effective*
labels are the label records no undo names; an annotator labels a group at most once (effectively). A
torn last line (no newline: a crash mid-write, never acknowledged) is ignored; anything else malformed
refuses the whole log with one line naming the file, the line and what is wrong — as does a header whose
``dataset_sha256`` is not the trajectory store's ``index_sha256()`` (labels of other images).

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

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from prefdiff.agreement import cohens_kappa, fleiss_kappa_from_labels, majority_vote
from prefdiff.data.preferences import PreferencePair, workspace_ref, write_preferences

if TYPE_CHECKING:
    from prefdiff.data.trajectories import TrajectoryStore

__all__ = [
    "CHOICES", "COMBINATION_RULE", "HUMAN_JUDGE", "HumanLabel", "HumanPreferences", "LabelLog", "LabelLogError",
    "MODES", "label_from_log", "label_votes", "preferences_from_labels", "read_label_log", "tag_mode_pairs",
]

SCHEMA = 1
MODES = ("pair", "tag")
# pair mode's choices as votes on (first shown, second shown): D3PO's h = [1,-1] / [-1,1] / [0,0]
CHOICES = {"first": 1.0, "second": 0.0, "tie": 0.5}
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
_CONTRACT = "see RULES.md's label-log contract"

Item = tuple[int, int, int]  # (group_id, lower image id, higher image id)


class LabelLogError(ValueError):
    """A label log that cannot be used; the one-line message names the file (and line) and what is wrong."""


class TrajectoryIndex(Protocol):
    """What the reader needs of a :class:`~prefdiff.data.trajectories.TrajectoryStore`."""

    root: Path

    def index_sha256(self) -> str: ...

    def groups(self) -> list[dict]: ...


@dataclass(frozen=True)
class HumanLabel:
    """One effective label record: in pair mode ``image_ids`` are the two shown (in order) and ``choice``
    is set; in tag mode ``image_ids`` are the whole group and ``tags`` maps each of them to its tags."""

    seq: int
    annotator: str
    group_id: int
    image_ids: tuple[int, ...]
    choice: str | None = None
    tags: Mapping[int, frozenset[str]] | None = None


@dataclass(frozen=True)
class LabelLog:
    """A read log: its header and its effective labels in ``seq`` order."""

    path: Path
    dataset_sha256: str
    mode: str
    tags: tuple[str, ...]
    labels: tuple[HumanLabel, ...]
    num_records: int  # label and undo lines after the header
    num_undone: int  # label records an undo names
    torn_tail: bool  # the last line had no newline and was ignored
    sha256: str  # of the complete lines (what was read)


def read_label_log(path: Path, store: TrajectoryIndex, *, mode: str | None = None,
                   tags: Sequence[str] | None = None) -> LabelLog:
    """Read and check the label log at ``path`` against ``store``; raises :class:`LabelLogError`.

    ``mode`` / ``tags`` (params ``label.human``), when given, must be the log's: labels made in another
    mode or with other tags mean something else.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelLogError(f"{path}: no label log here (label.human.log); label the groups first "
                            "(make label-server), or set label.source to judge, simulated or pickapic")
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # bytes after the last newline: a torn, unacknowledged write
    complete, torn = data[:cut], bool(data[cut:])
    try:
        lines = complete.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LabelLogError(f"{path}: not UTF-8 ({e}); a label log is JSON lines") from None
    if not lines:
        raise LabelLogError(f"{path}: empty; a label log starts with its header line ({_CONTRACT})")
    header = _json_object(path, 1, lines[0])
    h_mode, h_tags, h_sha = _check_header(path, header)
    if h_sha != store.index_sha256():
        raise LabelLogError(
            f"{path}: labels trajectory dataset {h_sha[:12]}…, but {Path(store.root) / 'index.json'} is "
            f"{store.index_sha256()[:12]}…; these labels are of other images — label the current samples "
            "in a new log (or restore the samples they refer to)")
    if mode is not None and mode != h_mode:
        raise LabelLogError(f"{path}: written in {h_mode} mode, but label.human.mode is {mode}; set "
                            f"label.human.mode: {h_mode}, or label in {mode} mode in a new log")
    if tags is not None and set(tags) != set(h_tags):
        raise LabelLogError(f"{path}: labeled with tags {list(h_tags)}, but label.human.tags is {list(tags)}; "
                            "set label.human.tags to the log's tags, or label with the new tags in a new log")
    groups = {int(g["group_id"]): [int(i) for i in g["image_ids"]] for g in store.groups()}

    labels: dict[int, HumanLabel] = {}  # seq -> effective label
    stacks: dict[str, list[int]] = {}  # annotator -> seqs of its effective labels, oldest first
    labeled: set[tuple[str, int]] = set()  # (annotator, group_id) with an effective label
    undone = 0
    expected_seq: int | None = None
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path}:{lineno}"
        rec = _json_object(path, lineno, line)
        seq = rec.get("seq")
        if not _is_int(seq) or (expected_seq is not None and seq != expected_seq):
            want = "an integer" if expected_seq is None else str(expected_seq)
            raise LabelLogError(f"{where}: seq {seq!r}, expected {want} (seq grows by 1 per line; a line is "
                                "missing, repeated or edited)")
        expected_seq = seq + 1
        annotator = rec.get("annotator")
        if not isinstance(annotator, str) or not annotator.strip():
            raise LabelLogError(f"{where}: annotator {annotator!r}; every record names its annotator")
        kind = rec.get("kind")
        if kind == "label":
            label = _parse_label(where, rec, seq, annotator, h_mode, h_tags, h_sha, groups)
            if (annotator, label.group_id) in labeled:
                raise LabelLogError(f"{where}: annotator {annotator!r} labels group {label.group_id} a second "
                                    "time without undoing the first (a duplicate the server refuses)")
            labels[seq] = label
            stacks.setdefault(annotator, []).append(seq)
            labeled.add((annotator, label.group_id))
        elif kind == "undo":
            target = rec.get("undoes")
            mine = stacks.get(annotator, [])
            if not mine or not _is_int(target) or target != mine[-1]:
                last = f"its last label is seq {mine[-1]}" if mine else "it has no label to undo"
                raise LabelLogError(f"{where}: annotator {annotator!r} undoes {target!r}, but {last} (an "
                                    "annotator undoes only its own last label not yet undone)")
            mine.pop()
            labeled.discard((annotator, labels.pop(target).group_id))
            undone += 1
        else:
            raise LabelLogError(f"{where}: kind {kind!r}; after the header a record is 'label' or 'undo'")
    return LabelLog(path=path, dataset_sha256=h_sha, mode=h_mode, tags=h_tags,
                    labels=tuple(labels[s] for s in sorted(labels)), num_records=len(lines) - 1,
                    num_undone=undone, torn_tail=torn, sha256=hashlib.sha256(complete).hexdigest())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_object(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LabelLogError(f"{path}:{lineno}: not a JSON object ({e.msg}); only a torn last line (no newline) "
                            "is ignored") from None
    if not isinstance(obj, dict):
        raise LabelLogError(f"{path}:{lineno}: a {type(obj).__name__}, expected a JSON object")
    return obj


def _check_header(path: Path, header: dict) -> tuple[str, tuple[str, ...], str]:
    where = f"{path}:1"
    if header.get("kind") != "header":
        raise LabelLogError(f"{where}: kind {header.get('kind')!r}; the first line must be the header "
                            f"({_CONTRACT})")
    if header.get("schema") != SCHEMA:
        raise LabelLogError(f"{where}: schema {header.get('schema')!r}; this reader knows schema {SCHEMA}")
    mode, tags, sha = header.get("mode"), header.get("tags"), header.get("dataset_sha256")
    if mode not in MODES:
        raise LabelLogError(f"{where}: mode {mode!r}; allowed: {', '.join(MODES)}")
    if not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags) and len(set(tags)) == len(tags)):
        raise LabelLogError(f"{where}: tags {tags!r}; expected a list of distinct non-empty strings")
    if not (isinstance(sha, str) and len(sha) == 64):
        raise LabelLogError(f"{where}: dataset_sha256 {sha!r}; expected the trajectory index's sha256 (64 hex)")
    return mode, tuple(tags), sha


def _parse_label(where: str, rec: dict, seq: int, annotator: str, mode: str, tags: tuple[str, ...], sha: str,
                 groups: Mapping[int, list[int]]) -> HumanLabel:
    if rec.get("dataset_sha256") != sha:
        raise LabelLogError(f"{where}: a label of dataset {str(rec.get('dataset_sha256'))[:12]}…, but the header's "
                            f"is {sha[:12]}… (a stale label the server refuses)")
    if rec.get("mode") != mode:
        raise LabelLogError(f"{where}: mode {rec.get('mode')!r} in a {mode}-mode log")
    group_id = rec.get("group_id")
    if not _is_int(group_id) or group_id not in groups:
        raise LabelLogError(f"{where}: group_id {group_id!r}; the dataset has groups 0..{len(groups) - 1}")
    members = groups[group_id]
    ids = rec.get("image_ids")
    if not (isinstance(ids, list) and all(_is_int(i) for i in ids) and len(set(ids)) == len(ids)):
        raise LabelLogError(f"{where}: image_ids {ids!r}; expected distinct integer image ids")
    if mode == "pair":
        choice = rec.get("choice")
        if len(ids) != 2 or not set(ids) <= set(members):
            raise LabelLogError(f"{where}: image_ids {ids}; a pair label shows two images of group {group_id} "
                                f"(ids {members})")
        if choice not in CHOICES:
            raise LabelLogError(f"{where}: choice {choice!r}; allowed: {', '.join(CHOICES)}")
        return HumanLabel(seq=seq, annotator=annotator, group_id=group_id, image_ids=tuple(ids), choice=choice)
    if sorted(ids) != sorted(members):
        raise LabelLogError(f"{where}: image_ids {ids}; a tag label lists every image of group {group_id} "
                            f"(ids {members})")
    given = rec.get("tags")
    if not (isinstance(given, dict) and set(given) == {str(i) for i in ids}):
        raise LabelLogError(f"{where}: tags {given!r}; expected one entry per listed image id ([] = untagged)")
    by_image: dict[int, frozenset[str]] = {}
    for key, value in given.items():
        if not (isinstance(value, list) and set(value) <= set(tags)):
            raise LabelLogError(f"{where}: image {key} tags {value!r}; allowed tags: {list(tags)}")
        by_image[int(key)] = frozenset(value)
    return HumanLabel(seq=seq, annotator=annotator, group_id=group_id, image_ids=tuple(ids), tags=by_image)


# -- votes ---------------------------------------------------------------------------------------------------
def tag_mode_pairs(image_ids: Sequence[int], tagged: Iterable[int]) -> list[tuple[int, int]]:
    """D3PO Sec. 5.2 (Appendix Fig. 15): every untagged image of the group beats every tagged one.

    Returns ``(winner, loser)`` pairs, untagged in ``image_ids`` order, then tagged in that order; none when
    all or none are tagged. No order is assumed within the untagged or the tagged set.
    """
    marked = set(tagged)
    unmarked = [i for i in image_ids if i not in marked]
    return [(w, lo) for w in unmarked for lo in image_ids if lo in marked]


def label_votes(label: HumanLabel) -> dict[tuple[int, int], float]:
    """One annotator's votes ``{(a, b): v}`` (a < b; 1 = a preferred, 0 = b, 0.5 = no preference).

    Pair mode: the shown pair, by its choice. Tag mode: every pair of the group; the untagged-over-tagged
    pairs of :func:`tag_mode_pairs` decided, the pairs within one set 0.5.
    """
    if label.choice is not None:
        first, second = label.image_ids
        h = CHOICES[label.choice]
        return {(min(first, second), max(first, second)): h if first < second else 1.0 - h}
    if label.tags is None:
        raise ValueError(f"label seq {label.seq}: neither a choice (pair mode) nor tags (tag mode)")
    votes = {pair: 0.5 for pair in itertools.combinations(sorted(label.image_ids), 2)}
    for winner, loser in tag_mode_pairs(label.image_ids, [i for i, t in label.tags.items() if t]):
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
            "source": "human", "log": workspace_ref(log.path), "log_sha256": log.sha256,
            "dataset_sha256": log.dataset_sha256, "mode": self.mode, "tags": list(log.tags),
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


def preferences_from_labels(labels: Sequence[HumanLabel], groups: Sequence[Mapping[str, Any]], *,
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
    tagged = [(lab.annotator, i, t) for lab in kept if lab.tags is not None for i, t in sorted(lab.tags.items())]
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

    Raises :class:`LabelLogError` for a log that cannot be used and when no pair results (nothing to
    train on), saying what was counted.
    """
    log = read_label_log(log_path, store, mode=mode, tags=tags)
    prefs = preferences_from_labels(log.labels, store.groups(), annotators_per_group=annotators_per_group,
                                    mode=log.mode)
    if not prefs.pairs:
        raise LabelLogError(
            f"{log.path}: no preference pair to train on: {len(log.labels)} effective label(s) over "
            f"{prefs.groups_labeled} group(s), {prefs.groups_used} labeled by >= {annotators_per_group} "
            f"annotator(s) (label.human.annotators_per_group); {prefs.ties_dropped} tie(s) and "
            f"{prefs.splits_dropped} even split(s) dropped — label more groups")
    write_preferences(Path(out_dir), prefs.pairs, judge=HUMAN_JUDGE, trajectories=store,
                      annotators=prefs.metadata(log))
    return prefs, log
