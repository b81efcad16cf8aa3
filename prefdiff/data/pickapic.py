"""Import Pick-a-Pic-style preference pairs from local parquet files into a preference dataset.

Input: parquet files (or directories of ``*.parquet``) with the columns the official Diffusion-DPO code
reads (``DATASET_NAME_MAPPING``): ``jpg_0``, ``jpg_1`` (encoded image bytes; a Hugging Face ``Image``
struct ``{bytes, path}`` is accepted too), ``label_0`` (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie)
and ``caption``. Other columns are ignored and never read.

What the import does, as the official ``train.py`` does:

- ties (``label_0 == 0.5``) are dropped (and counted; their images are not decoded);
- the winner is put first (``label_0 == 0`` swaps the pair);
- each image is transformed on its own: ``Image.open(BytesIO).convert("RGB")`` -> resize the short side
  to ``resolution`` (PIL bilinear, output size computed as torchvision's ``Resize(int)``) -> center crop
  (torchvision's rounding) or random crop -> horizontal flip (``hflip``: "none"; "per_image", each image
  with p=0.5 independently as the official code; "joint", both or neither as diffusers' SDXL script).

Randomness (random crop, flips) is a pure function of ``(seed, row)`` where ``row`` counts every row read,
0-based, across the sources in order: re-importing the same files with the same config gives byte-identical
datasets. Per image we keep SDXL micro-conditioning: ``original_size`` (h, w of the decoded image) and
``crop_top_left`` (top, left of the crop in the resized image *as flipped*, i.e. the corner a crop of the
flipped image would have, as diffusers records it after its flip), plus ``hflip``.

Output: an image-only preference dataset (:class:`prefdiff.data.preferences.ImagePairWriter`), written
atomically: a failed import leaves an existing ``out_dir`` untouched. Its images sit many to a file in
safetensors shards (:mod:`prefdiff.data.image_shards`). An image the transform would not change (an RGB
JPEG or PNG already ``resolution`` square, not flipped) is stored as the source's bytes; any other is
transformed once and stored as ``encoding`` says: "raw" (default), its 8-bit RGB pixels uncompressed (a
binary PPM: a 15-byte header, then the bytes), or "png" (lossless, :func:`encode_png`). The files are cut
into segments of ``segment_rows`` rows, and a pool of worker processes (:func:`import_pickapic`'s ``workers``)
imports whole segments, from reading the parquet to writing the segment's own shards; the importing process
only renames those shards into one sequence and writes ``pairs.jsonl``, so no image passes through it and the
dataset's bytes do not depend on how many workers there are.

``jpeg_draft`` (default off: the official decode) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when
that is still at least the resized size (sources of twice the resolution or more), then resizes as above;
the pixels differ from a full decode + resize (README "Imported preference datasets" gives the measured
difference), for much less CPU.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
import struct
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from prefdiff.data import DatasetError
from prefdiff.data.atomic import sha256_bytes, sha256_file
from prefdiff.data.image_shards import ImageShardWriter
from prefdiff.data.preferences import ImagePairWriter, workspace_ref
from prefdiff.progress import progress_bar

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
ALLOWED_LABELS = (0.0, 0.5, 1.0)
JUDGE_NAME = "pickapic_import"
_MAX_REJECTIONS_LISTED = 20
# Formats kept byte for byte when no transform changes them: what PIL decodes everywhere the reader runs.
_VERBATIM_FORMATS = ("JPEG", "PNG")
# encoding "png" stores transformed images with encode_png, not PIL: PIL tries all five PNG row filters on
# every row and then deflates with LZ77 matching (most of the old importer's time); one fixed filter and
# Huffman-only deflate cost a fraction of that for files about as small (benchmarks/pickapic_import.py
# prints both encoders' CPU time and size on its first line). Even so the deflate pass is most of a
# resized image's import cost, hence "raw" as the default (README: sizes and times of both).
PNG_ENCODING = "avg filter, zlib Huffman-only"
DEFAULT_SHARD_BYTES = 128 * 2**20
# Rows one worker imports into shards of its own (its last shard partial): 960k rows make ~1,900 segments,
# plenty to keep any CPU count busy, each a few hundred MB of source bytes at most.
DEFAULT_SEGMENT_ROWS = 512


@dataclass(frozen=True)
class ImportConfig:
    """Transform and policy params of an import (all recorded in the dataset's index)."""

    resolution: int = 64
    crop: Literal["center", "random"] = "center"
    hflip: Literal["none", "per_image", "joint"] = "none"
    seed: int = 0
    max_pairs: int | None = None  # stop after this many decided pairs (None: all)
    on_bad_row: Literal["error", "skip"] = "error"  # skip: count and report rejected rows instead of failing
    shard_bytes: int = DEFAULT_SHARD_BYTES  # a shard is closed once its images reach this many bytes
    encoding: Literal["raw", "png"] = "raw"  # how a transformed image is stored (kept ones: the source's bytes)
    jpeg_draft: bool = False  # decode JPEGs at a reduced scale when the target allows it (not the official decode)

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution={self.resolution!r}: must be an int >= 1")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop={self.crop!r}: allowed: 'center', 'random'")
        if self.hflip not in ("none", "per_image", "joint"):
            raise ValueError(f"hflip={self.hflip!r}: allowed: 'none', 'per_image', 'joint'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be an int >= 0")
        if self.max_pairs is not None and (
            isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int) or self.max_pairs < 1
        ):
            raise ValueError(f"max_pairs={self.max_pairs!r}: must be None or an int >= 1")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row={self.on_bad_row!r}: allowed: 'error', 'skip'")
        if isinstance(self.shard_bytes, bool) or not isinstance(self.shard_bytes, int) or self.shard_bytes < 1:
            raise ValueError(f"shard_bytes={self.shard_bytes!r}: must be an int >= 1")
        if self.encoding not in ("raw", "png"):
            raise ValueError(f"encoding={self.encoding!r}: allowed: 'raw', 'png'")
        if not isinstance(self.jpeg_draft, bool):
            raise ValueError(f"jpeg_draft={self.jpeg_draft!r}: must be true or false")


@dataclass(frozen=True)
class ImportSummary:
    rows_read: int  # rows consumed from the sources (ties and rejected rows included)
    pairs_written: int
    ties_dropped: int
    rows_rejected: int  # only non-zero with on_bad_row="skip"
    images_kept: int = 0  # images stored as the source's bytes (the other 2 x pairs_written - images_kept: encoded)
    files: list[dict] = field(default_factory=list)  # [{"path", "sha256", "rows_read"}]
    index_path: Path | None = None


class _BadRow(Exception):
    """A row that cannot become a pair; the message names file, row and column."""


# -- sources -------------------------------------------------------------------------------------------------
def find_parquet_files(sources: Sequence[Path]) -> list[Path]:
    """Expand files and directories (every ``*.parquet`` directly inside, sorted) in the given order.

    Files are taken as given whatever their suffix; duplicates are dropped (first occurrence kept).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: list[Path] = []
    looked: list[str] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            found = sorted(p for p in src.glob("*.parquet") if p.is_file())
            looked.append(f"{src}/*.parquet ({len(found)} found)")
            files.extend(found)
        elif src.is_file():
            looked.append(str(src))
            files.append(src)
        else:
            looked.append(f"{src} (does not exist)")
    unique: dict[Path, Path] = {}
    for f in files:  # a file named twice (directly and through its directory) is read once
        unique.setdefault(f.resolve(), f)
    files = list(unique.values())
    if not files:
        raise DatasetError(
            "no parquet files to import; looked for: " + ("; ".join(looked) if looked else "(no sources given)")
            + " — give parquet files or directories containing *.parquet"
        )
    return files


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # ArrowInvalid, OSError...
        raise DatasetError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; a Pick-a-Pic-style file needs {list(REQUIRED_COLUMNS)} "
            f"(found: {names})"
        )
    _check_types(path, pf.schema_arrow)
    return pf


def _check_types(path: Path, schema: Any) -> None:
    import pyarrow as pa

    def bad(col: str, want: str) -> DatasetError:
        return DatasetError(f"{path}: column {col!r} has type {schema.field(col).type}; expected {want}")

    for col in ("jpg_0", "jpg_1"):
        t = schema.field(col).type
        ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
        )
        if not ok:
            raise bad(col, "binary (encoded image bytes) or struct<bytes: binary, ...>")
    t = schema.field("label_0").type
    if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
        raise bad("label_0", "a number in {0, 0.5, 1}")
    t = schema.field("caption").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise bad("caption", "string")


# -- transforms ----------------------------------------------------------------------------------------------
def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) after torchvision ``Resize(resolution)``: short side -> resolution, long side truncated."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_corner(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop`` (Python round, i.e. half to even)."""
    return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))


def _row_uniforms(seed: int, row: int) -> np.ndarray:
    """7 uniforms in [0, 1): crop top/left of image 0 and 1, flip of image 0 and 1, joint flip.

    Always the same 7 draws, so e.g. switching ``crop`` does not change the flip decisions.
    """
    return np.random.default_rng([seed, row]).random(7)


def transform_image(
    image: Image.Image, config: ImportConfig, *, u_top: float, u_left: float, flip: bool,
    original: tuple[int, int] | None = None, box: tuple[float, float, float, float] | None = None,
) -> tuple[Image.Image, dict]:
    """Resize short side, crop, optionally flip; returns the image and its SDXL meta.

    ``original``, ``box``: when ``image`` was decoded at a reduced scale (``jpeg_draft``), the source's
    (w, h) and the region of ``image`` it covers (what ``draft`` returns: a last pixel may be partial); the
    output size, the crop and the meta are the full-size source's.
    """
    w, h = original or image.size
    res = config.resolution
    nw, nh = resized_size(w, h, res)
    img = image.resize((nw, nh), Image.Resampling.BILINEAR, box=box)
    top, left = _crop_corner(nw, nh, config, u_top, u_left)
    img = img.crop((left, top, left + res, top + res))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - left - res  # the same pixels, as a crop of the flipped resized image
    return img, {"original_size": [h, w], "crop_top_left": [top, left], "hflip": bool(flip)}


def _crop_corner(nw: int, nh: int, config: ImportConfig, u_top: float, u_left: float) -> tuple[int, int]:
    """(top, left) of the ``resolution`` square crop in a resized ``nw`` x ``nh`` image."""
    res = config.resolution
    if config.crop == "center":
        return center_crop_corner(nw, nh, res)
    return int(u_top * (nh - res + 1)), int(u_left * (nw - res + 1))  # uniform over corners, as RandomCrop


def stored_image(
    data: Any, config: ImportConfig, *, u_top: float, u_left: float, flip: bool, where: str
) -> tuple[bytes, dict, bool]:
    """One source image -> (the encoded bytes to store, its SDXL meta, whether they are the source's bytes).

    An RGB JPEG or PNG already ``resolution`` x ``resolution`` that is not flipped is kept byte for byte:
    resize and crop leave it unchanged, so decoding the kept bytes gives the pixels a transform would have
    stored. It is still decoded here, so an undecodable image is a bad row as before; a JPEG at 1/8 scale
    (``draft``: libjpeg still reads every byte of the stream and fails on a truncated or broken one, but
    skips most of the inverse DCT). Any other image is decoded (with ``config.jpeg_draft`` a JPEG at the
    smallest DCT scale still at least its resized size), transformed (:func:`transform_image`) and stored
    as ``config.encoding`` says (:func:`encode_raw` or :func:`encode_png`, both lossless). ``where``
    ("<file>: row <r> column <c>") starts the bad-row message.
    """
    if isinstance(data, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if data is None:
        raise _BadRow(f"{where}: image bytes are null")
    res = config.resolution
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if (w, h) == (res, res) and not flip and im.mode == "RGB" and im.format in _VERBATIM_FORMATS:
                    im.draft(None, (1, 1))
                    im.load()
                    top, left = _crop_corner(res, res, config, u_top, u_left)  # (0, 0): nothing to crop
                    return bytes(data), {"original_size": [h, w], "crop_top_left": [top, left], "hflip": False}, True
                drafted = None
                if config.jpeg_draft and im.format == "JPEG":
                    # libjpeg decodes at the smallest of 1/2, 1/4, 1/8 that keeps both sides >= the resized size
                    # (None: no reduction possible); box: the decoded region the whole source covers
                    drafted = im.draft(None, resized_size(w, h, res))
                im.load()
                image = im.convert("RGB")
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bomb...
        why = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e))  # no memory addresses: stable index
        raise _BadRow(f"{where}: cannot decode image ({len(data)} bytes; {type(e).__name__}: {why})") from e
    out, meta = transform_image(image, config, u_top=u_top, u_left=u_left, flip=flip, original=(w, h),
                                box=None if drafted is None else drafted[1])
    return (encode_raw(out) if config.encoding == "raw" else encode_png(out)), meta, False


def encode_raw(image: Image.Image) -> bytes:
    """``image``'s 8-bit RGB pixels uncompressed, as a binary PPM (``P6``): PIL, and so the training loader,
    decode it like any other stored image, with no inflate. The bytes are a pure function of the pixels."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    return b"P6\n%d %d\n255\n" % image.size + image.tobytes()


def encode_png(image: Image.Image) -> bytes:
    """A lossless 8-bit RGB PNG of ``image``: every row with the PNG "Average" filter, deflated Huffman-only.

    Why not ``Image.save(format="PNG")``: see ``PNG_ENCODING``. On photos the Average filter leaves small
    residuals whose statistics Huffman coding captures; LZ77 matching finds little in them, so skipping it
    costs a few percent of size and saves most of the time. The bytes are a pure function of the pixels
    (and of zlib's version, as with any PNG encoder).
    """
    rows = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    h, w, _ = rows.shape
    rows = rows.reshape(h, 3 * w)
    left = np.zeros(rows.shape, dtype=np.uint16)
    left[:, 3:] = rows[:, :-3]  # the same channel of the pixel to the left (0 before the first pixel)
    up = np.zeros(rows.shape, dtype=np.uint16)
    up[1:] = rows[:-1]  # the row above (0 above the first row)
    filtered = np.empty((h, 3 * w + 1), dtype=np.uint8)
    filtered[:, 0] = 3  # filter type 3, Average: Raw(x) - floor((Raw(x - 3) + Prior(x)) / 2) mod 256
    filtered[:, 1:] = rows - ((left + up) >> 1).astype(np.uint8)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = deflate.compress(filtered.tobytes()) + deflate.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB), deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _label(value: Any, path: str, row: int) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))
    if ok and float(value) in ALLOWED_LABELS:
        return float(value)
    raise _BadRow(f"{path}: row {row} column 'label_0': value {value!r} is not one of the allowed values 0, 0.5, 1")


# -- import ----------------------------------------------------------------------------------------------------
def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _is_tie(label: Any) -> bool:
    return isinstance(label, (int, float)) and not isinstance(label, bool) and label == 0.5


def _raw(image: Any) -> Any:
    """Encoded bytes of a cell (a Hugging Face ``Image`` struct's ``bytes``); None or odd values pass through."""
    return image.get("bytes") if isinstance(image, dict) else image


# One row as a segment reads it: (row, row in its file, jpg_0 bytes, jpg_1 bytes, label_0, caption); a tie's
# images are None (never decoded).
_Row = tuple[int, int, Any, Any, Any, Any]


@dataclass(frozen=True)
class _Segment:
    """Rows ``[start, start + rows)`` of one parquet file (counted in the file): the unit one process imports
    on its own, into shards of its own. ``first_row``: the row number of its first row across all the sources
    (random crops and flips are a function of it); ``row_groups``: the file's row groups it overlaps, the first
    of which holds ``skip`` rows before ``start``."""

    index: int
    path: Path
    start: int
    rows: int
    first_row: int
    row_groups: tuple[int, ...]
    skip: int


def _segments(parquet: list[tuple[Path, Any]], segment_rows: int) -> list[_Segment]:
    """Every file cut into runs of ``segment_rows`` rows (a file's last run shorter), in reading order.

    The cut depends on the files and ``segment_rows`` alone, never on the number of workers, so neither do the
    shards. A segment reads the row groups it overlaps: segments much shorter than a file's row groups decode
    some rows twice (Hugging Face's parquet files of image datasets have groups of 100 rows)."""
    segments: list[_Segment] = []
    row = 0
    for path, pf in parquet:
        meta = pf.metadata
        bounds = [0]
        for g in range(meta.num_row_groups):
            bounds.append(bounds[-1] + meta.row_group(g).num_rows)
        for start in range(0, meta.num_rows, segment_rows):
            stop = min(start + segment_rows, meta.num_rows)
            groups = tuple(g for g in range(meta.num_row_groups) if bounds[g] < stop and bounds[g + 1] > start)
            segments.append(_Segment(len(segments), path, start, stop - start, row + start, groups,
                                     start - bounds[groups[0]]))
        row += meta.num_rows
    return segments


_opened: dict[Path, Any] = {}  # the parquet files this process has opened (a worker reads many segments of each)


def _segment_rows(segment: _Segment, batch_rows: int) -> Iterator[_Row]:
    """The segment's rows, read ``batch_rows`` at a time (only the required columns)."""
    pf = _opened.get(segment.path)
    if pf is None:
        pf = _opened[segment.path] = _open_parquet(segment.path)
    skip, left = segment.skip, segment.rows
    row, local = segment.first_row, segment.start
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(segment.row_groups),
                                 columns=list(REQUIRED_COLUMNS)):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip, min(batch.num_rows - skip, left))
        skip, left = 0, left - batch.num_rows
        cols = [batch.column(name).to_pylist() for name in REQUIRED_COLUMNS]
        for b0, b1, label, caption in zip(*cols):
            tie = _is_tie(label)
            yield row, local, None if tie else _raw(b0), None if tie else _raw(b1), label, caption
            row, local = row + 1, local + 1
        if left == 0:
            return


def _process_row(config: ImportConfig, path: str, r: _Row) -> tuple:
    """One row -> ("tie",) | ("bad", message) | ("pair", caption, winner, loser), each image as (the bytes to
    store, its SDXL meta, whether they are the source's bytes)."""
    row, local, b0, b1, label, caption = r
    try:
        lab = _label(label, path, local)
        if lab == 0.5:
            return ("tie",)
        if caption is None:
            raise _BadRow(f"{path}: row {local} column 'caption': caption is null")
        u = _row_uniforms(config.seed, row)
        flips = {"none": (False, False), "per_image": (u[4] < 0.5, u[5] < 0.5),
                 "joint": (u[6] < 0.5, u[6] < 0.5)}[config.hflip]
        d0, m0, kept0 = stored_image(b0, config, u_top=u[0], u_left=u[1], flip=bool(flips[0]),
                                     where=f"{path}: row {local} column 'jpg_0'")
        d1, m1, kept1 = stored_image(b1, config, u_top=u[2], u_left=u[3], flip=bool(flips[1]),
                                     where=f"{path}: row {local} column 'jpg_1'")
    except _BadRow as e:
        return ("bad", str(e))
    first, second = (d0, m0, kept0), (d1, m1, kept1)
    return ("pair", str(caption), *((first, second) if lab == 1.0 else (second, first)))


@dataclass
class _SegmentResult:
    """What importing one segment gave: its counts, the first bad row's message when ``on_bad_row`` is
    "error" (the segment stops there), its pairs (caption, winner sha256, loser sha256, winner meta, loser
    meta) and the shards holding their images, winner then loser, pair after pair."""

    rows_read: int = 0
    ties: int = 0
    rejected: int = 0
    rejections: list[str] = field(default_factory=list)  # the first _MAX_REJECTIONS_LISTED messages
    error: str | None = None
    kept: int = 0
    pairs: list[tuple] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)


def _import_segment(config: ImportConfig, segment: _Segment, images_dir: str, batch_rows: int,
                    max_pairs: int | None) -> _SegmentResult:
    """Import one segment into shards ``segment-<index>-<k>.safetensors`` in ``images_dir`` (the dataset's
    temp images dir; the writing process renames them into its sequence). A pure function of its arguments,
    so the dataset does not depend on which process ran it. Stops after ``max_pairs`` decided pairs."""
    out = _SegmentResult()
    shards = ImageShardWriter(Path(images_dir), rel_dir=Path(images_dir).name, shard_bytes=config.shard_bytes,
                              name=lambda k: f"segment-{segment.index:06d}-{k:04d}.safetensors")
    path = str(segment.path)
    for r in _segment_rows(segment, batch_rows):
        result = _process_row(config, path, r)
        out.rows_read += 1
        if result[0] == "tie":
            out.ties += 1
        elif result[0] == "bad":
            if config.on_bad_row == "error":
                out.error = result[1]
                break
            out.rejected += 1
            if len(out.rejections) < _MAX_REJECTIONS_LISTED:
                out.rejections.append(result[1])
        else:
            _, caption, winner, loser = result
            for data, _meta, kept in (winner, loser):
                shards.add(data)
                out.kept += kept
            out.pairs.append((caption, sha256_bytes(winner[0]), sha256_bytes(loser[0]), winner[1], loser[1]))
            if max_pairs is not None and len(out.pairs) >= max_pairs:
                break
    out.shards = shards.close()
    return out


def _ordered(calls: Iterator[tuple[Callable, tuple]], workers: int) -> Iterator[Any]:
    """The results of ``calls`` ((function, args), taken lazily) in order, computed by ``workers`` processes.

    ``workers`` > 1: a pool of that many processes (spawned: no state forked from a parent that may hold
    threads) with at most ``2 * workers`` calls in flight, so every worker is busy and results wait in memory
    only briefly. Closing the generator early (``max_pairs`` reached, a bad row) cancels the calls not started
    and waits for the running ones, so nothing writes once it returns."""
    if workers == 1:
        for function, args in calls:
            yield function(*args)
        return
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque = deque()
    try:
        for function, args in calls:
            pending.append(ex.submit(function, *args))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def import_pickapic(
    sources: Sequence[Path],
    out_dir: Path,
    config: ImportConfig,
    *,
    workers: int | None = None,
    progress: Callable[[str], None] | None = print,
    progress_every: int = 1000,
    batch_rows: int = 64,
    segment_rows: int = DEFAULT_SEGMENT_ROWS,
) -> ImportSummary:
    """Import Pick-a-Pic-style parquet ``sources`` into an image-only preference dataset at ``out_dir``.

    Rows are reported 0-based within their file. With ``config.on_bad_row == "error"`` (default) the first
    bad row (label not in {0, 0.5, 1} or null/NaN, null caption, undecodable image) raises DatasetError
    naming file, row, column and value; with "skip" it is counted (``rows_rejected``) and the first
    messages are kept in the index. Missing columns or unreadable files always raise. Nothing is written to
    ``out_dir`` unless the whole import succeeds.

    The files are cut into segments of ``segment_rows`` rows (:func:`_segments`), and ``workers`` processes
    (None: :func:`default_workers`; never more than there are segments; 1: this process alone) each import
    whole segments: read the rows (``batch_rows`` at a time), decode, transform, encode, hash, and write the
    segment's own shards; they also hash the source files. This process renames the segments' shards into one
    sequence and writes ``pairs.jsonl``, in row order, so the dataset is byte-identical for any ``workers`` and
    no image passes through it. At most ``2 * workers`` segments are in flight.
    """
    if batch_rows < 1 or progress_every < 1 or segment_rows < 1:
        raise ValueError(f"batch_rows={batch_rows}, progress_every={progress_every}, segment_rows={segment_rows}: "
                         "must be >= 1")
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be None or an int >= 1")
    say = progress or (lambda _msg: None)
    files = find_parquet_files(sources)
    parquet = [(p, _open_parquet(p)) for p in files]  # schema errors before any work
    total = sum(pf.metadata.num_rows for _, pf in parquet)
    segments = _segments(parquet, segment_rows)
    workers = min(workers, max(1, len(segments)))  # a worker per segment at most: no idle starts
    params = asdict(config)
    judge = {"name": JUDGE_NAME, "higher_is_better": True, "params": params}
    source: dict[str, Any] = {"importer": "pickapic", "required_columns": list(REQUIRED_COLUMNS), **params,
                              "verbatim_formats": list(_VERBATIM_FORMATS), "segment_rows": segment_rows}
    if config.encoding == "png":
        source["png_encoding"] = PNG_ENCODING
    rows_in = {path: pf.metadata.num_rows for path, pf in parquet}

    rows_read = ties = rejected = kept = 0
    rejections: list[str] = []
    file_info: list[dict] = []
    t0 = time.monotonic()
    say(f"importing {len(files)} file(s), {total} rows in {len(segments)} segment(s), with {workers} worker "
        "process(es)")
    bar = progress_bar(desc="import pickapic", total=total, unit="row")
    with bar, ImagePairWriter(out_dir, judge=judge, source=source, shard_bytes=config.shard_bytes) as writer:
        images_dir = str(writer.images_dir)

        # in reading order: each file's hash (recorded in the index), then its segments
        plan: list[tuple[Path, _Segment | None]] = []
        for path in files:
            plan += [(path, None)] + [(path, seg) for seg in segments if seg.path == path]
        calls = ((sha256_file, (path,)) if seg is None
                 else (_import_segment, (config, seg, images_dir, batch_rows, config.max_pairs)) for path, seg in plan)
        with closing(_ordered(calls, workers)) as results:
            for (path, seg), result in zip(plan, results):
                if seg is None:
                    file_info.append({"path": workspace_ref(path), "sha256": result, "rows_read": 0})
                    say(f"reading {path} ({rows_in[path]} rows)")
                    continue
                room = None if config.max_pairs is None else config.max_pairs - writer.num_pairs
                if room is not None and (len(result.pairs) > room or (len(result.pairs) == room and result.error)):
                    # max_pairs is reached inside this segment (before its bad row, if any): import up to there
                    result = _import_segment(config, seg, images_dir, batch_rows, room)
                if result.error is not None:
                    raise DatasetError(f"{result.error} — fix or drop the row, or import with on_bad_row='skip'; "
                                       "nothing was written")
                before = rows_read
                rows_read += result.rows_read
                file_info[-1]["rows_read"] += result.rows_read
                ties, rejected, kept = ties + result.ties, rejected + result.rejected, kept + result.kept
                rejections += result.rejections[:_MAX_REJECTIONS_LISTED - len(rejections)]
                writer.add_written_pairs(result.shards, result.pairs)
                bar.set_postfix({"pairs": writer.num_pairs, "ties": ties, "rejected": rejected}, refresh=False)
                bar.update(result.rows_read)
                if rows_read // progress_every > before // progress_every:
                    rate = rows_read / max(time.monotonic() - t0, 1e-9)
                    say(f"read {rows_read}/{total} rows: {writer.num_pairs} pairs, {ties} ties dropped, "
                        f"{rejected} rejected ({rate:.0f} rows/s)")
                if room is not None and writer.num_pairs >= config.max_pairs:
                    break
        for stray in Path(images_dir).glob("segment-*"):  # segments run ahead of a stop, never adopted
            stray.unlink()
        pairs = writer.num_pairs
        if pairs == 0:
            raise DatasetError(
                f"no decided pairs in {[str(p) for p in files]}: {rows_read} rows read, {ties} ties dropped, "
                f"{rejected} rejected; nothing was written to {out_dir}"
            )
        counts = {"files": file_info, "rows_read": rows_read, "pairs_written": pairs, "ties_dropped": ties,
                  "rows_rejected": rejected, "rejections": rejections,  # the first 20 messages
                  "images_kept": kept, "images_encoded": 2 * pairs - kept}
        index_path = writer.close(counts)
    rate = rows_read / max(time.monotonic() - t0, 1e-9)
    say(f"imported {pairs} pairs from {rows_read} rows ({ties} ties dropped, {rejected} rejected; {kept} of "
        f"{2 * pairs} images kept as stored, the rest stored {config.encoding}) into {out_dir} ({rate:.0f} rows/s)")
    return ImportSummary(rows_read=rows_read, pairs_written=pairs, ties_dropped=ties, rows_rejected=rejected,
                         images_kept=kept, files=file_info, index_path=index_path)


__all__ = ["ImportConfig", "ImportSummary", "default_workers", "encode_png", "encode_raw", "import_pickapic",
           "resized_size", "stored_image"]
