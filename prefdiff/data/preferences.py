"""Preference store: judged (winner, loser) image pairs, backed by sampled trajectories or by stored images.

Directory with ``pairs.jsonl`` (one JSON object per line), ``index.json`` and, for image-only datasets,
``images/``. One format serves both kinds of pairs the trainers consume:

- ``source.kind == "trajectories"`` (the label stage): the pairs refer to image ids of a trajectory store;
  ``index["trajectories"]`` records that store's path and index sha256 (the lineage link that lets the
  train stage refuse pairs labeled against a different sample run). Rows carry ``winner_png``/``loser_png``
  relative to the *trajectory store*. D3PO and DDPO train on these (they need the latent chains), and
  Diffusion-DPO can train on their final PNGs (:meth:`PreferenceStore.image_pairs`).
- ``source.kind == "images"`` (imported datasets, e.g. Pick-a-Pic via :mod:`prefdiff.data.pickapic`):
  the images live in the dataset itself, many per file, in ``images/shard-%05d.safetensors``
  (:mod:`prefdiff.data.image_shards`: encoded bytes, read by position); pair ``i`` has image ids ``2i``
  (winner) and ``2i+1`` (loser). ``index["image_shards"]`` lists the shards in id order with their sha256,
  ``index["trajectories"]`` is null and ``index["source"]`` holds the importer's metadata (files read
  with sha256, transforms, counts). Rows carry each image's sha256 (``winner_sha256``/``loser_sha256``, of
  its stored bytes) and optional SDXL micro-conditioning ``winner_meta``/``loser_meta`` =
  ``{"original_size": [h, w], "crop_top_left": [top, left], "hflip": bool}``. Only image-level trainers
  (Diffusion-DPO, SFT, reward-weighted) can use them.

Schema versions: 3 (written now) stores an image-only dataset's images in shards; 2 stored them as one PNG
file per image (``images/{id:06d}.png``, rows with ``winner_png``) and such a dataset is refused with a
line saying to re-import it; trajectory-backed datasets of versions 2 and 3 are the same and both read.
Version 1 (written before imported datasets existed) has no ``source`` key and is read as
``{"kind": "trajectories"}``. Pairs chosen by simulated annotators (:mod:`prefdiff.labeling.annotators`)
add two optional keys: each row's ``annotator`` (an index) and ``index["annotators"]``
(``{"annotators": [...], ...}``: who they are, in index order); datasets without them read as before,
with ``annotator`` None.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from prefdiff import __version__
from prefdiff.data import DatasetError
from prefdiff.data.atomic import (
    atomic_write_json,
    commit_dir,
    discard_dir,
    fsync_file,
    prepare_tmp_dir,
    sha256_bytes,
    sha256_file,
)
from prefdiff.data.image_shards import ImageShardWriter, ShardImage, check_shard

if TYPE_CHECKING:  # keep torch out of this module's import cost
    from prefdiff.data.trajectories import TrajectoryStore

SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3)
IMAGE_SHARDS_SINCE = 3  # image-only datasets before this version kept one PNG file per image
KIND = "prefdiff.preferences"
INDEX_NAME = "index.json"
PAIRS_NAME = "pairs.jsonl"
IMAGES_DIR = "images"
SOURCE_KINDS = ("trajectories", "images")
_HINT = "re-run the label stage"
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "group_id": int, "prompt": str, "winner": int, "loser": int,
    "winner_score": (int, float), "loser_score": (int, float), "tie": bool,
}
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
NO_TRAJECTORIES_MSG = (
    "imported image pairs have no trajectories; D3PO/DDPO need sampled trajectories, "
    "use train.method diffusion_dpo, sft or reward_weighted"
)


@dataclass(frozen=True)
class PreferencePair:
    """One judged comparison inside a prompt group. For a tie, winner < loser (ids) and tie=True.

    ``annotator``: which annotator chose (an index into the dataset's ``index["annotators"]``), or None when
    the judge itself decided. A row stores the key only when it is set, so judge-labeled datasets keep
    their bytes and rows written before the key existed read as None.
    """

    group_id: int
    prompt: str
    winner: int
    loser: int
    winner_score: float
    loser_score: float
    tie: bool
    annotator: int | None = None


@dataclass(frozen=True)
class ImagePair:
    """A decided pair as image-level trainers (Diffusion-DPO, SFT) consume it: winner first."""

    prompt: str
    # Where the encoded image is: an absolute PNG path (trajectory-backed) or a ShardImage (imported); both
    # give the encoded bytes through read_bytes().
    winner_image: Path | ShardImage
    loser_image: Path | ShardImage
    winner_score: float
    loser_score: float
    winner_meta: dict | None  # {"original_size": (h, w), "crop_top_left": (top, left)} or None
    loser_meta: dict | None


@dataclass(frozen=True)
class _ImageRow:
    """Per-row extras of an image-only dataset: each image's sha256 (of its stored bytes) and meta."""

    winner_sha256: str
    loser_sha256: str
    winner_meta: dict | None
    loser_meta: dict | None


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


def workspace_ref(path: Path) -> str:
    """``path`` relative to the cwd (the DVC workspace root, e.g. "data/trajectories") when inside it."""
    root = Path(path).resolve()
    try:
        return root.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return root.as_posix()


def _trajectories_ref(store: TrajectoryStore) -> str:
    return workspace_ref(store.root)


def _check_judge(judge: dict) -> dict:
    missing = [k for k in ("name", "higher_is_better", "params") if k not in judge]
    if missing:
        raise ValueError(f"judge metadata {judge!r} lacks keys {missing}; need name, higher_is_better, params")
    return {"name": judge["name"], "higher_is_better": bool(judge["higher_is_better"]),
            "params": dict(judge["params"])}


# -- shared writer -----------------------------------------------------------------------------------------
class _PairsFile:
    """Streams pairs.jsonl into a temp dataset dir: sha256 and counts are computed as lines are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._sha = hashlib.sha256()
        self.num_pairs = 0
        self.num_ties = 0
        self._groups: set[int] = set()
        self._margin_sum = 0.0

    def add(self, pair: PreferencePair, extra: dict[str, Any]) -> None:
        row: dict[str, Any] = asdict(pair)
        if pair.annotator is None:
            del row["annotator"]
        row.update(extra)
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        self._f.write(data)
        self._sha.update(data)
        self.num_pairs += 1
        self.num_ties += bool(pair.tie)
        self._groups.add(pair.group_id)
        self._margin_sum += abs(pair.winner_score - pair.loser_score)

    def finish(self) -> dict[str, Any]:
        """Close (fsynced) and return the index fields describing the pairs."""
        self._f.flush()
        self._f.close()
        fsync_file(self.path)
        return {"num_pairs": self.num_pairs, "num_ties": self.num_ties, "num_groups": len(self._groups),
                "pairs_sha256": self._sha.hexdigest()}

    def close_quietly(self) -> None:
        if not self._f.closed:
            self._f.close()


def _index(judge: dict, counts: dict[str, Any], *, source: dict, trajectories: dict | None,
           annotators: dict | None = None) -> dict[str, Any]:
    index = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "judge": judge,
        **counts,
        "source": source,
        "trajectories": trajectories,
        "created_by": f"prefdiff {__version__}",
    }
    if annotators is not None:  # only when annotators chose: judge-labeled indexes keep their bytes
        index["annotators"] = annotators
    return index


def write_preferences(
    out_dir: Path, pairs: list[PreferencePair], *, judge: dict, trajectories: TrajectoryStore,
    annotators: dict | None = None,
) -> Path:
    """Write a trajectory-backed dataset: pairs.jsonl then index.json into a temp dir swapped into ``out_dir``.

    ``judge`` must be ``{"name": str, "higher_is_better": bool, "params": dict}``. ``annotators`` (when
    annotators, not the judge, chose the winners) is recorded as ``index["annotators"]``: their settings
    and counts, listed in the order the rows' ``annotator`` indices refer to. Returns the index path.
    """
    judge = _check_judge(judge)
    out_dir = Path(out_dir)
    tmp = prepare_tmp_dir(out_dir)
    pf = _PairsFile(tmp / PAIRS_NAME)
    try:
        for p in pairs:
            pf.add(p, {
                "winner_png": trajectories.png_path(p.winner).relative_to(trajectories.root).as_posix(),
                "loser_png": trajectories.png_path(p.loser).relative_to(trajectories.root).as_posix(),
            })
        counts = pf.finish()
        index = _index(judge, counts, source={"kind": "trajectories"},
                       trajectories={"path": _trajectories_ref(trajectories),
                                     "index_sha256": trajectories.index_sha256()},
                       annotators=annotators)
        atomic_write_json(tmp / INDEX_NAME, index)  # last: its presence marks a complete dataset
        commit_dir(tmp, out_dir)
    except BaseException:
        pf.close_quietly()
        discard_dir(tmp)
        raise
    return out_dir / INDEX_NAME


def _meta_json(meta: dict | None, what: str) -> dict | None:
    if meta is None:
        return None
    out = {"original_size": [int(x) for x in meta["original_size"]],
           "crop_top_left": [int(x) for x in meta["crop_top_left"]]}
    if len(out["original_size"]) != 2 or len(out["crop_top_left"]) != 2:
        raise ValueError(f"{what}: original_size and crop_top_left must be pairs (h, w) / (top, left); got {meta!r}")
    for k, v in meta.items():
        if k not in out:
            out[k] = v
    return out


class ImagePairWriter:
    """Streaming writer of an image-only preference dataset (imported pairs; no trajectories).

    Pair ``i`` gets group_id ``i`` and image ids ``2i`` (winner) / ``2i+1`` (loser); the images are the
    encoded bytes given (a JPEG kept as the source had it, or a transformed image, raw PPM or PNG), appended to
    ``images/shard-%05d.safetensors`` shards of about ``shard_bytes`` bytes (:mod:`prefdiff.data.image_shards`).
    Everything goes to ``<out_dir>.tmp-<pid>``; :meth:`close` writes the last shard, pairs.jsonl, then
    index.json last, then swaps the directory in. Used as a context manager, an exception deletes the temp
    dir and leaves an existing ``out_dir`` untouched; a clean exit closes.

    ``source`` is the importer metadata recorded as ``index["source"]`` (``kind`` is forced to "images");
    :meth:`close` can add final counts to it.
    """

    def __init__(self, out_dir: Path, *, judge: dict, source: dict | None = None, shard_bytes: int) -> None:
        self.judge = _check_judge(judge)
        self.out_dir = Path(out_dir)
        self.source: dict[str, Any] = {"kind": "images", **{k: v for k, v in (source or {}).items() if k != "kind"}}
        self._tmp = prepare_tmp_dir(self.out_dir)
        (self._tmp / IMAGES_DIR).mkdir()
        self._shards = ImageShardWriter(self._tmp / IMAGES_DIR, rel_dir=IMAGES_DIR, shard_bytes=shard_bytes)
        self._pairs = _PairsFile(self._tmp / PAIRS_NAME)
        self._state = "open"  # open | closed | aborted

    @property
    def num_pairs(self) -> int:
        return self._pairs.num_pairs

    def __enter__(self) -> ImagePairWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    def add_pair(
        self,
        prompt: str,
        winner: bytes,
        loser: bytes,
        *,
        winner_meta: dict | None = None,
        loser_meta: dict | None = None,
        winner_score: float = 1.0,
        loser_score: float = 0.0,
        winner_sha256: str | None = None,
        loser_sha256: str | None = None,
    ) -> PreferencePair:
        """Store one decided pair (winner first, each an encoded image); returns the row's :class:`PreferencePair`.

        ``winner_sha256``/``loser_sha256``: the images' sha256 hex digests when the caller has them (an
        importer's worker processes hash in parallel); None: hashed here. Every read checks them."""
        if self._state != "open":
            raise RuntimeError(f"ImagePairWriter for {self.out_dir} is {self._state}")
        i = self._pairs.num_pairs
        pair = PreferencePair(group_id=i, prompt=str(prompt), winner=2 * i, loser=2 * i + 1,
                              winner_score=float(winner_score), loser_score=float(loser_score), tie=False)
        ids = (self._shards.add(winner), self._shards.add(loser))
        assert ids == (pair.winner, pair.loser), ids
        self._pairs.add(pair, self._image_fields(i, winner_sha256 or sha256_bytes(winner),
                                                 loser_sha256 or sha256_bytes(loser), winner_meta, loser_meta))
        return pair

    @staticmethod
    def _image_fields(i: int, winner_sha256: str, loser_sha256: str, winner_meta: dict | None,
                      loser_meta: dict | None) -> dict[str, Any]:
        """pairs.jsonl's per-image keys of pair ``i``."""
        extra: dict[str, Any] = {"winner_sha256": winner_sha256, "loser_sha256": loser_sha256}
        if winner_meta is not None or loser_meta is not None:
            extra["winner_meta"] = _meta_json(winner_meta, f"pair {i} winner_meta")
            extra["loser_meta"] = _meta_json(loser_meta, f"pair {i} loser_meta")
        return extra

    @property
    def images_dir(self) -> Path:
        """Where other processes write the shards :meth:`add_written_pairs` adopts (inside the temp dir, so an
        aborted import removes them too)."""
        return self._tmp / IMAGES_DIR

    def add_written_pairs(self, shards: list[dict], pairs: list[tuple[str, str, str, dict | None, dict | None]]) -> None:
        """Store decided pairs whose images another process already wrote to shards in :attr:`images_dir`.

        ``shards``: that :class:`ImageShardWriter`'s entries, holding each pair's winner then loser, in order;
        ``pairs``: per pair (prompt, winner sha256, loser sha256, winner meta, loser meta). The shards are
        renamed into this dataset's sequence and the pairs get the next ids, as :meth:`add_pair` gives them."""
        if self._state != "open":
            raise RuntimeError(f"ImagePairWriter for {self.out_dir} is {self._state}")
        images = sum(entry["num_images"] for entry in shards)
        if images != 2 * len(pairs):
            raise ValueError(f"{len(pairs)} pairs need {2 * len(pairs)} images; the shards hold {images}")
        self._shards.adopt(shards)
        for prompt, winner_sha256, loser_sha256, winner_meta, loser_meta in pairs:
            i = self._pairs.num_pairs
            pair = PreferencePair(group_id=i, prompt=str(prompt), winner=2 * i, loser=2 * i + 1, winner_score=1.0,
                                  loser_score=0.0, tie=False)
            self._pairs.add(pair, self._image_fields(i, winner_sha256, loser_sha256, winner_meta, loser_meta))

    def close(self, source_updates: dict | None = None) -> Path:
        """Write the last shard, pairs.jsonl and index.json, swap the directory in; returns the index path."""
        if self._state != "open":
            raise RuntimeError(f"ImagePairWriter for {self.out_dir} is {self._state}")
        try:
            self.source.update({k: v for k, v in (source_updates or {}).items() if k != "kind"})
            shards = self._shards.close()
            counts = self._pairs.finish()
            self.source["num_images"] = 2 * counts["num_pairs"]
            index = _index(self.judge, counts, source=self.source, trajectories=None)
            index["image_shards"] = shards
            atomic_write_json(self._tmp / INDEX_NAME, index)
            commit_dir(self._tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.out_dir / INDEX_NAME

    def abort(self) -> None:
        """Delete the temp dir; the previous ``out_dir`` (if any) is untouched."""
        if self._state == "open":
            self._pairs.close_quietly()
            discard_dir(self._tmp)
            self._state = "aborted"


# -- reading ------------------------------------------------------------------------------------------------
def _parse_line(path: Path, lineno: int, line: str) -> tuple[PreferencePair, dict]:
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
    annotator = obj.get("annotator")
    if annotator is not None and (not isinstance(annotator, int) or isinstance(annotator, bool) or annotator < 0):
        raise DatasetError(f"{where}: annotator={annotator!r}; expected an index >= 0, or no key — {_HINT}")
    pair = PreferencePair(**{k: (float(obj[k]) if k.endswith("_score") else obj[k]) for k in _FIELDS},
                          annotator=annotator)
    if pair.winner == pair.loser:
        raise DatasetError(f"{where}: winner and loser are both image {pair.winner} — {_HINT}")
    if pair.tie and pair.winner > pair.loser:
        raise DatasetError(f"{where}: tie with winner {pair.winner} > loser {pair.loser}; ties list ids ascending")
    return pair, obj


def _parse_meta(where: str, key: str, v: Any) -> dict | None:
    if v is None:
        return None

    def pair_of_ints(x: Any, minimum: int) -> bool:
        return (isinstance(x, list) and len(x) == 2
                and all(isinstance(a, int) and not isinstance(a, bool) and a >= minimum for a in x))

    if not (isinstance(v, dict) and pair_of_ints(v.get("original_size"), 1)
            and pair_of_ints(v.get("crop_top_left"), 0)):
        raise DatasetError(
            f"{where}: {key}={v!r}; expected null or {{\"original_size\": [h, w], \"crop_top_left\": [top, left]}}"
            " (ints) — the dataset is corrupt, re-import it"
        )
    return {"original_size": tuple(v["original_size"]), "crop_top_left": tuple(v["crop_top_left"])}


def _parse_image_row(where: str, obj: dict) -> _ImageRow:
    hint = "the dataset is corrupt, re-import it"
    vals: dict[str, Any] = {}
    for side in ("winner", "loser"):
        sha = obj.get(f"{side}_sha256")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise DatasetError(f"{where}: {side}_sha256={sha!r}; expected 64 lowercase hex digits — {hint}")
        vals[f"{side}_sha256"] = sha
        vals[f"{side}_meta"] = _parse_meta(where, f"{side}_meta", obj.get(f"{side}_meta"))
    return _ImageRow(**vals)


def _parse_image_shards(root: Path, index_path: Path, index: dict) -> list[dict[str, Any]]:
    """``index["image_shards"]``: files inside ``root``, sha256s, and image ids that follow on from shard to
    shard and cover the ``2 * num_pairs`` images exactly."""
    hint = "the dataset is corrupt, re-import it"
    shards = index.get("image_shards")
    if not isinstance(shards, list) or not shards:
        raise DatasetError(f"{index_path}: image_shards={shards!r}; an image-only dataset lists its shards — {hint}")
    expected_first = 0
    for k, entry in enumerate(shards):
        where = f"{index_path}: image_shards[{k}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} is {type(entry).__name__}, expected an object — {hint}")
        file = entry.get("file")
        if not isinstance(file, str) or not file:
            raise DatasetError(f"{where}: file={file!r}; expected a path relative to {root} — {hint}")
        pp = PurePosixPath(file)
        if pp.is_absolute() or ".." in pp.parts or "\\" in file:
            raise DatasetError(f"{where}: file={file!r} points outside {root} — {hint}")
        if not isinstance(entry.get("sha256"), str) or not _SHA_RE.match(entry["sha256"]):
            raise DatasetError(f"{where}: sha256={entry.get('sha256')!r}; expected 64 lowercase hex digits — {hint}")
        for key in ("first_image_id", "num_images"):
            v = entry.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "num_images" else 0):
                raise DatasetError(f"{where}: {key}={v!r}; expected a count — {hint}")
        if entry["first_image_id"] != expected_first:
            raise DatasetError(f"{where}: first_image_id {entry['first_image_id']}, expected {expected_first} "
                               f"(shards follow on in image order) — {hint}")
        expected_first += entry["num_images"]
    if expected_first != 2 * index["num_pairs"]:
        raise DatasetError(f"{index_path}: image_shards hold {expected_first} images; {index['num_pairs']} pairs "
                           f"need {2 * index['num_pairs']} — {hint}")
    return shards


class PreferenceStore:
    """Read side; :meth:`open` verifies schema, pairs.jsonl sha256 and every line.

    Image files and shards are checked (existence, and sha256 with ``verify=True``) by :meth:`image_pairs`,
    the call that hands them to a trainer — not by :meth:`open`, which the label stage also uses only for
    counts.
    """

    def __init__(
        self, root: Path, index: dict[str, Any], pairs: list[PreferencePair],
        image_rows: list[_ImageRow] | None = None, image_shards: list[dict[str, Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.index = index
        self.pairs = pairs
        self._image_rows = image_rows
        self._image_shards = image_shards

    @classmethod
    def open(cls, root: Path) -> PreferenceStore:
        """Open and check a preference dataset; DatasetError("<file>: <what is wrong> — <what to do>")."""
        root = Path(root)
        try:
            return cls._open(root)
        except DatasetError:
            raise
        # malformed entries the checks below do not name (a count that is a string, a source that is a list):
        # the user gets the files and "malformed", never a traceback into this module
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise DatasetError(f"{root / INDEX_NAME}: malformed preference dataset index or {PAIRS_NAME} "
                               f"({type(e).__name__}: {e}) — {_HINT}") from None

    @classmethod
    def _open(cls, root: Path) -> PreferenceStore:
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
        version = index.get("schema_version")
        if isinstance(version, bool) or version not in SUPPORTED_SCHEMA_VERSIONS:
            raise DatasetError(
                f"{index_path}: schema_version {version!r} found, supported: "
                f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))} — {_HINT}"
            )
        required = ["judge", "num_pairs", "num_ties", "pairs_sha256", "trajectories"]
        if version >= 2:
            required.append("source")
        for key in required:
            if key not in index:
                raise DatasetError(f"{index_path}: missing key {key!r} — {_HINT}")
        if version == 1:
            index = {**index, "source": {"kind": "trajectories"}}  # v1 predates imported datasets
        source = index["source"]
        kind = source.get("kind") if isinstance(source, dict) else None
        if kind not in SOURCE_KINDS:
            raise DatasetError(f"{index_path}: source {source!r}; source.kind must be one of {list(SOURCE_KINDS)}")
        traj = index["trajectories"]
        if kind == "trajectories" and not (isinstance(traj, dict) and isinstance(traj.get("index_sha256"), str)):
            raise DatasetError(f"{index_path}: trajectories={traj!r}; a trajectory-backed dataset needs "
                               f"{{\"path\", \"index_sha256\"}} — {_HINT}")
        if kind == "images" and traj is not None:
            raise DatasetError(f"{index_path}: source.kind 'images' but trajectories={traj!r}; expected null")
        if kind == "images" and version < IMAGE_SHARDS_SINCE:
            raise DatasetError(
                f"{index_path}: an image-only dataset of schema_version {version} (one PNG file per image) is no "
                f"longer read; image-only datasets keep their images in shards since schema_version "
                f"{IMAGE_SHARDS_SINCE} — re-import it (label.source: pickapic, `dvc repro label`)"
            )
        image_shards = _parse_image_shards(root, index_path, index) if kind == "images" else None
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
        pairs: list[PreferencePair] = []
        image_rows: list[_ImageRow] | None = [] if kind == "images" else None
        for i, line in enumerate(text.splitlines(), start=1):
            pair, obj = _parse_line(pairs_path, i, line)
            pairs.append(pair)
            if image_rows is not None:
                image_rows.append(_parse_image_row(f"{pairs_path}:{i}", obj))
        listed = len(index["annotators"].get("annotators", [])) if isinstance(index.get("annotators"), dict) else 0
        unlisted = sorted({p.annotator for p in pairs if p.annotator is not None and p.annotator >= listed})
        if unlisted:
            raise DatasetError(f"{pairs_path}: rows name annotators {unlisted[:5]}, but {index_path} lists "
                               f"{listed} annotator(s) — {_HINT}")
        if len(pairs) != index["num_pairs"] or sum(p.tie for p in pairs) != index["num_ties"]:
            raise DatasetError(
                f"{pairs_path}: {len(pairs)} pairs / {sum(p.tie for p in pairs)} ties; index says "
                f"{index['num_pairs']} / {index['num_ties']} — {_HINT}"
            )
        if image_shards is not None:
            total = 2 * index["num_pairs"]
            bad = [i for p in pairs for i in (p.winner, p.loser) if not 0 <= i < total]
            if bad:
                raise DatasetError(f"{pairs_path}: image ids {bad[:5]} not in 0..{total - 1} (the shards' images) "
                                   f"— the dataset is corrupt, re-import it")
        return cls(root, index, pairs, image_rows, image_shards)

    @property
    def source_kind(self) -> str:
        """"trajectories" (pairs over a trajectory store's images) or "images" (imported, self-contained)."""
        return str(self.index.get("source", {}).get("kind", "trajectories"))

    def _no_trajectories(self) -> DatasetError:
        return DatasetError(f"{self.root}: {NO_TRAJECTORIES_MSG}")

    def training_pairs(self) -> list[PreferencePair]:
        """Trajectory pairs the D3PO/DDPO losses train on: ties carry no preference, so they are excluded.

        Raises DatasetError for image-only (imported) datasets: their ids name no trajectories.
        """
        if self.source_kind != "trajectories":
            raise self._no_trajectories()
        return [p for p in self.pairs if not p.tie]

    def summary(self) -> LabelSummary:
        return summarize(self.pairs)

    def check_trajectories(self, store: TrajectoryStore) -> None:
        """Refuse a trajectory store other than the one these pairs were labeled against.

        Image-only datasets refuse every store (DatasetError): they were not labeled against any.
        """
        if self.source_kind != "trajectories":
            raise self._no_trajectories()
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

    def _shard_image_pairs(self, decided: list[int], *, verify: bool) -> list[ImagePair]:
        import bisect

        assert self._image_rows is not None and self._image_shards is not None
        root = self.root.resolve()
        listed = self.root / INDEX_NAME
        paths = [root / s["file"] for s in self._image_shards]
        for path, entry in zip(paths, self._image_shards):
            check_shard(path, entry, listed_in=listed, verify=verify)
        firsts = [s["first_image_id"] for s in self._image_shards]

        def ref(image_id: int, sha: str) -> ShardImage:
            k = bisect.bisect_right(firsts, image_id) - 1
            return ShardImage(shard=paths[k], position=image_id - firsts[k], sha256=sha)

        out = []
        for k in decided:
            p, r = self.pairs[k], self._image_rows[k]
            out.append(ImagePair(prompt=p.prompt, winner_image=ref(p.winner, r.winner_sha256),
                                 loser_image=ref(p.loser, r.loser_sha256), winner_score=p.winner_score,
                                 loser_score=p.loser_score, winner_meta=r.winner_meta, loser_meta=r.loser_meta))
        return out

    def image_pairs(self, trajectories: TrajectoryStore | None = None, *, verify: bool = True) -> list[ImagePair]:
        """Decided pairs (ties excluded), winner first, as image references for image-level trainers.

        Image-only datasets: :class:`~prefdiff.data.image_shards.ShardImage` references into this dataset's
        shards (``trajectories`` is ignored); every shard must exist and hold the images the index says, and
        with ``verify`` (default) each shard is hashed against its sha256 in index.json. Each image read later
        is checked against its own sha256 (pairs.jsonl) whatever ``verify`` is. Trajectory-backed: the final
        PNGs of ``trajectories`` (required; checked with :meth:`check_trajectories`) as absolute paths, meta
        None; every PNG must exist and with ``verify`` is hashed against the trajectory index.
        DatasetError names the file.
        """
        decided = [k for k, p in enumerate(self.pairs) if not p.tie]
        if self.source_kind == "images":
            return self._shard_image_pairs(decided, verify=verify)
        out: list[ImagePair] = []
        seen: set[Path] = set()

        def check(path: Path, sha: str, listed_in: Path, hint: str) -> Path:
            if path in seen:
                return path
            if not path.is_file():
                raise DatasetError(f"{path}: missing (listed in {listed_in}) — {hint}")
            if verify:
                actual = sha256_file(path)
                if actual != sha:
                    raise DatasetError(
                        f"{path}: sha256 mismatch ({listed_in} says {sha[:12]}…, file is {actual[:12]}…); "
                        f"the image is corrupt or was modified — {hint}"
                    )
            seen.add(path)
            return path

        if trajectories is None:
            ref = self.index["trajectories"].get("path", "the trajectory store")
            raise DatasetError(
                f"{self.root}: these pairs refer to the images of a trajectory store ({ref}); "
                "pass it: image_pairs(TrajectoryStore.open(...))"
            )
        self.check_trajectories(trajectories)
        listed = Path(trajectories.root) / "index.json"
        images = trajectories.index["images"]
        hint = "re-run the sample stage"
        for k in decided:
            p = self.pairs[k]
            w = check(Path(trajectories.png_path(p.winner)).resolve(), images[p.winner]["png_sha256"], listed, hint)
            lo = check(Path(trajectories.png_path(p.loser)).resolve(), images[p.loser]["png_sha256"], listed, hint)
            out.append(ImagePair(prompt=p.prompt, winner_image=w, loser_image=lo, winner_score=p.winner_score,
                                 loser_score=p.loser_score, winner_meta=None, loser_meta=None))
        return out


__all__ = [
    "ImagePair", "ImagePairWriter", "LabelSummary", "PreferencePair", "PreferenceStore", "ShardImage", "summarize",
    "write_preferences", "workspace_ref", "SCHEMA_VERSION", "KIND",
]
