"""Image grids for eyeballing base vs trained samples (PIL only).

Layout (all in pixels, white background):
``x0`` = row-label column width (0 without row labels), ``y0`` = column-label band height
(0 without column labels). Tile (r, c) has its top-left corner at
``(x0 + pad + c*(w + pad), y0 + pad + r*(h + pad))``; the canvas is
``(x0 + pad + cols*(w + pad), y0 + pad + rows*(h + pad))``. Column labels are word-wrapped
to the tile width; row labels are drawn on one line and set the column width.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["image_grid", "base_vs_trained_grid", "save_png_atomic"]

_BG = (255, 255, 255)
_FG = (0, 0, 0)


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
) -> Image.Image:
    """Paste equal-size images into an RGB grid, optionally with row/column labels (see module doc)."""
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

    font = _font()
    lh = _line_h(font)
    x0 = (max(_text_w(font, s) for s in row_labels) + 2 * pad) if row_labels else 0
    wrapped = [_wrap(font, s, w) for s in col_labels] if col_labels else []
    y0 = (max(len(ls) for ls in wrapped) * lh + pad) if col_labels else 0

    canvas = Image.new("RGB", (x0 + pad + n_cols * (w + pad), y0 + pad + len(rows) * (h + pad)), _BG)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = y0 + pad + r * (h + pad)
        for c, im in enumerate(row):
            canvas.paste(im.convert("RGB"), (x0 + pad + c * (w + pad), y))
        if row_labels:
            draw.text((pad, y + max(0, (h - lh) // 2)), row_labels[r], fill=_FG, font=font)
    for c, lines in enumerate(wrapped):
        x = x0 + pad + c * (w + pad)
        for i, line in enumerate(lines):
            draw.text((x, pad + i * lh), line, fill=_FG, font=font)
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


def save_png_atomic(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` as PNG to a temp name in the same directory, then ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
