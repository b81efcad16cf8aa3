"""Trajectory store: the sampled denoising chains a preference round trains on.

Layout of the directory:

- ``shard-%05d.safetensors`` with tensors
  ``latents`` float32 [n, T+1, C, H, W] (x_T first; entry j+1 is the output of DDIM step j),
  ``log_probs`` float32 [n, T] (sampling-time log-prob of step j, mean over C,H,W),
  ``timesteps`` int64 [T], ``image_ids`` int64 [n] (global ids, contiguous and ascending);
  metadata ``{"schema_version": "1"}``.
- ``images/%05d.png``: the final image of each image id.
- ``index.json``: counts, groups (prompt, seed, image ids), shard and PNG sha256s, model/params dicts.

Sharding policy: a shard is flushed as soon as ``shard_size`` images are buffered, so every shard but the
last holds exactly ``shard_size`` images and a prompt group may straddle two shards. Readers never assume
group-aligned shards: they locate an image through the shards' ``first_image_id``/``num_images``.

The D3PO loss (Yang et al. 2024, eq. 7) needs, per image, the latent each step consumed (x_t) and produced
(x_{t-1}), plus the sampling-time log-prob; that is exactly ``latents[:, j]``, ``latents[:, j+1]`` and
``log_probs[:, j]``.
"""

from __future__ import annotations

import bisect
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from prefdiff import __version__
from prefdiff.data import DatasetError
from prefdiff.data.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    commit_dir,
    discard_dir,
    fsync_file,
    prepare_tmp_dir,
    sha256_bytes,
    sha256_file,
    tmp_sibling,
)

SCHEMA_VERSION = 1
KIND = "prefdiff.trajectories"
INDEX_NAME = "index.json"
# Written instead of an index when a stage's output directory deliberately holds no chains (e.g. the
# sample stage when label.source imports pairs): DVC needs the directory, readers need the reason.
NOT_SAMPLED_NAME = "not_sampled.json"
_HINT = "re-run the sample stage"
# safetensors dtype strings, as reported by safe_open(...).get_slice(name).get_dtype()
_EXPECTED_DTYPES = {"latents": "F32", "log_probs": "F32", "timesteps": "I64", "image_ids": "I64"}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def png_name(image_id: int) -> str:
    return f"images/{image_id:05d}.png"


@dataclass
class TrajectoryGroup:
    """One prompt group as the sampler hands it to the writer."""

    prompt: str
    seed: int
    latents: torch.Tensor  # float32 [G, T+1, C, H, W]
    log_probs: torch.Tensor  # float32 [G, T]
    timesteps: torch.Tensor  # int64 [T]
    images: list[Image.Image]  # G final images


class TrajectoryWriter:
    """Streaming writer: add groups one by one; shards are flushed every ``shard_size`` images.

    Everything is written into ``<out_dir>.tmp-<pid>``; :meth:`close` writes ``index.json`` last and then
    swaps the directory into place, replacing an existing ``out_dir`` only at that point. Use it as a
    context manager so an exception deletes the temp dir (``abort``) and leaves ``out_dir`` untouched::

        with TrajectoryWriter(paths.trajectories, shard_size=64, model=..., params=...) as w:
            for g in sample_groups(...):
                w.add_group(g)
        # closed (committed) on a clean exit
    """

    def __init__(self, out_dir: Path, *, shard_size: int, model: dict, params: dict) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r}: must be an int >= 1")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self._model = dict(model)
        self._params = dict(params)
        self._tmp = prepare_tmp_dir(self.out_dir)
        (self._tmp / "images").mkdir()
        self._groups: list[dict[str, Any]] = []
        self._images: list[dict[str, Any]] = []
        self._shards: list[dict[str, Any]] = []
        # Buffered rows not yet in a shard: per-image latents [T+1,C,H,W] and log_probs [T].
        self._buf_latents: list[torch.Tensor] = []
        self._buf_log_probs: list[torch.Tensor] = []
        self._buf_first_id = 0
        self._num_images = 0
        self._timesteps: torch.Tensor | None = None  # int64 [T], must agree across groups
        self._latent_shape: tuple[int, ...] | None = None  # (C, H, W)
        self._group_size: int | None = None
        self._state = "open"  # open | closed | aborted

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    # -- writing ---------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"TrajectoryWriter for {self.out_dir} is {self._state}")

    def _validate(self, group: TrajectoryGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lat = group.latents.detach().to("cpu", torch.float32).contiguous()
        lp = group.log_probs.detach().to("cpu", torch.float32).contiguous()
        ts = group.timesteps.detach().to("cpu", torch.int64).contiguous()
        gid = len(self._groups)
        if lat.ndim != 5:
            raise ValueError(f"group {gid}: latents shape {tuple(lat.shape)}; expected [G, T+1, C, H, W]")
        g, t1 = lat.shape[0], lat.shape[1]
        t = t1 - 1
        if t < 1 or g < 1:
            raise ValueError(f"group {gid}: latents shape {tuple(lat.shape)}; need G >= 1 and T+1 >= 2")
        if tuple(lp.shape) != (g, t):
            raise ValueError(f"group {gid}: log_probs shape {tuple(lp.shape)}; expected {(g, t)} [G, T]")
        if tuple(ts.shape) != (t,):
            raise ValueError(f"group {gid}: timesteps shape {tuple(ts.shape)}; expected {(t,)} [T]")
        if len(group.images) != g:
            raise ValueError(f"group {gid}: {len(group.images)} images for {g} latents; they must match")
        if self._group_size is None:
            self._group_size, self._latent_shape, self._timesteps = g, tuple(lat.shape[2:]), ts
        else:
            # One (G, T, latent shape, schedule) per dataset: index.json records them once.
            if g != self._group_size:
                raise ValueError(f"group {gid}: G={g}; this dataset has images_per_group={self._group_size}")
            if tuple(lat.shape[2:]) != self._latent_shape:
                raise ValueError(
                    f"group {gid}: latent shape {tuple(lat.shape[2:])}; dataset has {self._latent_shape}"
                )
            assert self._timesteps is not None
            if not torch.equal(ts, self._timesteps):
                raise ValueError(f"group {gid}: timesteps {ts.tolist()} differ from {self._timesteps.tolist()}")
        return lat, lp, ts

    def add_group(self, group: TrajectoryGroup) -> int:
        """Buffer a group (PNG images are written immediately); returns its group_id."""
        self._check_open()
        lat, lp, _ = self._validate(group)
        group_id = len(self._groups)
        ids = list(range(self._num_images, self._num_images + lat.shape[0]))
        for k, (image_id, img) in enumerate(zip(ids, group.images)):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
            atomic_write_bytes(self._tmp / png_name(image_id), data)
            self._images.append(
                {"image_id": image_id, "group_id": group_id, "png": png_name(image_id),
                 "png_sha256": sha256_bytes(data)}
            )
            self._buf_latents.append(lat[k])
            self._buf_log_probs.append(lp[k])
            self._num_images += 1
            if len(self._buf_latents) >= self.shard_size:
                self._flush()
        self._groups.append(
            {"group_id": group_id, "prompt": str(group.prompt), "seed": int(group.seed), "image_ids": ids}
        )
        return group_id

    def _flush(self) -> None:
        """Write buffered rows as the next shard (file-level atomic, fsynced, sha256 recorded)."""
        n = len(self._buf_latents)
        if n == 0:
            return
        assert self._timesteps is not None
        first = self._buf_first_id
        tensors = {
            "latents": torch.stack(self._buf_latents),  # [n, T+1, C, H, W]
            "log_probs": torch.stack(self._buf_log_probs),  # [n, T]
            "timesteps": self._timesteps.clone(),  # [T]
            "image_ids": torch.arange(first, first + n, dtype=torch.int64),  # [n]
        }
        name = shard_name(len(self._shards))
        final = self._tmp / name
        tmp = tmp_sibling(final)
        save_file(tensors, str(tmp), metadata={"schema_version": str(SCHEMA_VERSION)})
        fsync_file(tmp)
        tmp.replace(final)
        self._shards.append({"file": name, "sha256": sha256_file(final), "num_images": n, "first_image_id": first})
        self._buf_latents, self._buf_log_probs = [], []
        self._buf_first_id = first + n

    def close(self) -> Path:
        """Flush the last shard, write index.json last, swap the directory in; returns the index path."""
        self._check_open()
        try:
            if not self._groups:
                raise ValueError(f"TrajectoryWriter for {self.out_dir}: no groups were added; nothing to write")
            self._flush()
            assert self._timesteps is not None and self._latent_shape is not None
            index = {
                "schema_version": SCHEMA_VERSION,
                "kind": KIND,
                "num_groups": len(self._groups),
                "num_images": self._num_images,
                "images_per_group": self._group_size,
                "num_steps": int(self._timesteps.numel()),
                "latent_shape": list(self._latent_shape),
                "timesteps": self._timesteps.tolist(),
                "groups": self._groups,
                "shards": self._shards,
                "images": self._images,
                "model": self._model,
                "params": self._params,
                "created_by": f"prefdiff {__version__}",
            }
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
            discard_dir(self._tmp)
            self._state = "aborted"


def write_not_sampled(out_dir: Path, reason: str) -> Path:
    """Replace ``out_dir`` with a directory holding only ``not_sampled.json`` = ``{"reason": reason}``;
    :meth:`TrajectoryStore.open` on it raises a DatasetError that quotes the reason."""
    tmp = prepare_tmp_dir(Path(out_dir))
    try:
        atomic_write_json(tmp / NOT_SAMPLED_NAME, {"reason": reason})
        commit_dir(tmp, Path(out_dir))
    except BaseException:
        discard_dir(tmp)
        raise
    return Path(out_dir) / NOT_SAMPLED_NAME


# ------------------------------------------------------------------------------------------------------
class TrajectoryStore:
    """Read side. ``open`` validates everything up front so training never meets a corrupt shard late."""

    def __init__(self, root: Path, index: dict[str, Any], index_sha: str) -> None:
        self.root = Path(root)
        self.index = index
        self._index_sha = index_sha
        self.num_images: int = int(index["num_images"])
        self.num_groups: int = int(index["num_groups"])
        self.num_steps: int = int(index["num_steps"])
        self.images_per_group: int = int(index["images_per_group"])
        self.latent_shape: tuple[int, ...] = tuple(int(x) for x in index["latent_shape"])
        self.timesteps: torch.Tensor = torch.tensor(index["timesteps"], dtype=torch.int64)  # [T]
        self._group_of = {int(im["image_id"]): int(im["group_id"]) for im in index["images"]}
        self._shard_firsts = [int(s["first_image_id"]) for s in index["shards"]]  # ascending

    # -- opening / verification ------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, *, verify: bool = True) -> TrajectoryStore:
        """Open and check a store.

        Always checked: index.json parses, schema/kind, index self-consistency, every shard and PNG
        exists, shard tensors' names/dtypes/shapes/image_ids agree with the index (header reads only).
        ``verify=True`` also hashes every shard and PNG against the recorded sha256.
        Raises DatasetError("<file>: <what is wrong>; <what to do>").
        """
        root = Path(root)
        index_path = root / INDEX_NAME
        if (root / NOT_SAMPLED_NAME).is_file():
            try:
                reason = json.loads((root / NOT_SAMPLED_NAME).read_bytes())["reason"]
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
                reason = f"{NOT_SAMPLED_NAME} is unreadable"
            raise DatasetError(f"{root}: holds no trajectories on purpose ({reason}) — {_HINT}")
        if not index_path.is_file():
            raise DatasetError(f"{index_path}: missing; {root} is not a complete trajectory dataset — {_HINT}")
        raw = index_path.read_bytes()
        try:
            index = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{index_path}: not valid JSON ({e}); the file is corrupt — {_HINT}") from e
        if not isinstance(index, dict):
            raise DatasetError(f"{index_path}: expected a JSON object, found {type(index).__name__} — {_HINT}")
        _check_schema(index_path, index)
        try:
            _check_index_structure(index_path, index)
            for shard in index["shards"]:
                _check_shard(root, index, shard, verify=verify)
            for im in index["images"]:
                _check_file(root / im["png"], im["png_sha256"], index_path, verify=verify,
                            damage="corrupt or was modified")
            return cls(root, index, sha256_bytes(raw))
        except DatasetError:
            raise
        # malformed entries (a string where a count belongs, a shard that is not an object, ...): whatever
        # reading them raises, the user gets the file and "malformed", never a traceback into this module
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError) as e:
            raise DatasetError(f"{index_path}: malformed index ({type(e).__name__}: {e}) — {_HINT}") from None

    # -- accessors --------------------------------------------------------------------------------------
    def groups(self) -> list[dict]:
        """Group dicts ``{"group_id", "prompt", "seed", "image_ids"}`` in group-id order."""
        return list(self.index["groups"])

    def _check_id(self, image_id: int) -> int:
        i = int(image_id)
        if not 0 <= i < self.num_images:
            raise IndexError(f"image_id {image_id}: out of range; this store has ids 0..{self.num_images - 1}")
        return i

    def prompt_of(self, image_id: int) -> str:
        return self.index["groups"][self._group_of[self._check_id(image_id)]]["prompt"]

    def png_path(self, image_id: int) -> Path:
        return self.root / self.index["images"][self._check_id(image_id)]["png"]

    def index_sha256(self) -> str:
        """sha256 of the index.json bytes read at open (what preference datasets record as lineage)."""
        return self._index_sha

    def load(self, image_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents float32 [n, T+1, C, H, W] and log_probs float32 [n, T], rows in the requested order."""
        ids = [self._check_id(i) for i in image_ids]
        n = len(ids)
        latents = torch.empty((n, self.num_steps + 1, *self.latent_shape), dtype=torch.float32)
        log_probs = torch.empty((n, self.num_steps), dtype=torch.float32)
        # Bucket the requested rows by shard, then read one contiguous slice per shard.
        by_shard: dict[int, list[tuple[int, int]]] = {}  # shard index -> [(output row, local row)]
        for row, i in enumerate(ids):
            s, local = self._locate(i)
            by_shard.setdefault(s, []).append((row, local))
        for s, rows in by_shard.items():
            path = self.root / self.index["shards"][s]["file"]
            lo = min(r[1] for r in rows)
            hi = max(r[1] for r in rows) + 1
            try:
                with safe_open(str(path), framework="pt") as f:
                    lat = f.get_slice("latents")[lo:hi]
                    lp = f.get_slice("log_probs")[lo:hi]
            except Exception as e:  # file replaced/truncated after open
                raise DatasetError(f"{path}: cannot read ({e}) — {_HINT}") from e
            out_rows = torch.tensor([r[0] for r in rows], dtype=torch.int64)
            src_rows = torch.tensor([r[1] - lo for r in rows], dtype=torch.int64)
            latents[out_rows] = lat[src_rows]
            log_probs[out_rows] = lp[src_rows]
        return latents, log_probs

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images, in image-id order: [N, T+1, C, H, W], [N, T]."""
        return self.load(range(self.num_images))

    def _locate(self, image_id: int) -> tuple[int, int]:
        """(shard index, row inside shard); open() guaranteed shards tile 0..N-1 contiguously."""
        s = bisect.bisect_right(self._shard_firsts, image_id) - 1
        return s, image_id - self._shard_firsts[s]


# ------------------------------------------------------------------------------------------------------
def _check_schema(index_path: Path, index: dict) -> None:
    version, kind = index.get("schema_version"), index.get("kind")
    if kind != KIND:
        raise DatasetError(f"{index_path}: kind {kind!r}; expected {KIND!r} — is this a trajectory dataset?")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{index_path}: schema_version {version!r} found, supported: {SCHEMA_VERSION}; "
            f"written by {index.get('created_by', 'unknown')!r}, this is prefdiff {__version__} — {_HINT}"
        )


def _check_index_structure(index_path: Path, index: dict) -> None:
    """The index must describe a consistent dataset before any file is touched."""

    def bad(msg: str) -> DatasetError:
        return DatasetError(f"{index_path}: {msg}; the index is corrupt — {_HINT}")

    required = ["num_groups", "num_images", "images_per_group", "num_steps", "latent_shape", "timesteps",
                "groups", "shards", "images"]
    missing = [k for k in required if k not in index]
    if missing:
        raise bad(f"missing keys {missing}")
    n, t = index["num_images"], index["num_steps"]
    if len(index["timesteps"]) != t:
        raise bad(f"num_steps={t} but {len(index['timesteps'])} timesteps")
    if len(index["groups"]) != index["num_groups"]:
        raise bad(f"num_groups={index['num_groups']} but {len(index['groups'])} groups")
    if len(index["images"]) != n:
        raise bad(f"num_images={n} but {len(index['images'])} image entries")
    for i, im in enumerate(index["images"]):
        if im.get("image_id") != i:
            raise bad(f"images[{i}] has image_id {im.get('image_id')!r}; expected {i}")
    seen: list[int] = []
    for j, g in enumerate(index["groups"]):
        if g.get("group_id") != j:
            raise bad(f"groups[{j}] has group_id {g.get('group_id')!r}; expected {j}")
        for i in g["image_ids"]:
            if not (isinstance(i, int) and 0 <= i < n) or index["images"][i]["group_id"] != j:
                raise bad(f"group {j} lists image_id {i!r} that is out of range or belongs to another group")
        seen.extend(g["image_ids"])
    if sorted(seen) != list(range(n)):
        raise bad("groups' image_ids do not cover 0..num_images-1 exactly once")
    expect_first = 0
    for shard in index["shards"]:
        if shard.get("first_image_id") != expect_first:
            raise bad(
                f"shard {shard.get('file')!r} starts at image {shard.get('first_image_id')!r}; expected {expect_first}"
            )
        expect_first += int(shard["num_images"])
    if expect_first != n:
        raise bad(f"shards hold {expect_first} images; num_images={n}")


def _check_file(path: Path, expected_sha256: str, listed_in: Path, *, verify: bool, damage: str) -> None:
    """The file exists and (with ``verify``) has the sha256 the index recorded; DatasetError names it."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (listed in {listed_in}) — {_HINT}")
    if verify:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise DatasetError(
                f"{path}: sha256 mismatch (index says {expected_sha256[:12]}…, file is {actual[:12]}…); "
                f"the file is {damage} — {_HINT}"
            )


def _check_shard(root: Path, index: dict, shard: dict, *, verify: bool) -> None:
    path = root / shard["file"]
    _check_file(path, shard["sha256"], root / INDEX_NAME, verify=verify, damage="corrupt or truncated")
    n, t = int(shard["num_images"]), int(index["num_steps"])
    expected_shapes = {
        "latents": [n, t + 1, *index["latent_shape"]],
        "log_probs": [n, t],
        "timesteps": [t],
        "image_ids": [n],
    }
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if keys != set(expected_shapes):
                raise DatasetError(f"{path}: tensors {sorted(keys)}; expected {sorted(expected_shapes)} — {_HINT}")
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                raise DatasetError(
                    f"{path}: schema_version {meta.get('schema_version')!r} in safetensors metadata; "
                    f"supported: '{SCHEMA_VERSION}' — {_HINT}"
                )
            for name, shape in expected_shapes.items():
                sl = f.get_slice(name)
                got_shape, got_dtype = list(sl.get_shape()), sl.get_dtype()
                if got_shape != shape or got_dtype != _EXPECTED_DTYPES[name]:
                    raise DatasetError(
                        f"{path}: tensor {name!r} is {got_dtype} {got_shape}; index implies "
                        f"{_EXPECTED_DTYPES[name]} {shape} — {_HINT}"
                    )
            ids = f.get_tensor("image_ids").tolist()
            ts = f.get_tensor("timesteps").tolist()
    except DatasetError:
        raise
    except Exception as e:  # safetensors raises its own error type on truncated / garbled files
        raise DatasetError(f"{path}: not a readable safetensors file ({e}); corrupt or truncated — {_HINT}") from e
    first = int(shard["first_image_id"])
    if ids != list(range(first, first + n)):
        raise DatasetError(
            f"{path}: image_ids {ids[:3]}… do not match index range {first}..{first + n - 1} — {_HINT}"
        )
    if ts != list(index["timesteps"]):
        raise DatasetError(f"{path}: timesteps {ts} differ from index timesteps {index['timesteps']} — {_HINT}")
