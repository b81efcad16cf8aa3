"""One self-contained HTML evaluation report: metric table, skipped scorers, base vs trained image pairs.

The file has no external resource: CSS is inline, images are inlined as ``data:image/png;base64`` URIs,
and there are no links, scripts or fonts to fetch, so it can be attached to an MLflow run or mailed as
is. Every text value (prompts, scorer names, reasons, parameters) is HTML-escaped by Jinja2's
autoescape, so a prompt such as ``<script>`` is shown, never run. Output is deterministic (no
timestamp: put one in ``params`` if wanted) and written atomically.

Numbers are shown with :func:`format_value`: ints as is, floats with 4 significant digits (``.4g``),
NaN as ``n/a``, ``(low, high)`` pairs as ``[low, high]``.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from prefdiff.data.atomic import atomic_write_text

__all__ = ["Figure", "format_value", "png_data_uri", "render_report"]

# Known metric columns, in display order; any other key of a row follows, in order of first appearance.
METRIC_COLUMNS = ("metric", "scorer", "base", "trained", "diff", "ci_low", "ci_high", "win_rate", "win_rate_ci",
                  "wins", "losses", "ties", "p_value")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pairs { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure.pair { margin: 0; border: 1px solid #ddd; padding: 0.5em; max-width: 100%; }
figure.pair figcaption { font-size: 0.9em; margin-bottom: 0.4em; max-width: 40em; overflow-wrap: anywhere; }
.side { display: flex; gap: 0.5em; }
.side div { text-align: center; font-size: 0.85em; }
.side img { display: block; max-width: 320px; height: auto; image-rendering: auto; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
figure.figure { margin: 0; } figure.figure img { max-width: 100%; height: auto; }
figure.figure figcaption { font-size: 0.9em; margin-top: 0.4em; max-width: 60em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% macro table(columns, rows) -%}
<table>
{%- if columns %}
<thead><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
{%- endif %}
<tbody>
{%- for row in rows %}
<tr>{% for cell in row %}<td{% if cell.num %} class="num"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>
{%- endfor %}
</tbody>
</table>
{%- endmacro %}

<section id="metrics">
<h2>Metrics</h2>
{% if metrics.rows %}{{ table(metrics.columns, metrics.rows) }}{% else %}<p>No metrics.</p>{% endif %}
</section>

<section id="skipped">
<h2>Skipped scorers</h2>
{% if skipped.rows %}{{ table(skipped.columns, skipped.rows) }}{% else %}<p>None.</p>{% endif %}
</section>

<section id="pairs">
<h2>Base vs trained samples</h2>
{% if pairs %}<p>Base (left) and trained (right) from the same prompt and seed.</p>
<div class="pairs">
{%- for p in pairs %}
<figure class="pair">
<figcaption>{{ p.prompt }} &middot; seed {{ p.seed }}</figcaption>
<div class="side">
{%- for side in ("base", "trained") %}{% set im = p[side] %}
<div><img src="{{ im.uri }}" width="{{ im.width }}" height="{{ im.height }}"
 alt="{{ side }}, seed {{ p.seed }}: {{ p.prompt }}">
{{ side }} &middot; seed {{ p.seed }}{% if p[side ~ "_score"] %} &middot; {{ p[side ~ "_score"] }}{% endif %}</div>
{%- endfor %}
</div>
</figure>
{%- endfor %}
</div>
{% else %}<p>No image pairs.</p>{% endif %}
</section>
{% for sec in extra %}
<section class="extra">
<h2>{{ sec.name }}</h2>
{% if sec.pre is not none %}<pre>{{ sec.pre }}</pre>
{%- elif sec.figure is not none %}<figure class="figure"><img src="{{ sec.figure.uri }}" width="{{ sec.figure.width }}"
 height="{{ sec.figure.height }}" alt="{{ sec.name }}">{% if sec.figure.caption %}
<figcaption>{{ sec.figure.caption }}</figcaption>{% endif %}</figure>
{%- else %}{{ table(sec.columns, sec.rows) }}{% endif %}
</section>
{% endfor %}
<section id="params">
<h2>Parameters</h2>
{% if params.rows %}{{ table(params.columns, params.rows) }}{% else %}<p>None given.</p>{% endif %}
</section>
</body>
</html>
"""


@dataclass(frozen=True)
class Figure:
    """An image shown at its own size in an extra section (``image``: a PNG path, PIL image or uint8 array)."""

    image: Any
    caption: str = ""


def format_value(value: Any) -> str:
    """Display text of a table value (see module docstring)."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, numbers.Real) for v in value):
        return f"[{format_value(value[0])}, {format_value(value[1])}]"
    return str(value)


def _cell(value: Any) -> dict:
    return {"text": format_value(value), "num": isinstance(value, numbers.Real) and not isinstance(value, bool)}


def _to_png_image(img: Any) -> tuple[bytes | None, Image.Image | None]:
    if isinstance(img, (str, os.PathLike)):
        data = Path(img).read_bytes()
        if data.startswith(_PNG_MAGIC):
            return data, None
        return None, Image.open(io.BytesIO(data))
    if isinstance(img, Image.Image):
        return None, img
    if isinstance(img, np.ndarray):
        return None, Image.fromarray(img)
    raise TypeError(f"image: expected a PNG path, PIL image or uint8 array, got {type(img).__name__}")


def png_data_uri(img: Any, max_side: int | None = None) -> tuple[str, int, int]:
    """``(data URI, width, height)`` of ``img`` (PNG path, PIL image or HxW[xC] uint8 array) as PNG.

    A PNG file is embedded byte for byte unless ``max_side`` asks for a downscale (aspect kept,
    longest side <= ``max_side``); anything else is re-encoded as PNG (modes PNG cannot store -> RGB).
    """
    raw, im = _to_png_image(img)
    if raw is not None and max_side is None:
        with Image.open(io.BytesIO(raw)) as probe:
            w, h = probe.size
        return "data:image/png;base64," + base64.b64encode(raw).decode("ascii"), w, h
    if im is None:
        im = Image.open(io.BytesIO(raw))
    im.load()
    if im.mode not in _PNG_MODES:
        im = im.convert("RGB")
    if max_side is not None:
        if max_side < 1:
            raise ValueError(f"max_side={max_side!r}: must be >= 1")
        if max(im.size) > max_side:
            im = im.copy()
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.size[0], im.size[1]


def _columns(rows: Sequence[Mapping[str, Any]], preferred: Sequence[str] = ()) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for k in row:
            if k not in seen:
                seen.append(k)
    return [c for c in preferred if c in seen] + [c for c in seen if c not in preferred]


def _dict_table(rows: Sequence[Mapping[str, Any]], preferred: Sequence[str] = ()) -> dict:
    cols = _columns(rows, preferred)
    return {"columns": cols, "rows": [[_cell(r.get(c)) for c in cols] for r in rows]}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _kv_table(d: Mapping[str, Any]) -> dict:
    return {"columns": ["name", "value"], "rows": [[_cell(k), _cell(v)] for k, v in _flatten(d)]}


def _extra_section(name: str, data: Any) -> dict:
    sec = {"name": name, "pre": None, "figure": None, "columns": [], "rows": []}
    if isinstance(data, str):
        sec["pre"] = data
    elif isinstance(data, Figure):
        uri, width, height = png_data_uri(data.image)
        sec["figure"] = {"uri": uri, "width": width, "height": height, "caption": data.caption}
    elif isinstance(data, Mapping):
        sec.update(_kv_table(data))
    elif isinstance(data, Sequence) and all(isinstance(r, Mapping) for r in data):
        sec.update(_dict_table(data))
    elif isinstance(data, Sequence) and all(isinstance(r, Sequence) and not isinstance(r, str) for r in data):
        sec["rows"] = [[_cell(v) for v in r] for r in data]
    else:
        raise TypeError(f"extra_sections[{name!r}]: expected a str, a Figure, a mapping, a list of mappings or a "
                        f"list of rows, got {type(data).__name__}")
    return sec


def _pair(item: Sequence[Any], max_side: int | None) -> dict:
    if len(item) not in (4, 6):
        raise ValueError(f"image_pairs: each item is (prompt, seed, base, trained[, base_score, trained_score]), "
                         f"got {len(item)} fields")
    prompt, seed, base, trained = item[:4]
    base_score, trained_score = item[4:6] if len(item) == 6 else (None, None)
    b_uri, b_w, b_h = png_data_uri(base, max_side)
    t_uri, t_w, t_h = png_data_uri(trained, max_side)
    return {"prompt": str(prompt), "seed": format_value(seed),
            "base": {"uri": b_uri, "width": b_w, "height": b_h},
            "trained": {"uri": t_uri, "width": t_w, "height": t_h},
            "base_score": format_value(base_score), "trained_score": format_value(trained_score)}


def render_html(
    *,
    title: str,
    metrics_table: Sequence[Mapping[str, Any]],
    skipped: Sequence[tuple[str, str]] = (),
    image_pairs: Sequence[Sequence[Any]] = (),
    extra_sections: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    max_image_side: int | None = None,
) -> str:
    """The report as an HTML string (see :func:`render_report`)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    context = {
        "title": title,
        "metrics": _dict_table(list(metrics_table), METRIC_COLUMNS),
        "skipped": {"columns": ["scorer", "reason"], "rows": [[_cell(s), _cell(r)] for s, r in skipped]},
        "pairs": [_pair(p, max_image_side) for p in image_pairs],
        "extra": [_extra_section(str(k), v) for k, v in (extra_sections or {}).items()],
        "params": _kv_table(params or {}),
    }
    return env.from_string(_TEMPLATE).render(**context)


def render_report(
    out_path: str | os.PathLike[str],
    *,
    title: str,
    metrics_table: Sequence[Mapping[str, Any]],
    skipped: Sequence[tuple[str, str]] = (),
    image_pairs: Sequence[Sequence[Any]] = (),
    extra_sections: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    max_image_side: int | None = None,
) -> Path:
    """Write the self-contained HTML report to ``out_path`` atomically and return the path.

    * ``metrics_table``: one mapping per (metric, scorer) row. Columns of :data:`METRIC_COLUMNS`
      (metric, scorer, base, trained, diff, ci_low, ci_high, win_rate, win_rate_ci, wins, losses, ties,
      p_value) come first when present, any other keys after them; a missing cell is blank.
    * ``skipped``: ``(scorer, reason)`` for each scorer that did not run.
    * ``image_pairs``: ``(prompt, seed, base, trained, base_score, trained_score)`` (the two scores may be
      left off or None); ``base`` / ``trained`` are a PNG path, a PIL image or a uint8 array. Shown side
      by side, both labelled with the seed.
    * ``extra_sections``: ``{heading: data}``, data a str (shown preformatted), a :class:`Figure` (an image
      with a caption), a mapping (name / value table), a list of mappings (table, columns = union of keys) or
      a list of row sequences.
    * ``params``: shown as a name / value table, nested mappings flattened to dotted names.
    * ``max_image_side``: downscale images so the longest side is at most this (None = as they are).
    """
    html = render_html(title=title, metrics_table=metrics_table, skipped=skipped, image_pairs=image_pairs,
                       extra_sections=extra_sections, params=params, max_image_side=max_image_side)
    out = Path(out_path)
    atomic_write_text(out, html)
    return out
