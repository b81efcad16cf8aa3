"""The human label log: an append-only JSONL file in which a label is durable the moment it is acknowledged.

Format (the shared contract between the labeling server, which writes it, and the label stage, which reads it;
README "Human feedback: the labeling page"). One JSON object per line; the first line is the header:

    {"kind": "header", "schema": 1, "trajectories": "data/trajectories", "dataset_sha256": "<index sha256>",
     "mode": "pair" | "tag", "tags": ["deformed", ...]}

then one record per action, ``seq`` = 1, 2, 3, ... (one per line after the header):

    {"kind": "label", "seq": 7, "time": "2026-12-02T11:00:00Z", "annotator": "alice", "dataset_sha256": "...",
     "group_id": 3, "mode": "pair", "image_ids": [12, 13], "choice": "first" | "second" | "tie"}
    {"kind": "label", "seq": 8, ..., "mode": "tag", "image_ids": [all G ids], "tags": {"14": ["deformed"], "15": []}}
    {"kind": "undo", "seq": 9, "time": "...", "annotator": "alice", "undoes": 8}

Pair choices are D3PO's human labels for (first, second): first = h [1, -1], second = [-1, 1], tie = [0, 0]
(Yang et al. 2024, Sec. 4.1). Pair mode labels ONE pair per group, because an annotator labels a group at most
once: the group's first two images (all of it when G = 2), shown in an order drawn per (annotator, group) so that
a preference for the left image does not line up with image ids. For G > 2 tag mode is the paper's design
(Sec. 5.2, G = 7): every image of the group is shown and tagged, and the label stage derives the pairs.

Durability: every record is written with one ``write`` of the whole line to a file opened ``O_APPEND``, then
``fsync``-ed, under one process-wide lock, and only then acknowledged; a failed write is truncated away again.
A crash can therefore leave only a torn last line that was never acknowledged; readers ignore it (and nothing
else) and a writer truncates it before its first append. One writer per log: the writer holds an exclusive
``flock`` on the file for as long as it is open.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from prefdiff.data import DatasetError
from prefdiff.data.atomic import fsync_dir, tmp_sibling

if TYPE_CHECKING:
    from prefdiff.data.trajectories import TrajectoryStore

SCHEMA = 1
MODES = ("pair", "tag")
CHOICES = ("first", "second", "tie")
# D3PO's human label h for the pair (first, second) (Yang et al. 2024, Sec. 4.1): 1 marks the preferred image.
D3PO_H: dict[str, tuple[int, int]] = {"first": (1, -1), "second": (-1, 1), "tie": (0, 0)}
MAX_NAME_LENGTH = 64
# Words of letters, digits, '.', '_', '@' or '-', separated by single spaces: readable in the log and on the page.
_NAME = re.compile(r"[\w.@-]+(?: [\w.@-]+)*")


class LabelError(ValueError):
    """A request the log refuses; ``status`` is the HTTP status the server answers with, the message one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LabelLogError(DatasetError):
    """The log file itself is unusable (no header, a corrupt line, another dataset, another writer)."""


@dataclass(frozen=True)
class LogHeader:
    trajectories: str  # the trajectory dataset's path as configured (relative to the workspace)
    dataset_sha256: str  # TrajectoryStore.index_sha256() of the dataset the labels refer to
    mode: str  # pair | tag
    tags: tuple[str, ...]  # tag mode's tags (recorded in pair mode too, unused there)

    def as_json(self) -> dict[str, Any]:
        return {"kind": "header", "schema": SCHEMA, "trajectories": self.trajectories,
                "dataset_sha256": self.dataset_sha256, "mode": self.mode, "tags": list(self.tags)}


@dataclass(frozen=True)
class _LabelRecord:
    """The keys every label record has (the contract), whatever its mode."""

    seq: int
    time: str
    annotator: str
    dataset_sha256: str
    group_id: int

    def _json(self, mode: str, image_ids: Sequence[int], **by_mode: Any) -> dict[str, Any]:
        return {"kind": "label", "seq": self.seq, "time": self.time, "annotator": self.annotator,
                "dataset_sha256": self.dataset_sha256, "group_id": self.group_id, "mode": mode,
                "image_ids": list(image_ids), **by_mode}


@dataclass(frozen=True)
class PairLabel(_LabelRecord):
    """``annotator`` preferred image_ids[0] (choice first), image_ids[1] (second), or neither (tie)."""

    image_ids: tuple[int, int]  # in the order shown: (first = left, second = right)
    choice: str  # first | second | tie

    mode = "pair"

    @property
    def h(self) -> tuple[int, int]:
        """D3PO's label for (image_ids[0], image_ids[1])."""
        return D3PO_H[self.choice]

    def as_json(self) -> dict[str, Any]:
        return self._json("pair", self.image_ids, choice=self.choice)


@dataclass(frozen=True)
class TagLabel(_LabelRecord):
    """``annotator`` looked at every image of the group and gave each its tags (none = looked at and fine)."""

    image_ids: tuple[int, ...]  # all G images of the group, in the order shown
    tags: Mapping[int, tuple[str, ...]]  # image id -> its tags, for every id of image_ids

    mode = "tag"

    @property
    def untagged(self) -> tuple[int, ...]:
        return tuple(i for i in self.image_ids if not self.tags[i])

    @property
    def tagged(self) -> tuple[int, ...]:
        return tuple(i for i in self.image_ids if self.tags[i])

    def as_json(self) -> dict[str, Any]:
        return self._json("tag", self.image_ids, tags={str(i): list(self.tags[i]) for i in self.image_ids})


Label = PairLabel | TagLabel


@dataclass(frozen=True)
class Undo:
    seq: int
    time: str
    annotator: str
    undoes: int  # seq of the annotator's last label that was not undone yet

    def as_json(self) -> dict[str, Any]:
        return {"kind": "undo", "seq": self.seq, "time": self.time, "annotator": self.annotator, "undoes": self.undoes}


@dataclass(frozen=True)
class Progress:
    annotator: str
    labeled: int  # groups this annotator has labeled (effective labels)
    remaining: int  # groups still open to this annotator (not labeled by it, fewer than needed labels)
    groups_total: int
    groups_complete: int  # groups with at least annotators_per_group effective labels
    annotators_per_group: int

    def as_json(self) -> dict[str, Any]:
        return {"annotator": self.annotator, "labeled": self.labeled, "remaining": self.remaining,
                "groups_total": self.groups_total, "groups_complete": self.groups_complete,
                "annotators_per_group": self.annotators_per_group}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shown_pair(group_image_ids: Sequence[int], annotator: str, group_id: int) -> tuple[int, int]:
    """The pair mode shows the group's first two images, in an order that is a pure function of (annotator,
    group): a position bias of the annotator then does not line up with the image ids."""
    a, b = int(group_image_ids[0]), int(group_image_ids[1])
    swap = hashlib.sha256(f"{annotator}\0{group_id}".encode()).digest()[0] & 1
    return (b, a) if swap else (a, b)


class LabelLog:
    """The label log of one trajectory dataset: replayed into memory on open, appended to durably.

    ``LabelLog.open(path, store)`` reads (the label stage: ``effective_labels()``); the server opens with
    ``writer=True`` (or ``create``/``open_or_create``) and calls ``append_pair``/``append_tags``/``undo``.
    Every method is safe to call from many threads at once.
    """

    def __init__(self, path: Path, header: LogHeader, groups: list[dict], *, annotators_per_group: int = 1,
                 annotators: Sequence[str] | None = None) -> None:
        if annotators_per_group < 1:
            raise ValueError(f"annotators_per_group={annotators_per_group}: must be >= 1")
        self.path = Path(path)
        self.header = header
        self.annotators_per_group = annotators_per_group
        self.allowed_annotators = tuple(annotators) if annotators else None
        self._groups = [{"group_id": int(g["group_id"]), "prompt": g["prompt"], "seed": g.get("seed"),
                         "image_ids": tuple(int(i) for i in g["image_ids"])} for g in groups]
        self._group_of = {i: g["group_id"] for g in self._groups for i in g["image_ids"]}
        self._lock = threading.RLock()
        self._fd: int | None = None  # the O_APPEND descriptor of a writer (holds the flock)
        self._size = 0  # bytes of complete lines: where the next record starts
        self._next_seq = 1
        self._labels: dict[int, Label] = {}  # seq -> every label ever written, undone ones included
        self._undos: list[Undo] = []
        self._stack: dict[str, list[int]] = {}  # annotator -> seqs of its effective labels, oldest first
        self._labeled: dict[str, dict[int, int]] = {}  # annotator -> group_id -> seq of its effective label
        self._count = [0] * len(self._groups)  # effective labels per group
        self._holds: dict[str, int] = {}  # annotator -> the group it was last served (not persisted)
        # what open() replayed (the label stage records the hash in the preference dataset it builds)
        self.replayed_sha256 = hashlib.sha256(b"").hexdigest()  # of the complete lines replayed
        self.torn_tail = False  # bytes after the last newline were ignored (a torn, unacknowledged write)

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, store: TrajectoryStore, *, mode: str, tags: Sequence[str],
               trajectories: str = "data/trajectories", annotators_per_group: int = 1,
               annotators: Sequence[str] | None = None) -> LabelLog:
        """Write a new log holding only its header (refuses an existing file) and open it as the writer."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: must be one of {', '.join(MODES)}")
        path = Path(path)
        header = LogHeader(trajectories, store.index_sha256(), mode, tuple(tags))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(path)
        with open(tmp, "wb") as f:
            f.write((json.dumps(header.as_json(), ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # publishes the complete header, and never over an existing log
        except FileExistsError:
            raise LabelLogError(f"{path}: already exists; open it instead of creating it") from None
        finally:
            tmp.unlink()
        fsync_dir(path.parent)
        return cls.open(path, store, writer=True, annotators_per_group=annotators_per_group, annotators=annotators)

    @classmethod
    def open(cls, path: Path, store: TrajectoryStore, *, writer: bool = False, annotators_per_group: int = 1,
             annotators: Sequence[str] | None = None) -> LabelLog:
        """Replay ``path`` for ``store``; refuses a log of another dataset, a corrupt line or a broken sequence.

        ``writer=True`` also takes the log's exclusive lock (a second writer is refused) and truncates a torn
        last line. Readers never modify the file. A last line without its newline is ignored (``torn_tail``) even
        when it parses: the writer appends line and newline in one write and acknowledges only after the fsync,
        so such bytes were never acknowledged.
        """
        path = Path(path)
        if not path.is_file():
            raise LabelLogError(f"{path}: no label log here; start the labeling server to create it")
        fd = _lock_for_writing(path) if writer else None  # before reading: nobody appends behind the replay
        try:
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]  # after the last newline: a torn, unacknowledged write
            lines = complete.split(b"\n")[:-1]
            if not lines:
                raise LabelLogError(f"{path}: no complete header line; the file is not a label log")
            header = _parse_header(path, lines[0])
            if header.dataset_sha256 != store.index_sha256():
                raise LabelLogError(
                    f"{path}: labels trajectory dataset {header.dataset_sha256[:12]}… ({header.trajectories}), but "
                    f"{store.root} is {store.index_sha256()[:12]}… (re-sampled?); move the old log aside or label "
                    "the dataset it names")
            log = cls(path, header, store.groups(), annotators_per_group=annotators_per_group, annotators=annotators)
            for lineno, raw in enumerate(lines[1:], start=2):
                log._replay(lineno, raw)
            log._size = len(complete)
            log.replayed_sha256 = hashlib.sha256(complete).hexdigest()
            log.torn_tail = len(data) > len(complete)
            if fd is not None and len(data) > len(complete):  # never acknowledged (acks follow the fsync): drop
                os.ftruncate(fd, len(complete))
                os.fsync(fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        log._fd = fd
        return log

    @classmethod
    def open_or_create(cls, path: Path, store: TrajectoryStore, *, mode: str, tags: Sequence[str],
                       trajectories: str = "data/trajectories", annotators_per_group: int = 1,
                       annotators: Sequence[str] | None = None) -> LabelLog:
        """The server's entry: resume an existing log (its mode and tags must be the configured ones) or create it."""
        if not Path(path).exists():
            return cls.create(path, store, mode=mode, tags=tags, trajectories=trajectories,
                              annotators_per_group=annotators_per_group, annotators=annotators)
        log = cls.open(path, store, writer=True, annotators_per_group=annotators_per_group, annotators=annotators)
        try:
            log.check_settings(mode, tags)
        except LabelLogError:
            log.close()
            raise
        return log

    def check_settings(self, mode: str, tags: Sequence[str]) -> None:
        """Refuse a log made under other settings (params ``label.human``): labels of another mode, or in tag mode
        other tags, mean something else. The tags' order only orders the page's keys."""
        if self.header.mode != mode or (mode == "tag" and set(self.header.tags) != set(tags)):
            raise LabelLogError(
                f"{self.path}: was written in {self.header.mode} mode with tags {list(self.header.tags)}, but {mode} "
                f"mode with tags {list(tags)} is configured (label.human.mode, label.human.tags); label with the "
                "log's settings or use another log")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # also releases the flock
                self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- replay ----------------------------------------------------------------------------------------
    def _replay(self, lineno: int, raw: bytes) -> None:
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise TypeError(f"a JSON {type(rec).__name__}, not an object")
            if rec.get("seq") != self._next_seq:
                raise ValueError(f"seq {rec.get('seq')!r}, expected {self._next_seq}")
            if rec.get("kind") == "label":
                label = self._check(rec, seq=rec["seq"], time=str(rec["time"]), replay=True)
                self._record(label)
            elif rec.get("kind") == "undo":
                undo = Undo(rec["seq"], rec["time"], rec["annotator"], rec["undoes"])
                self._record_undo(undo, self._last_label(undo.annotator).seq)
            else:
                raise ValueError(f"kind {rec.get('kind')!r}, expected label or undo")
        except LabelError as e:
            raise LabelLogError(f"{where}: a record the server would have refused ({e.message}); the log is corrupt") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise LabelLogError(f"{where}: malformed record ({detail}); the log is corrupt") from None

    # -- validation (HTTP-ish status + one line) ---------------------------------------------------------
    def check_annotator(self, annotator: Any, *, listed: bool = True) -> str:
        """The stripped name; ``listed`` also requires it on the server's list (not when replaying history)."""
        if not isinstance(annotator, str) or not annotator.strip():
            raise LabelError(422, "annotator: a name is required (letters, digits, . _ @ -, single spaces)")
        name = annotator.strip()
        if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
            raise LabelError(422, f"annotator {name[:MAX_NAME_LENGTH]!r}: use at most {MAX_NAME_LENGTH} letters, "
                                  "digits, . _ @ - and single spaces")
        if listed and self.allowed_annotators is not None and name not in self.allowed_annotators:
            raise LabelError(403, f"annotator {name!r} is not on this server's list: {', '.join(self.allowed_annotators)}")
        return name

    def group(self, group_id: Any) -> dict:
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            raise LabelError(422, f"group_id {group_id!r}: must be an integer")
        if not 0 <= group_id < len(self._groups):
            raise LabelError(404, f"unknown group {group_id}: this dataset has groups 0..{len(self._groups) - 1}")
        return self._groups[group_id]

    def _image_ids(self, image_ids: Any, group: dict) -> tuple[int, ...]:
        if not isinstance(image_ids, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in image_ids):
            raise LabelError(422, f"image_ids {image_ids!r}: must be a list of integer image ids")
        for i in image_ids:
            if i not in self._group_of:
                raise LabelError(422, f"unknown image {i}: this dataset has images 0..{len(self._group_of) - 1}")
            if self._group_of[i] != group["group_id"]:
                raise LabelError(422, f"image {i} is not in group {group['group_id']} (its images: "
                                      f"{', '.join(map(str, group['image_ids']))})")
        if len(set(image_ids)) != len(image_ids):
            raise LabelError(422, f"image_ids {list(image_ids)}: an image is listed twice")
        return tuple(image_ids)

    def _check(self, body: Mapping[str, Any], *, seq: int, time: str, replay: bool = False) -> Label:
        """The label ``body`` describes, validated against the dataset and the mode (not against duplicates)."""
        annotator = self.check_annotator(body.get("annotator"), listed=not replay)
        sha = body.get("dataset_sha256")
        if not isinstance(sha, str) or not sha:
            raise LabelError(422, "dataset_sha256 is required: send the one the page was served")
        if sha != self.header.dataset_sha256:
            raise LabelError(409, f"stale dataset: the label is for trajectory dataset {sha[:12]}…, this log labels "
                                  f"{self.header.dataset_sha256[:12]}…; reload the page")
        mode = body.get("mode", self.header.mode)
        if mode != self.header.mode:
            raise LabelError(422, f"mode {mode!r}: this log is in {self.header.mode} mode")
        group = self.group(body.get("group_id"))
        ids = self._image_ids(body.get("image_ids"), group)
        gid = group["group_id"]
        if self.header.mode == "pair":
            if "tags" in body:
                raise LabelError(422, "tags: this log is in pair mode; send choice: first, second or tie")
            if set(ids) != set(group["image_ids"][:2]) or len(ids) != 2:
                raise LabelError(422, f"image_ids {list(ids)}: pair mode labels images "
                                      f"{group['image_ids'][0]} and {group['image_ids'][1]} of group {gid}, in the order shown")
            choice = body.get("choice")
            if choice not in CHOICES:
                raise LabelError(422, f"choice {choice!r}: pair mode allows first, second or tie")
            return PairLabel(seq, time, annotator, sha, gid, (ids[0], ids[1]), choice)
        if "choice" in body:
            raise LabelError(422, "choice: this log is in tag mode; send tags: {image_id: [tags]} for every image")
        if set(ids) != set(group["image_ids"]):
            missing = sorted(set(group["image_ids"]) - set(ids))
            raise LabelError(422, f"image_ids {list(ids)}: tag mode labels all images of group {gid}; "
                                  f"missing {', '.join(map(str, missing))}")
        return TagLabel(seq, time, annotator, sha, gid, ids, self._tags(body.get("tags"), ids))

    def _tags(self, tags: Any, ids: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        if not isinstance(tags, dict):
            raise LabelError(422, "tags: required in tag mode, an object {image_id: [tags]} listing every image")
        out: dict[int, tuple[str, ...]] = {}
        for key, value in tags.items():
            try:
                image_id = int(key)
            except (TypeError, ValueError):
                raise LabelError(422, f"tags: key {key!r} is not an image id") from None
            if image_id not in ids:
                raise LabelError(422, f"tags: image {image_id} is not one of image_ids {list(ids)}")
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise LabelError(422, f"tags of image {image_id}: must be a list of tag names")
            unknown = [t for t in value if t not in self.header.tags]
            if unknown:
                raise LabelError(422, f"tag {unknown[0]!r} of image {image_id}: not a tag of this log; "
                                      f"allowed: {', '.join(self.header.tags)}")
            if len(set(value)) != len(value):
                raise LabelError(422, f"tags of image {image_id}: a tag is listed twice")
            out[image_id] = tuple(t for t in self.header.tags if t in value)  # the configured order
        missing = [i for i in ids if i not in out]
        if missing:
            raise LabelError(422, f"tags: every image of the group needs an entry ([] = fine); missing image "
                                  f"{', '.join(map(str, missing))}")
        return out

    # -- state -----------------------------------------------------------------------------------------
    def _refuse_duplicate(self, label: Label) -> None:
        earlier = self._labeled.get(label.annotator, {}).get(label.group_id)
        if earlier is not None:
            raise LabelError(409, f"duplicate: {label.annotator} already labeled group {label.group_id} "
                                  f"(label #{earlier}); undo it first to change it")

    def _record(self, label: Label) -> None:
        self._refuse_duplicate(label)
        mine = self._labeled.setdefault(label.annotator, {})
        self._labels[label.seq] = label
        mine[label.group_id] = label.seq
        self._stack.setdefault(label.annotator, []).append(label.seq)
        self._count[label.group_id] += 1
        self._next_seq = label.seq + 1

    def _last_label(self, annotator: str) -> Label:
        stack = self._stack.get(annotator)
        if not stack:
            raise LabelError(409, f"nothing to undo: {annotator} has no label left to undo")
        return self._labels[stack[-1]]

    def _record_undo(self, undo: Undo, expected: int) -> None:
        if undo.undoes != expected:
            raise ValueError(f"undoes {undo.undoes!r}, but {undo.annotator}'s last label is #{expected}")
        label = self._labels[self._stack[undo.annotator].pop()]
        del self._labeled[undo.annotator][label.group_id]
        self._count[label.group_id] -= 1
        self._undos.append(undo)
        self._next_seq = undo.seq + 1

    # -- writing ---------------------------------------------------------------------------------------
    def _write(self, record: dict[str, Any]) -> None:
        """Append one line and fsync it; on any failure the file is cut back, so nothing half-written stays."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: opened read-only (LabelLog.open(..., writer=True) to append)")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            view = memoryview(line)
            while view:  # a regular file takes the whole line at once; the loop covers a short write
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise LabelError(503, f"could not write the label log {self.path} ({e.strerror}); the label was not saved") from None
        self._size += len(line)

    def _append_label(self, body: Mapping[str, Any], mode: str) -> Label:
        with self._lock:
            label = self._check({**body, "mode": body.get("mode", mode)}, seq=self._next_seq, time=_now())
            self._refuse_duplicate(label)
            self._write(label.as_json())
            self._record(label)
            if self._holds.get(label.annotator) == label.group_id:
                del self._holds[label.annotator]
            return label

    def append_pair(self, *, annotator: str, dataset_sha256: str, group_id: int, image_ids: Sequence[int],
                    choice: str) -> PairLabel:
        """Validate, write, fsync, then return the pair label (raises LabelError with the refusal)."""
        label = self._append_label({"annotator": annotator, "dataset_sha256": dataset_sha256, "group_id": group_id,
                                    "image_ids": list(image_ids), "choice": choice}, "pair")
        assert isinstance(label, PairLabel)
        return label

    def append_tags(self, *, annotator: str, dataset_sha256: str, group_id: int, image_ids: Sequence[int],
                    tags: Mapping[Any, Sequence[str]]) -> TagLabel:
        """Validate, write, fsync, then return the tag label (raises LabelError with the refusal)."""
        label = self._append_label({"annotator": annotator, "dataset_sha256": dataset_sha256, "group_id": group_id,
                                    "image_ids": list(image_ids), "tags": {k: list(v) for k, v in tags.items()}},
                                   "tag")
        assert isinstance(label, TagLabel)
        return label

    def append(self, body: Mapping[str, Any]) -> Label:
        """A submission as the API receives it (pair or tag per the log's mode)."""
        return self._append_label(body, self.header.mode)

    def undo(self, annotator: str) -> tuple[Undo, Label]:
        """Undo ``annotator``'s last label that is not undone yet; returns the undo record and that label."""
        with self._lock:
            name = self.check_annotator(annotator)
            label = self._last_label(name)
            undo = Undo(self._next_seq, _now(), name, label.seq)
            self._write(undo.as_json())
            self._record_undo(undo, label.seq)
            self._holds[name] = label.group_id  # the page shows the undone group again
            return undo, label

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def groups(self) -> list[dict]:
        return list(self._groups)

    def effective_labels(self) -> list[Label]:
        """The labels not undone, in seq order: what the label stage turns into preferences."""
        with self._lock:
            seqs = sorted(s for stack in self._stack.values() for s in stack)
            return [self._labels[s] for s in seqs]

    def undone_labels(self) -> list[Label]:
        with self._lock:
            return [self._labels[u.undoes] for u in self._undos]

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def annotator_counts(self) -> dict[str, int]:
        """Effective labels per annotator (annotators whose every label was undone included, with 0)."""
        with self._lock:
            return {a: len(s) for a, s in sorted(self._stack.items())}

    def _open_groups(self, annotator: str) -> list[int]:
        mine = self._labeled.get(annotator, {})
        return [g for g in range(len(self._groups)) if g not in mine and self._count[g] < self.annotators_per_group]

    def progress(self, annotator: str) -> Progress:
        with self._lock:
            name = self.check_annotator(annotator)
            return Progress(name, len(self._labeled.get(name, {})), len(self._open_groups(name)), len(self._groups),
                            sum(c >= self.annotators_per_group for c in self._count), self.annotators_per_group)

    def groups_complete(self) -> int:
        with self._lock:
            return sum(c >= self.annotators_per_group for c in self._count)

    def next_group(self, annotator: str) -> int | None:
        """The group to show ``annotator`` next, or None when nothing is left for it.

        Resume: the group it was last served and has not labeled yet (after an undo: the undone group).
        Otherwise the first open group (not labeled by it, fewer than annotators_per_group labels) that the
        groups other annotators are looking at do not already fill; failing that any open group, so nobody
        waits on someone who left.
        """
        with self._lock:
            name = self.check_annotator(annotator)
            open_groups = self._open_groups(name)
            held = self._holds.get(name)
            if held in open_groups:
                return held
            if not open_groups:
                self._holds.pop(name, None)
                return None
            looked_at = Counter(g for a, g in self._holds.items() if a != name)
            free = [g for g in open_groups if self._count[g] + looked_at[g] < self.annotators_per_group]
            group_id = (free or open_groups)[0]
            self._holds[name] = group_id
            return group_id

    def task(self, annotator: str, group_id: int) -> dict[str, Any]:
        """What the page shows for ``group_id``: the prompt and the image ids in the order shown."""
        group = self.group(group_id)
        if self.header.mode == "pair":
            ids: tuple[int, ...] = shown_pair(group["image_ids"], annotator, group_id)
        else:
            ids = group["image_ids"]
        return {"group_id": group_id, "prompt": group["prompt"], "seed": group["seed"], "mode": self.header.mode,
                "image_ids": list(ids)}


def _lock_for_writing(path: Path) -> int:
    """An O_APPEND descriptor holding the log's exclusive flock (released when it is closed, or the process dies)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LabelLogError(f"{path}: another labeling server is writing this log; stop it first") from None
        raise
    return fd


def _parse_header(path: Path, raw: bytes) -> LogHeader:
    try:
        head = json.loads(raw)
        if not isinstance(head, dict) or head.get("kind") != "header":
            raise ValueError("the first line is not a header")
        if head.get("schema") != SCHEMA:
            raise ValueError(f"schema {head.get('schema')!r}, supported: {SCHEMA}")
        if head["mode"] not in MODES:
            raise ValueError(f"mode {head['mode']!r}, expected pair or tag")
        tags = head["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise ValueError("tags must be a list of names")
        return LogHeader(str(head["trajectories"]), str(head["dataset_sha256"]), head["mode"], tuple(tags))
    except (ValueError, TypeError, KeyError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise LabelLogError(f"{path}:1: not a label log header ({detail})") from None
