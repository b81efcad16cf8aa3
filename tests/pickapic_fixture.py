"""Synthetic Pick-a-Pic-style parquet files, made by the tests (nothing is downloaded).

``write_synthetic_pickapic(path, rows)`` writes one parquet file; each row is a dict whose values may be
PIL images (encoded here, PNG by default), raw bytes, numbers, strings or None. Columns are the union of
the rows' keys in first-seen order, so a test drops a column by leaving it out. ``default_rows()`` is a
small mixed set (decided both ways, a tie, two image sizes) the importer and pipeline tests share.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

import pyarrow as pa
import pyarrow.parquet as pq

RED, GREEN, BLUE, YELLOW, WHITE, BLACK = (
    (220, 30, 30), (30, 200, 40), (30, 40, 210), (230, 220, 20), (250, 250, 250), (10, 10, 10),
)


def solid(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def half_split(width: int, height: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """Left half one colour, right half another: shows whether an image was flipped."""
    im = Image.new("RGB", (width, height), left)
    im.paste(Image.new("RGB", (width - width // 2, height), right), (width // 2, 0))
    return im


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth 2-D gradient (every column and row differs: crops and flips are visible)."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                    np.full_like(x, (seed * 37) % 256)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def encode(image: Image.Image, fmt: str = "PNG", **save_kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


_TYPES = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "caption": pa.string()}


def write_synthetic_pickapic(path: Path, rows: list[dict], *, image_format: str = "PNG",
                             row_group_size: int | None = None) -> Path:
    """Write ``rows`` as a parquet file at ``path`` (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    data: dict[str, list] = {c: [] for c in columns}
    for r in rows:
        for c in columns:
            v = r.get(c)
            data[c].append(encode(v, image_format) if isinstance(v, Image.Image) else v)
    arrays = {}
    for c in columns:
        typ = _TYPES.get(c)
        if typ is None and any(isinstance(v, (bytes, bytearray)) for v in data[c]):
            typ = pa.binary()
        arrays[c] = pa.array(data[c], type=typ)
    pq.write_table(pa.table(arrays), str(path), row_group_size=row_group_size)
    return path


def default_rows() -> list[dict]:
    """Five rows: 3 decided (both label directions), 1 tie, 1 decided with an 80x60 vs 50x70 pair."""
    return [
        {"jpg_0": solid(80, 60, RED), "jpg_1": solid(50, 70, BLUE), "label_0": 1.0, "caption": "a red square",
         "model_0": "m0", "model_1": "m1"},
        {"jpg_0": solid(80, 60, GREEN), "jpg_1": solid(50, 70, YELLOW), "label_0": 0.0, "caption": "a yellow one",
         "model_0": "m0", "model_1": "m1"},
        {"jpg_0": solid(64, 64, WHITE), "jpg_1": solid(64, 64, BLACK), "label_0": 0.5, "caption": "a tie",
         "model_0": "m0", "model_1": "m1"},
        {"jpg_0": gradient(80, 60, 1), "jpg_1": gradient(50, 70, 2), "label_0": 1.0, "caption": "gradients",
         "model_0": "m0", "model_1": "m1"},
        {"jpg_0": half_split(80, 60, RED, BLUE), "jpg_1": half_split(70, 50, GREEN, YELLOW), "label_0": 0.0,
         "caption": "halves", "model_0": "m0", "model_1": "m1"},
    ]


__all__ = ["default_rows", "encode", "gradient", "half_split", "solid", "write_synthetic_pickapic",
           "RED", "GREEN", "BLUE", "YELLOW", "WHITE", "BLACK"]
