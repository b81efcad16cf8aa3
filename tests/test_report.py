import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from evaluation.report import format_value, png_data_uri, render_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.imgs, self.text, self.attrs, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


METRICS = [
    {"metric": "pickscore", "scorer": "PickScore_v1", "base": 21.5, "trained": 21.875, "diff": 0.375,
     "ci_low": 0.125, "ci_high": 0.625, "win_rate": 0.6875, "win_rate_ci": (0.4375, 0.8125),
     "wins": 11, "losses": 5, "ties": 0, "p_value": 0.2101},
    {"metric": "aesthetic", "scorer": "laion-aesthetic-v2", "base": 5.25, "trained": 5.5, "diff": 0.25,
     "ci_low": -0.0625, "ci_high": 0.5625, "win_rate": 0.5625, "win_rate_ci": (0.3125, 0.75),
     "wins": 9, "losses": 7, "ties": 0, "p_value": 0.8036, "n_prompts": 8},
]


def _pairs(tmp_path):
    pairs = []
    sizes = [(24, 16), (20, 20), (12, 30)]
    for i, (w, h) in enumerate(sizes):
        base = Image.new("RGB", (w, h), (10 * i, 0, 0))
        trained = Image.new("RGB", (w, h), (0, 10 * i, 0))
        if i == 0:  # one as a PNG path, one as a uint8 array: all accepted inputs
            base.save(tmp_path / "b0.png")
            base = tmp_path / "b0.png"
            trained = np.asarray(trained)
        prompt = "a cat <script>alert('x')</script> & dog" if i == 1 else f"prompt {i}"
        pairs.append((prompt, 1000 + i, base, trained, 0.25 + i, 0.5 + i))
    return pairs, sizes


def test_render_report_self_contained_escaped_and_complete(tmp_path):
    pairs, sizes = _pairs(tmp_path)
    out = render_report(
        tmp_path / "out" / "report.html", title="Round 3 <eval>", metrics_table=METRICS,
        skipped=[("hpsv2", "weights not found: /models/hpsv2 (HF_HUB_OFFLINE=1)")], image_pairs=pairs,
        extra_sections={"Human rates": [{"round": 0, "normal_rate": 0.625}, {"round": 1, "normal_rate": 0.8125}],
                        "Notes": "ties = |d| <= 0.01"},
        params={"evaluate": {"tie_margin": 0.01, "seeds_per_prompt": 2}, "judge": "pickscore"},
    )
    assert out == tmp_path / "out" / "report.html" and out.is_file()
    assert not [p for p in out.parent.iterdir() if p != out]  # atomic write left no temp file
    html = out.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(html)
    text = "\n".join(parser.text)

    # no external resources at all
    assert "http://" not in html and "https://" not in html
    for name, value in parser.attrs:
        if name in ("src", "href"):
            assert value.startswith("data:image/png;base64,"), value
    assert not {"script", "link", "iframe", "object"} & set(parser.tags)

    # escaped prompt: shown as text, never a tag
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "a cat <script>alert('x')</script> & dog" in text
    assert "Round 3 <eval>" in text and "<eval>" not in html

    # every metric name and every value, formatted
    for row in METRICS:
        for key, value in row.items():
            assert key in text, key
            assert format_value(value) in text, (key, value)
    assert "[0.4375, 0.8125]" in text and "0.2101" in text and "21.88" in text  # .4g of 21.875
    assert "hpsv2" in text and "weights not found: /models/hpsv2 (HF_HUB_OFFLINE=1)" in text
    assert "Human rates" in text and "0.8125" in text and "ties = |d| <= 0.01" in text
    assert "evaluate.tie_margin" in text and "evaluate.seeds_per_prompt" in text and "pickscore" in text

    # two images per pair, each a PNG of the original size, labelled with the seed
    assert len(parser.imgs) == 2 * len(pairs)
    for k, img in enumerate(parser.imgs):
        w, h = sizes[k // 2]
        data = base64.b64decode(img["src"].split(",", 1)[1])
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (w, h)
        assert (int(img["width"]), int(img["height"])) == (w, h)
    for i, (_, seed, *_rest) in enumerate(pairs):
        assert f"base · seed {seed}" in text and f"trained · seed {seed}" in text
    assert "1.25" in text and "1.5" in text  # scores of pair 1
    # the PNG file was embedded byte for byte
    assert parser.imgs[0]["src"].endswith(base64.b64encode((tmp_path / "b0.png").read_bytes()).decode())


def test_render_report_empty_sections_and_deterministic(tmp_path):
    a = render_report(tmp_path / "a.html", title="t", metrics_table=[], skipped=[], image_pairs=[])
    b = render_report(tmp_path / "b.html", title="t", metrics_table=[], skipped=[], image_pairs=[])
    html = a.read_text()
    assert html == b.read_text()
    assert "No metrics." in html and "None." in html and "No image pairs." in html
    assert re.search(r"<img", html) is None


def test_png_data_uri_downscale_and_modes(tmp_path):
    uri, w, h = png_data_uri(Image.new("RGB", (64, 32)), max_side=16)
    assert (w, h) == (16, 8)
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.size == (16, 8)
    Image.new("RGB", (10, 10)).save(tmp_path / "x.jpg")
    uri, w, h = png_data_uri(tmp_path / "x.jpg")  # non-PNG file is re-encoded
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG") and (w, h) == (10, 10)
    uri, w, h = png_data_uri(Image.new("CMYK", (5, 4)))
    assert (w, h) == (5, 4)
    with pytest.raises(TypeError, match="PNG path"):
        png_data_uri(123)


def test_format_value_and_bad_inputs(tmp_path):
    assert format_value(None) == "" and format_value(3) == "3" and format_value(np.int64(4)) == "4"
    assert format_value(float("nan")) == "n/a" and format_value(np.float32(0.5)) == "0.5"
    assert format_value(1e-5) == "1e-05" and format_value(123456.0) == "1.235e+05"
    assert format_value((0.1, 0.25)) == "[0.1, 0.25]" and format_value(True) == "True"
    with pytest.raises(ValueError, match="fields"):
        render_report(tmp_path / "r.html", title="t", metrics_table=[], image_pairs=[("p", 1, None)])
    with pytest.raises(TypeError, match="extra_sections"):
        render_report(tmp_path / "r.html", title="t", metrics_table=[], extra_sections={"x": 3})
    assert not (tmp_path / "r.html").exists()


def test_evaluation_rows_headline_the_prompt_clustered_bootstrap_interval():
    from evaluation.evaluate import report_rows

    m = {"base_mean": 1.0, "trained_mean": 1.5, "mean_diff": 0.5, "mean_diff_low": 0.1, "mean_diff_high": 0.9,
         "win_rate": 0.625, "win_rate_boot_low": 0.25, "win_rate_boot_high": 0.875, "win_rate_wilson_low": 0.4,
         "win_rate_wilson_high": 0.8, "wins": 5, "losses": 3, "ties": 0, "sign_test_p": 0.7266, "n_prompts": 2,
         "decisive_rate": 0.625}
    (row,) = report_rows({"scorers": {"jpeg_compressibility": m}})
    assert row["win_rate_ci"] == (0.25, 0.875) and row["win_rate_ci_wilson"] == (0.4, 0.8)
    assert row["n_prompts"] == 2 and row["scorer"] == "jpeg_compressibility"
