"""Preference store: judged (winner, loser) pairs over a trajectory store's images.

Directory with ``pairs.jsonl`` (one JSON object per line) and ``index.json`` (judge, counts, the sha256 of
pairs.jsonl, and the sha256 of the trajectory index the pairs refer to — the lineage link that lets the
train stage refuse pairs labeled against a different sample run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefdiff import __version__
from prefdiff.data import DatasetError
from prefdiff.data.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_bytes

if TYPE_CHECKING:  # keep torch out of this module's import cost
    from prefdiff.data.trajectories import TrajectoryStore

SCHEMA_VERSION = 1
KIND = "prefdiff.preferences"
INDEX_NAME = "index.json"
PAIRS_NAME = "pairs.jsonl"
_HINT = "re-run the label stage"
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "group_id": int, "prompt": str, "winner": int, "loser": int,
    "winner_score": (int, float), "loser_score": (int, float), "tie": bool,
}


@dataclass(frozen=True)
class PreferencePair:
    """One judged comparison inside a prompt group. For a tie, winner < loser (ids) and tie=True."""

    group_id: int
    prompt: str
    winner: int
    loser: int
    winner_score: float
    loser_score: float
    tie: bool


@dataclass(frozen=True)
class LabelSummary:
    """Counts a label run reports (and MLflow logs)."""

    num_pairs: int
    num_ties: int
    num_groups: int
    mean_margin: float  # mean |winner_score - loser_score| over ALL pairs (ties count 0); 0.0 if no pairs

    @property
    def num_training_pairs(self) -> int:
        return self.num_pairs - self.num_ties


def summarize(pairs: Sequence[PreferencePair]) -> LabelSummary:
    n = len(pairs)
    margin = sum(abs(p.winner_score - p.loser_score) for p in pairs) / n if n else 0.0
    return LabelSummary(
        num_pairs=n,
        num_ties=sum(p.tie for p in pairs),
        num_groups=len({p.group_id for p in pairs}),
        mean_margin=float(margin),
    )


def _trajectories_ref(store: TrajectoryStore) -> str:
    """Store path relative to the cwd (the DVC workspace root, e.g. "data/trajectories") when inside it."""
    root = Path(store.root).resolve()
    try:
        return root.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return root.as_posix()


def write_preferences(
    out_dir: Path, pairs: list[PreferencePair], *, judge: dict, trajectories: TrajectoryStore
) -> Path:
    """Write pairs.jsonl then index.json into a temp dir and swap it into ``out_dir``; returns index path.

    ``judge`` must be ``{"name": str, "higher_is_better": bool, "params": dict}``.
    """
    missing = [k for k in ("name", "higher_is_better", "params") if k not in judge]
    if missing:
        raise ValueError(f"judge metadata {judge!r} lacks keys {missing}; need name, higher_is_better, params")
    lines = []
    for p in pairs:
        row: dict[str, Any] = asdict(p)
        row["winner_png"] = str(trajectories.png_path(p.winner).relative_to(trajectories.root).as_posix())
        row["loser_png"] = str(trajectories.png_path(p.loser).relative_to(trajectories.root).as_posix())
        lines.append(json.dumps(row, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    s = summarize(pairs)
    index = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "judge": {"name": judge["name"], "higher_is_better": bool(judge["higher_is_better"]),
                  "params": dict(judge["params"])},
        "num_pairs": s.num_pairs,
        "num_ties": s.num_ties,
        "num_groups": s.num_groups,
        "pairs_sha256": sha256_bytes(data),
        "trajectories": {"path": _trajectories_ref(trajectories), "index_sha256": trajectories.index_sha256()},
        "created_by": f"prefdiff {__version__}",
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        atomic_write_bytes(tmp / PAIRS_NAME, data)
        atomic_write_json(tmp / INDEX_NAME, index)  # last: its presence marks a complete dataset
    return out_dir / INDEX_NAME


def _parse_line(path: Path, lineno: int, line: str) -> PreferencePair:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno}) — {_HINT}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(obj).__name__} — {_HINT}")
    for key, typ in _FIELDS.items():
        if key not in obj:
            raise DatasetError(f"{where}: missing key {key!r}; a pair needs {list(_FIELDS)} — {_HINT}")
        v = obj[key]
        # bool is an int subclass in Python: refuse it where an int id is expected
        if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
            raise DatasetError(f"{where}: {key}={v!r} has type {type(v).__name__}; expected {typ} — {_HINT}")
    pair = PreferencePair(**{k: (float(obj[k]) if k.endswith("_score") else obj[k]) for k in _FIELDS})
    if pair.winner == pair.loser:
        raise DatasetError(f"{where}: winner and loser are both image {pair.winner} — {_HINT}")
    if pair.tie and pair.winner > pair.loser:
        raise DatasetError(f"{where}: tie with winner {pair.winner} > loser {pair.loser}; ties list ids ascending")
    return pair


class PreferenceStore:
    """Read side; :meth:`open` verifies schema, pairs.jsonl sha256 and every line."""

    def __init__(self, root: Path, index: dict[str, Any], pairs: list[PreferencePair]) -> None:
        self.root = Path(root)
        self.index = index
        self.pairs = pairs

    @classmethod
    def open(cls, root: Path) -> PreferenceStore:
        root = Path(root)
        index_path, pairs_path = root / INDEX_NAME, root / PAIRS_NAME
        if not index_path.is_file():
            raise DatasetError(f"{index_path}: missing; {root} is not a complete preference dataset — {_HINT}")
        try:
            index = json.loads(index_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{index_path}: not valid JSON ({e}) — {_HINT}") from e
        if not isinstance(index, dict) or index.get("kind") != KIND:
            kind = index.get("kind") if isinstance(index, dict) else None
            raise DatasetError(f"{index_path}: kind {kind!r}; expected {KIND!r} — is this a preference dataset?")
        if index.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(
                f"{index_path}: schema_version {index.get('schema_version')!r} found, supported: {SCHEMA_VERSION}"
                f" — {_HINT}"
            )
        for key in ("judge", "num_pairs", "num_ties", "pairs_sha256", "trajectories"):
            if key not in index:
                raise DatasetError(f"{index_path}: missing key {key!r} — {_HINT}")
        if not pairs_path.is_file():
            raise DatasetError(f"{pairs_path}: missing (listed by {index_path}) — {_HINT}")
        data = pairs_path.read_bytes()
        actual = sha256_bytes(data)
        if actual != index["pairs_sha256"]:
            raise DatasetError(
                f"{pairs_path}: sha256 mismatch (index says {str(index['pairs_sha256'])[:12]}…, file is "
                f"{actual[:12]}…); the file is corrupt, truncated or was edited — {_HINT}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{pairs_path}: not UTF-8 ({e}) — {_HINT}") from e
        pairs = [_parse_line(pairs_path, i, line) for i, line in enumerate(text.splitlines(), start=1)]
        if len(pairs) != index["num_pairs"] or sum(p.tie for p in pairs) != index["num_ties"]:
            raise DatasetError(
                f"{pairs_path}: {len(pairs)} pairs / {sum(p.tie for p in pairs)} ties; index says "
                f"{index['num_pairs']} / {index['num_ties']} — {_HINT}"
            )
        return cls(root, index, pairs)

    def training_pairs(self) -> list[PreferencePair]:
        """Pairs the loss trains on: ties carry no preference, so they are excluded."""
        return [p for p in self.pairs if not p.tie]

    def summary(self) -> LabelSummary:
        return summarize(self.pairs)

    def check_trajectories(self, store: TrajectoryStore) -> None:
        """Refuse a trajectory store other than the one these pairs were labeled against."""
        want = self.index["trajectories"]["index_sha256"]
        got = store.index_sha256()
        if want != got:
            raise DatasetError(
                f"{self.root / INDEX_NAME}: labeled against trajectories index {want[:12]}…, but "
                f"{store.root / 'index.json'} is {got[:12]}…; re-run the label stage on the current samples"
            )
        bad = [i for p in self.pairs for i in (p.winner, p.loser) if not 0 <= i < store.num_images]
        if bad:
            raise DatasetError(f"{self.root / PAIRS_NAME}: image ids {bad[:5]} not in 0..{store.num_images - 1}")


__all__ = [
    "LabelSummary", "PreferencePair", "PreferenceStore", "summarize", "write_preferences",
    "SCHEMA_VERSION", "KIND",
]
