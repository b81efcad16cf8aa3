"""Image grids for eyeballing base vs trained samples (PIL only).

Layout (all in pixels, white background):
``x0`` = row-label column width (0 without row labels), ``y0`` = column-label band height
(0 without column labels), ``th`` = tile-label band height under each tile (0 without tile labels),
``dx(c)`` = ``DIVIDER_W`` for columns at or right of a divider, else 0 (``dw = DIVIDER_W`` with a divider,
else 0). Tile (r, c) has its top-left corner at ``(x0 + pad + c*(w + pad) + dx(c), y0 + pad + r*(h + th + pad))``;
the canvas is ``(x0 + pad + cols*(w + pad) + dw, y0 + pad + rows*(h + th + pad))``. Column labels are
word-wrapped to the tile width; row labels and tile labels are drawn on one line; row labels set the column width.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prefdiff.data.atomic import atomic_write_bytes

__all__ = ["DIVIDER_W", "image_grid", "base_vs_trained_grid", "paired_rows_grid", "save_png_atomic"]

_BG = (255, 255, 255)
_FG = (0, 0, 0)
_DIVIDER_FG = (96, 96, 96)
DIVIDER_W = 8  # px between the two sides of a divided grid; a 2 px grey line in its middle


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - min(left, 0))


def _line_h(font) -> int:
    _, top, _, bottom = font.getbbox("Ayg|")
    return int(bottom - min(top, 0)) + 1


def _wrap(font, text: str, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px; words longer than a line are split by characters."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split(" "):
            cand = word if not cur else f"{cur} {word}"
            if _text_w(font, cand) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = ""
            for ch in word:  # hard-break an over-long word
                if cur and _text_w(font, cur + ch) > width:
                    lines.append(cur)
                    cur = ""
                cur += ch
        lines.append(cur)
    return lines


def image_grid(
    rows: list[list[Image.Image]],
    *,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    pad: int = 2,
    tile_labels: list[list[str]] | None = None,
    tile_label_colors: list[list[tuple[int, int, int]]] | None = None,
    divider_at: int | None = None,
) -> Image.Image:
    """Paste equal-size images into an RGB grid, optionally with row/column labels, one label under each tile
    (``tile_labels[r][c]``, black or ``tile_label_colors[r][c]``) and a vertical divider left of column
    ``divider_at`` (see module doc)."""
    if not rows or not rows[0]:
        raise ValueError("rows: empty; need at least one row with one image")
    n_cols = len(rows[0])
    for r, row in enumerate(rows):
        if len(row) != n_cols:
            raise ValueError(f"rows[{r}]: has {len(row)} images but rows[0] has {n_cols}; rows must be equal length")
    w, h = rows[0][0].size
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            if im.size != (w, h):
                raise ValueError(f"rows[{r}][{c}]: size {im.size} differs from rows[0][0] size {(w, h)}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels: has {len(row_labels)} labels but there are {len(rows)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"col_labels: has {len(col_labels)} labels but there are {n_cols} columns")
    if pad < 0:
        raise ValueError(f"pad={pad!r}: must be >= 0")
    if tile_labels is not None and [len(r) for r in tile_labels] != [len(r) for r in rows]:
        raise ValueError(f"tile_labels: shape {[len(r) for r in tile_labels]} (labels per row) differs from the "
                         f"images' {[len(r) for r in rows]}; give one label per image")
    if tile_label_colors is not None and (tile_labels is None
                                          or [len(r) for r in tile_label_colors] != [len(r) for r in rows]):
        raise ValueError("tile_label_colors: give tile_labels and one colour per tile label")
    if divider_at is not None and not 0 < divider_at < n_cols:
        raise ValueError(f"divider_at={divider_at!r}: must be a column index in 1..{n_cols - 1} (a divider between "
                         "two columns)")

    font = _font()
    lh = _line_h(font)
    x0 = (max(_text_w(font, s) for s in row_labels) + 2 * pad) if row_labels else 0
    wrapped = [_wrap(font, s, w) for s in col_labels] if col_labels else []
    y0 = (max(len(ls) for ls in wrapped) * lh + pad) if col_labels else 0
    th = lh if tile_labels is not None else 0
    dw = DIVIDER_W if divider_at is not None else 0

    def tile_x(c: int) -> int:
        return x0 + pad + c * (w + pad) + (dw if divider_at is not None and c >= divider_at else 0)

    canvas = Image.new("RGB", (x0 + pad + n_cols * (w + pad) + dw, y0 + pad + len(rows) * (h + th + pad)), _BG)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = y0 + pad + r * (h + th + pad)
        for c, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (tile_x(c), y))
            if tile_labels is not None:
                fill = tile_label_colors[r][c] if tile_label_colors is not None else _FG
                draw.text((tile_x(c), y + h), tile_labels[r][c], fill=fill, font=font)
        if row_labels:
            draw.text((pad, y + max(0, (h - lh) // 2)), row_labels[r], fill=_FG, font=font)
    for c, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            draw.text((tile_x(c), pad + i * lh), line, fill=_FG, font=font)
    if divider_at is not None:
        line_x = tile_x(divider_at) - (pad + dw) // 2 - 1  # centred in the pad + dw gap left of column divider_at
        draw.rectangle((line_x, y0, line_x + 1, canvas.size[1] - 1), fill=_DIVIDER_FG)
    return canvas


def base_vs_trained_grid(
    base: list[Image.Image], trained: list[Image.Image], captions: list[str]
) -> Image.Image:
    """Two rows, "base" on top and "trained" below, one column per (prompt, seed) with its caption."""
    if not (len(base) == len(trained) == len(captions)):
        raise ValueError(
            f"base_vs_trained_grid: base has {len(base)} images, trained has {len(trained)}, "
            f"captions has {len(captions)}; all must be equal"
        )
    return image_grid([list(base), list(trained)], row_labels=["base", "trained"], col_labels=list(captions))


def paired_rows_grid(
    base_rows: list[list[Image.Image]],
    trained_rows: list[list[Image.Image]],
    *,
    row_labels: list[str],
    base_labels: list[list[str]],
    trained_labels: list[list[str]],
    base_title: str = "base",
    trained_title: str = "trained",
    base_label_colors: list[list[tuple[int, int, int]]] | None = None,
    trained_label_colors: list[list[tuple[int, int, int]]] | None = None,
) -> Image.Image:
    """One row per group (e.g. per digit): its base samples, a divider, then its trained samples (the same
    seeds in the same order), each tile labelled (in black, or the given colours); the first column of each
    side is titled."""
    if not (len(base_rows) == len(trained_rows) == len(row_labels) == len(base_labels) == len(trained_labels)):
        raise ValueError(f"paired_rows_grid: {len(base_rows)} base rows, {len(trained_rows)} trained rows, "
                         f"{len(row_labels)} row labels, {len(base_labels)} and {len(trained_labels)} tile-label "
                         "rows; all must be equal")
    for r, (b, t) in enumerate(zip(base_rows, trained_rows)):
        if len(b) != len(t):
            raise ValueError(f"paired_rows_grid: row {r} has {len(b)} base and {len(t)} trained images; each trained "
                             "image pairs with the base image of the same seed")
    side = len(base_rows[0]) if base_rows else 0
    titles = [base_title] + [""] * (side - 1) + [trained_title] + [""] * (side - 1)
    colors = None
    if base_label_colors is not None or trained_label_colors is not None:
        colors = [list(b) + list(t) for b, t in zip(base_label_colors or [[_FG] * side] * len(base_rows),
                                                    trained_label_colors or [[_FG] * side] * len(trained_rows))]
    return image_grid([list(b) + list(t) for b, t in zip(base_rows, trained_rows)], row_labels=list(row_labels),
                      col_labels=titles, tile_labels=[list(b) + list(t) for b, t in zip(base_labels, trained_labels)],
                      tile_label_colors=colors, divider_at=side)


def save_png_atomic(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` as PNG through :func:`prefdiff.data.atomic.atomic_write_bytes` (temp sibling, fsync,
    ``os.replace``; a killed run's temp PNGs are removed by the next write there)."""
    path = Path(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
