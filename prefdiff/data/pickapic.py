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
atomically: a failed import leaves an existing ``out_dir`` untouched.
"""

from __future__ import annotations

import io
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from prefdiff.data import DatasetError
from prefdiff.data.atomic import sha256_file
from prefdiff.data.preferences import ImagePairWriter, workspace_ref
from prefdiff.progress import progress_bar

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
ALLOWED_LABELS = (0.0, 0.5, 1.0)
JUDGE_NAME = "pickapic_import"
_MAX_REJECTIONS_LISTED = 20


@dataclass(frozen=True)
class ImportConfig:
    """Transform and policy params of an import (all recorded in the dataset's index)."""

    resolution: int = 64
    crop: Literal["center", "random"] = "center"
    hflip: Literal["none", "per_image", "joint"] = "none"
    seed: int = 0
    max_pairs: int | None = None  # stop after this many decided pairs (None: all)
    on_bad_row: Literal["error", "skip"] = "error"  # skip: count and report rejected rows instead of failing

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


@dataclass(frozen=True)
class ImportSummary:
    rows_read: int  # rows consumed from the sources (ties and rejected rows included)
    pairs_written: int
    ties_dropped: int
    rows_rejected: int  # only non-zero with on_bad_row="skip"
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


def _iter_rows(pf: Any, batch_rows: int) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(jpg_0, jpg_1, label_0, caption) per row, reading ``batch_rows`` rows at a time (bounded memory)."""
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(REQUIRED_COLUMNS)):
        cols = {name: batch.column(name).to_pylist() for name in REQUIRED_COLUMNS}
        yield from zip(cols["jpg_0"], cols["jpg_1"], cols["label_0"], cols["caption"])
        del cols


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
    image: Image.Image, config: ImportConfig, *, u_top: float, u_left: float, flip: bool
) -> tuple[Image.Image, dict]:
    """Resize short side, crop, optionally flip; returns the image and its SDXL meta."""
    w, h = image.size
    res = config.resolution
    nw, nh = resized_size(w, h, res)
    img = image.resize((nw, nh), Image.Resampling.BILINEAR)
    if config.crop == "center":
        top, left = center_crop_corner(nw, nh, res)
    else:  # uniform over the valid corners, like RandomCrop.get_params
        top, left = int(u_top * (nh - res + 1)), int(u_left * (nw - res + 1))
    img = img.crop((left, top, left + res, top + res))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - left - res  # the same pixels, as a crop of the flipped resized image
    return img, {"original_size": [h, w], "crop_top_left": [top, left], "hflip": bool(flip)}


def _decode(data: Any, path: Path, row: int, column: str) -> Image.Image:
    if isinstance(data, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if data is None:
        raise _BadRow(f"{path}: row {row} column {column!r}: image bytes are null")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bomb...
        why = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e))  # no memory addresses: stable index
        raise _BadRow(
            f"{path}: row {row} column {column!r}: cannot decode image ({len(data)} bytes; {type(e).__name__}: {why})"
        ) from e


def _label(value: Any, path: Path, row: int) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))
    if ok and float(value) in ALLOWED_LABELS:
        return float(value)
    raise _BadRow(f"{path}: row {row} column 'label_0': value {value!r} is not one of the allowed values 0, 0.5, 1")


# -- import ----------------------------------------------------------------------------------------------------
def import_pickapic(
    sources: Sequence[Path],
    out_dir: Path,
    config: ImportConfig,
    *,
    progress: Callable[[str], None] | None = print,
    progress_every: int = 1000,
    batch_rows: int = 64,
) -> ImportSummary:
    """Import Pick-a-Pic-style parquet ``sources`` into an image-only preference dataset at ``out_dir``.

    Rows are reported 0-based within their file. With ``config.on_bad_row == "error"`` (default) the first
    bad row (label not in {0, 0.5, 1} or null/NaN, null caption, undecodable image) raises DatasetError
    naming file, row, column and value; with "skip" it is counted (``rows_rejected``) and the first
    messages are kept in the index. Missing columns or unreadable files always raise. Nothing is written to
    ``out_dir`` unless the whole import succeeds. ``batch_rows`` rows are held in memory at a time.
    """
    if batch_rows < 1 or progress_every < 1:
        raise ValueError(f"batch_rows={batch_rows}, progress_every={progress_every}: must be >= 1")
    say = progress or (lambda _msg: None)
    files = find_parquet_files(sources)
    parquet = [(p, _open_parquet(p)) for p in files]  # schema errors before any work
    total = sum(pf.metadata.num_rows for _, pf in parquet)
    params = asdict(config)
    judge = {"name": JUDGE_NAME, "higher_is_better": True, "params": params}
    source: dict[str, Any] = {"importer": "pickapic", "required_columns": list(REQUIRED_COLUMNS), **params}

    rows_read = ties = rejected = 0
    rejections: list[str] = []
    file_info: list[dict] = []
    t0 = time.monotonic()
    bar = progress_bar(desc="import pickapic", total=total, unit="row")
    with bar, ImagePairWriter(out_dir, judge=judge, source=source) as writer:
        done = False
        for path, pf in parquet:
            info = {"path": workspace_ref(path), "sha256": sha256_file(path), "rows_read": 0}
            file_info.append(info)
            say(f"reading {path} ({pf.metadata.num_rows} rows)")
            for local_row, (b0, b1, label, caption) in enumerate(_iter_rows(pf, batch_rows)):
                row = rows_read
                rows_read += 1
                info["rows_read"] += 1
                try:
                    lab = _label(label, path, local_row)
                    if lab == 0.5:
                        ties += 1
                    else:
                        if caption is None:
                            raise _BadRow(f"{path}: row {local_row} column 'caption': caption is null")
                        im0 = _decode(b0, path, local_row, "jpg_0")
                        im1 = _decode(b1, path, local_row, "jpg_1")
                        u = _row_uniforms(config.seed, row)
                        flips = {"none": (False, False), "per_image": (u[4] < 0.5, u[5] < 0.5),
                                 "joint": (u[6] < 0.5, u[6] < 0.5)}[config.hflip]
                        t0_img, m0 = transform_image(im0, config, u_top=u[0], u_left=u[1], flip=bool(flips[0]))
                        t1_img, m1 = transform_image(im1, config, u_top=u[2], u_left=u[3], flip=bool(flips[1]))
                        if lab == 1.0:
                            writer.add_pair(str(caption), t0_img, t1_img, winner_meta=m0, loser_meta=m1)
                        else:
                            writer.add_pair(str(caption), t1_img, t0_img, winner_meta=m1, loser_meta=m0)
                except _BadRow as e:
                    if config.on_bad_row == "error":
                        raise DatasetError(
                            f"{e} — fix or drop the row, or import with on_bad_row='skip'; nothing was written"
                        ) from e.__cause__
                    rejected += 1
                    if len(rejections) < _MAX_REJECTIONS_LISTED:
                        rejections.append(str(e))
                bar.set_postfix({"pairs": writer.num_pairs, "ties": ties, "rejected": rejected}, refresh=False)
                bar.update(1)
                if rows_read % progress_every == 0:
                    rate = rows_read / max(time.monotonic() - t0, 1e-9)
                    say(f"read {rows_read}/{total} rows: {writer.num_pairs} pairs, {ties} ties dropped, "
                        f"{rejected} rejected ({rate:.0f} rows/s)")
                if config.max_pairs is not None and writer.num_pairs >= config.max_pairs:
                    done = True
                    break
            if done:
                break
        pairs = writer.num_pairs
        if pairs == 0:
            raise DatasetError(
                f"no decided pairs in {[str(p) for p in files]}: {rows_read} rows read, {ties} ties dropped, "
                f"{rejected} rejected; nothing was written to {out_dir}"
            )
        counts = {"files": file_info, "rows_read": rows_read, "pairs_written": pairs, "ties_dropped": ties,
                  "rows_rejected": rejected, "rejections": rejections}  # the first 20 messages
        index_path = writer.close(counts)
    say(f"imported {pairs} pairs from {rows_read} rows ({ties} ties dropped, {rejected} rejected) into {out_dir}")
    return ImportSummary(rows_read=rows_read, pairs_written=pairs, ties_dropped=ties, rows_rejected=rejected,
                         files=file_info, index_path=index_path)


__all__ = ["ImportConfig", "ImportSummary", "import_pickapic", "resized_size"]
