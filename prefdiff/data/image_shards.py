"""Image shards: many encoded images (the JPEG/PNG bytes as stored) in one safetensors file, read by position.

One shard, ``shard-%05d.safetensors``, holds two tensors and one metadata key::

    bytes    uint8 [total]   the encoded images back to back
    offsets  int64 [n + 1]   image k is bytes[offsets[k]:offsets[k + 1]]; offsets[0] == 0
    metadata {"prefdiff_image_shard": "1"}   (the shard layout's version)

Why safetensors rather than a tar or a parquet file of bytes: it is already the project's container (the
trajectory shards; never pickle); reading image k is one slice of a memory map after a two-entry header
(a tar needs its own offset index or a scan, parquet decodes a whole page or row group); and its bytes
are a pure function of the tensors, so a shard's sha256, recorded in the dataset's index, addresses its
content. The writer lays the file out itself (:func:`_header`: the 8-byte header length, the JSON header
padded to 8 bytes, then the tensors' bytes), rather than through ``safetensors.numpy.save``, which copies
every image twice more (into one buffer, then into the file's bytes) and, with several metadata keys,
orders them at random; the images go from the list they arrived in to the file and to the hash, once.
The file is byte for byte what ``save`` writes for the same tensors (tested), and readers use the library
(``safe_open``).

Writers flush a shard as soon as its images reach ``shard_bytes`` bytes (the image that crosses the
threshold stays in it), so shard boundaries depend only on the sequence of images. Readers check each
image they read against its sha256 (recorded per image by the dataset), so a corrupt shard is named even
when the whole-file hashes were not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefdiff.data import DatasetError
from prefdiff.data.atomic import atomic_write_chunks, fsync_dir, sha256_bytes

SHARD_LAYOUT = "1"
_META_KEY = "prefdiff_image_shard"
_OPEN_SHARDS = 16  # shard readers kept open per process (a training batch touches a few shards)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class ImageShardWriter:
    """Appends encoded images to shards in ``directory``; :meth:`close` returns the shard list for an index.

    Images get ids 0, 1, 2... in the order added. Each shard entry is ``{"file": <rel_dir>/<name>, "sha256",
    "first_image_id", "num_images", "num_bytes"}`` (``num_bytes``: the encoded images, header excluded).
    Memory: the current shard's images (the bytes objects given, not copied).
    """

    def __init__(self, directory: Path, *, rel_dir: str, shard_bytes: int,
                 name: Callable[[int], str] = shard_name) -> None:
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ValueError(f"shard_bytes={shard_bytes!r}: must be an int >= 1")
        self.directory, self.rel_dir, self.shard_bytes = Path(directory), rel_dir, shard_bytes
        self._name = name  # file name of the k-th shard this writer writes
        self.shards: list[dict[str, Any]] = []
        self.num_images = 0
        self._images: list[bytes] = []
        self._offsets = [0]

    def add(self, data: bytes) -> int:
        """Append one encoded image (kept by reference until its shard is written); returns its id."""
        self._images.append(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self.num_images += 1
        if self._offsets[-1] >= self.shard_bytes:
            self._flush()
        return self.num_images - 1

    def _flush(self) -> None:
        n = len(self._images)
        if n == 0:
            return
        offsets = np.asarray(self._offsets, dtype=np.int64).tobytes()
        chunks = [_header(len(offsets), self._offsets[-1]), offsets, *self._images]
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        name = self._name(len(self.shards))
        atomic_write_chunks(self.directory / name, chunks)
        self.shards.append({"file": f"{self.rel_dir}/{name}", "sha256": digest.hexdigest(),
                            "first_image_id": self.num_images - n, "num_images": n, "num_bytes": self._offsets[-1]})
        self._images, self._offsets = [], [0]

    def adopt(self, written: list[dict[str, Any]]) -> None:
        """Append shards another writer wrote into this writer's directory (a worker process's run of images):
        the current shard is written first, then each file is renamed to the next shard name and its images
        take the next ids. ``written``: that writer's :meth:`close` entries, in order."""
        self._flush()
        for entry in written:
            name = self._name(len(self.shards))
            os.replace(self.directory / Path(entry["file"]).name, self.directory / name)
            self.shards.append({**entry, "file": f"{self.rel_dir}/{name}", "first_image_id": self.num_images})
            self.num_images += entry["num_images"]
        fsync_dir(self.directory)

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.shards


def _header(offsets_bytes: int, images_bytes: int) -> bytes:
    """A safetensors header for the tensors ``offsets`` (int64, first) and ``bytes`` (uint8): the header's
    length (u64, little-endian), then its JSON (keys in a fixed order), space-padded so the tensors start at a
    multiple of 8 bytes, as the format requires."""
    header = {"__metadata__": {_META_KEY: SHARD_LAYOUT},
              "offsets": {"dtype": "I64", "shape": [offsets_bytes // 8], "data_offsets": [0, offsets_bytes]},
              "bytes": {"dtype": "U8", "shape": [images_bytes],
                        "data_offsets": [offsets_bytes, offsets_bytes + images_bytes]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class ShardImage:
    """One stored image: position ``position`` of the shard file ``shard``, whose bytes hash to ``sha256``.

    ``read_bytes()`` returns the encoded image (as ``Path.read_bytes`` does for an image file, so readers
    take either); a mismatch with ``sha256`` raises DatasetError naming the shard and the position.
    """

    shard: Path
    position: int
    sha256: str

    def read_bytes(self) -> bytes:
        data = _reader(self.shard).image(self.position)
        actual = sha256_bytes(data)
        if actual != self.sha256:
            raise DatasetError(
                f"{self.shard}: image {self.position} has sha256 {actual[:12]}…, the dataset's pairs.jsonl says "
                f"{self.sha256[:12]}…; the shard is corrupt or was modified — re-import the dataset"
            )
        return data


class _ShardReader:
    """An open shard: its offsets in memory, its bytes memory-mapped (safetensors ``safe_open``)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="np")
            meta = self._file.metadata() or {}
            self.offsets = self._file.get_tensor("offsets")
            self._bytes = self._file.get_slice("bytes")
            total = self._bytes.get_shape()
        except DatasetError:
            raise
        except Exception as e:  # SafetensorError (truncated header, missing tensor), OSError...
            raise DatasetError(f"{path}: not a readable image shard ({type(e).__name__}: {e}) — re-import the "
                               "dataset") from e
        if meta.get(_META_KEY) != SHARD_LAYOUT:
            raise DatasetError(f"{path}: image shard layout {meta.get(_META_KEY)!r}, expected {SHARD_LAYOUT!r} — "
                               "re-import the dataset")
        o = self.offsets
        if (o.dtype != np.int64 or o.ndim != 1 or len(o) < 2 or o[0] != 0 or (np.diff(o) < 0).any()
                or list(total) != [int(o[-1])]):
            raise DatasetError(f"{path}: offsets do not describe its bytes tensor (shape {list(total)}) — the shard "
                               "is corrupt, re-import the dataset")

    @property
    def num_images(self) -> int:
        return len(self.offsets) - 1

    def image(self, k: int) -> bytes:
        if not 0 <= k < self.num_images:
            raise DatasetError(f"{self.path}: no image {k} (holds {self.num_images}) — re-import the dataset")
        return self._bytes[int(self.offsets[k]):int(self.offsets[k + 1])].tobytes()


# Open shards by (path, inode, mtime, size): a dataset re-imported under the same name is reopened, never
# read through a stale map of the file it replaced.
_readers: OrderedDict[tuple, _ShardReader] = OrderedDict()


def _reader(path: Path) -> _ShardReader:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image shard missing — re-import the dataset") from None
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    reader = _readers.get(key)
    if reader is None:
        reader = _readers[key] = _ShardReader(path)
        while len(_readers) > _OPEN_SHARDS:
            _readers.popitem(last=False)
    else:
        _readers.move_to_end(key)
    return reader


def check_shard(path: Path, entry: dict[str, Any], *, listed_in: Path, verify: bool) -> None:
    """The shard at ``path`` exists, is readable, holds ``entry["num_images"]`` images and (``verify``) hashes
    to ``entry["sha256"]``; DatasetError names the shard."""
    from prefdiff.data.atomic import sha256_file

    hint = "re-import the dataset"
    if not path.is_file():
        raise DatasetError(f"{path}: image shard missing (listed in {listed_in}) — {hint}")
    if verify:
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise DatasetError(f"{path}: sha256 mismatch ({listed_in} says {str(entry['sha256'])[:12]}…, file is "
                               f"{actual[:12]}…); the shard is corrupt or was modified — {hint}")
    n = _reader(path).num_images
    if n != entry["num_images"]:
        raise DatasetError(f"{path}: holds {n} images, {listed_in} says {entry['num_images']} — {hint}")


__all__ = ["ImageShardWriter", "ShardImage", "check_shard", "shard_name", "SHARD_LAYOUT"]
