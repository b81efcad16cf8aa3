"""Digit accuracy in the evaluation (evaluation/digits.py): the numbers on a hand example, the per-digit table,
the sample grid per digit, the report, and evaluate_trained with digit prompts vs animal prompts."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from evaluation.digits import (accuracy_rows, digit_accuracy, digit_sample_grid, per_digit_rows, predicted_digits,
                               prompted_digits)
from evaluation.grid import DIVIDER_W

REPO = Path(__file__).resolve().parents[1]

# 3 prompts x 2 seeds; index i is one (prompt, seed) sample
PROMPTS = ["the digit seven"] * 2 + ["a handwritten 3"] * 2 + ["the digit zero"] * 2
PROMPTED = [7, 7, 3, 3, 0, 0]
BASE_PRED = [7, 1, 3, 3, 8, 9]  # correct: 1 0 1 1 0 0 -> 3 / 6
TRAINED_PRED = [7, 7, 3, 3, 0, 2]  # correct: 1 1 1 1 1 0 -> 5 / 6
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _probabilities(pred: list[int], confidence: float = 0.6) -> np.ndarray:
    """[N, 10]: ``confidence`` on the predicted digit, the rest spread evenly (rows sum to 1)."""
    p = np.full((len(pred), 10), (1.0 - confidence) / 9.0, dtype=np.float32)
    p[np.arange(len(pred)), pred] = confidence
    return p


def _wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval written out: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def _clustered_bootstrap(correct: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Whole prompts (pairs of seeds) resampled: the 3 per-prompt means drawn with replacement, averaged."""
    per_prompt = correct.reshape(3, 2).mean(axis=1)  # every prompt has 2 samples, so the mean of means is exact
    draws = np.random.default_rng(seed).integers(0, 3, size=(n_boot, 3))
    return tuple(np.quantile(per_prompt[draws].mean(axis=1), [0.025, 0.975]))


def test_prompted_digits_only_when_every_prompt_names_one():
    assert prompted_digits(PROMPTS) == PROMPTED
    assert prompted_digits(["cat", "dog"]) is None
    assert prompted_digits(["the digit seven", "cat"]) is None  # one prompt without a digit: not a digit evaluation
    assert prompted_digits(["3 or 4"]) is None  # several digits


def test_predicted_digits_is_the_argmax_and_checks_the_shape():
    assert predicted_digits(_probabilities(BASE_PRED)).tolist() == BASE_PRED
    with pytest.raises(ValueError, match=r"\[N, 10\]"):
        predicted_digits(np.zeros((4, 9)))


def test_digit_accuracy_on_a_hand_example():
    n_boot, seed = 400, 11
    block = digit_accuracy(PROMPTED, predicted_digits(_probabilities(BASE_PRED)),
                           predicted_digits(_probabilities(TRAINED_PRED)), PROMPTS, n_boot=n_boot, seed=seed)
    assert (block["n"], block["n_prompts"]) == (6, 3)
    assert block["base"] == 3 / 6 and block["trained"] == 5 / 6 and block["gain"] == pytest.approx(2 / 6, abs=1e-15)
    # Wilson on 3 of 6 and 5 of 6, against the formula (float rounding only: 1e-12)
    for side, k in (("base", 3), ("trained", 5)):
        low, high = _wilson(k, 6)
        assert block[f"{side}_wilson_low"] == pytest.approx(low, abs=1e-12)
        assert block[f"{side}_wilson_high"] == pytest.approx(high, abs=1e-12)
    # scipy.stats.binomtest(3, 6).proportion_ci(method="wilson") = (0.18761630648265054, 0.8123836935173494)
    assert (block["base_wilson_low"], block["base_wilson_high"]) == pytest.approx(
        (0.18761630648265054, 0.8123836935173494), abs=1e-12)
    # the headline interval resamples prompts, not samples (independent re-implementation, same random stream)
    base_ok = np.array([1, 0, 1, 1, 0, 0], dtype=float)
    trained_ok = np.array([1, 1, 1, 1, 1, 0], dtype=float)
    for side, ok in (("base", base_ok), ("trained", trained_ok), ("gain", trained_ok - base_ok)):
        low, high = _clustered_bootstrap(ok, n_boot, seed)
        assert (block[f"{side}_low"], block[f"{side}_high"]) == pytest.approx((low, high), abs=1e-12)
    # prompt means are base (0.5, 1, 0), trained (1, 1, 0.5): every resample lies between the extremes
    assert 0.0 <= block["base_low"] <= 0.5 <= block["base_high"] <= 1.0
    assert 0.5 <= block["trained_low"] <= block["trained_high"] <= 1.0
    assert block["per_digit"] == {"0": {"n": 2, "base": 0.0, "trained": 0.5},
                                  "3": {"n": 2, "base": 1.0, "trained": 1.0},
                                  "7": {"n": 2, "base": 0.5, "trained": 1.0}}
    with pytest.raises(ValueError, match="trained_pred has length 5"):
        digit_accuracy(PROMPTED, BASE_PRED, TRAINED_PRED[:5], PROMPTS, n_boot=10, seed=0)


def test_report_tables_and_flat_metric_names():
    from evaluation.evaluate import flat_metrics

    block = digit_accuracy(PROMPTED, BASE_PRED, TRAINED_PRED, PROMPTS, n_boot=50, seed=0)
    rows = accuracy_rows(block, "base")
    assert [r["model"] for r in rows] == ["base", "trained", "trained - base"]
    assert rows[0]["accuracy"] == 0.5 and rows[0]["ci"] == (block["base_low"], block["base_high"])
    assert rows[1]["ci_wilson"] == (block["trained_wilson_low"], block["trained_wilson_high"])
    assert per_digit_rows(block, "base") == [
        {"digit": 0, "n": 2, "base accuracy": 0.0, "trained accuracy": 0.5},
        {"digit": 3, "n": 2, "base accuracy": 1.0, "trained accuracy": 1.0},
        {"digit": 7, "n": 2, "base accuracy": 0.5, "trained accuracy": 1.0}]
    flat = flat_metrics({"win_rate": 0.5, "digit_accuracy": block}, "eval/")
    assert flat["eval/digit_accuracy/base"] == 0.5 and flat["eval/digit_accuracy/trained_wilson_low"] == pytest.approx(
        _wilson(5, 6)[0], abs=1e-12)
    assert flat["eval/digit_accuracy/per_digit/7/trained"] == 1.0 and flat["eval/digit_accuracy/per_digit/0/n"] == 2
    assert "eval/digit_accuracy/interval" not in flat  # a description, not a number


def _solid(value: int, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), _colour(value))


def _colour(value: int) -> tuple[int, int, int]:
    return (value, 200, 255 - value)  # not grey: anti-aliased black-on-white text never has these colours


def _bbox(img: Image.Image, color) -> tuple[int, int, int, int]:
    a = np.asarray(img)
    ys, xs = np.nonzero(np.all(a == np.array(color, dtype=np.uint8), axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_digit_sample_grid_layout():
    # samples: digit 3 x 3 (base colours 10/11/12, trained 20/21/22), digit 5 x 1 (base 30, trained 40); 32 px
    prompted = [3, 3, 5, 3]
    base = [_solid(v) for v in (10, 11, 30, 12)]
    trained = [_solid(v) for v in (20, 21, 40, 22)]
    order = [3, 0, 1, 2]  # the grid takes each digit's samples in this order
    base_pred = [8, 8, 5, 3]  # sample 0 (row 0, column 1) misread as 8
    g = digit_sample_grid(base, trained, prompted, base_pred, [3, 3, 5, 3], order, per_digit=2, baseline="base")
    tile, pad = 64, 2  # 32 px samples enlarged by 2 (nearest), the grid's default pad
    # row 0 = digit 3: samples 3, 0 (the first two in order); row 1 = digit 5: sample 2 then a blank tile
    x0, y0 = _bbox(g, _colour(12))[:2]
    assert _bbox(g, _colour(12)) == (x0, y0, x0 + tile, y0 + tile)
    assert _bbox(g, _colour(10))[:2] == (x0 + tile + pad, y0)
    assert not (np.asarray(g) == _colour(11)).all(axis=-1).any()  # the third sample of digit 3 is beyond per_digit
    # trained side: after 2 base columns and the divider, the same seeds in the same order
    assert _bbox(g, _colour(22))[:2] == (x0 + 2 * (tile + pad) + DIVIDER_W, y0)
    assert _bbox(g, _colour(20))[:2] == (x0 + 3 * (tile + pad) + DIVIDER_W, y0)
    row_pitch = _bbox(g, _colour(30))[1] - y0
    assert row_pitch > tile + pad  # a label band under each tile
    assert _bbox(g, _colour(30))[0] == x0 and _bbox(g, _colour(40))[:2] == (x0 + 2 * (tile + pad) + DIVIDER_W,
                                                                             y0 + row_pitch)
    assert g.size == (x0 + 4 * (tile + pad) + DIVIDER_W, y0 + 2 * row_pitch)
    a = np.asarray(g).astype(int)
    # the blank tile right of digit 5's base sample is white, label band included
    blank = a[y0 + row_pitch:y0 + 2 * row_pitch - pad, x0 + tile + pad:x0 + 2 * tile + pad]
    assert (blank == 255).all()
    # the divider: a grey line in the gap between the two sides, over the tile rows
    gap = a[y0:y0 + tile, x0 + 2 * (tile + pad) - pad:x0 + 2 * (tile + pad) + DIVIDER_W]  # along digit 3's tiles
    assert (gap == 96).all(axis=-1).any(axis=0).sum() == 2 and (gap == 96).all(axis=-1).all(axis=0).any()
    # each real tile has its prediction written (dark pixels) in the band under it; row labels on the left
    def band(column: int) -> np.ndarray:  # the label band under row 0's tile in ``column`` (base side)
        return a[y0 + tile:y0 + row_pitch - pad, x0 + column * (tile + pad):x0 + column * (tile + pad) + tile]

    def reddish(px: np.ndarray) -> np.ndarray:
        return (px[..., 0] > 150) & (px[..., 1] < 100) & (px[..., 2] < 100)

    def greenish(px: np.ndarray) -> np.ndarray:
        return (px[..., 1] > px[..., 0] + 40) & (px[..., 1] > px[..., 2] + 40)

    assert greenish(band(0)).any() and not reddish(band(0)).any()  # pred 3 under digit 3: right, green
    assert reddish(band(1)).any() and not greenish(band(1)).any()  # pred 8 under digit 3: wrong, red
    assert (a[y0:y0 + tile, :x0 - pad].max(axis=-1) < 128).any()
    with pytest.raises(ValueError, match="per_digit"):
        digit_sample_grid(base, trained, prompted, prompted, prompted, order, per_digit=0)


def _params(tmp_path: Path, prompts: list[str], scorer_args: dict):
    from prefdiff.config import parse_params
    from prefdiff.profile import merged

    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    overrides = {
        "model": {"source": "builtin:tiny-sd", "device": "cpu"},
        "sampling": {"num_steps": 2},
        "train": {"d3po": {"timestep_window": None}},  # params.yaml's window (5) exceeds these 2 steps
        "label": {"source": "judge", "judge": "jpeg_compressibility", "judge_args": {}},
        "evaluate": {"prompt_set": f"file:{tmp_path / 'prompts.txt'}", "num_prompts": None, "seeds_per_prompt": 2,
                     "judge": None, "scorers": [], "scorer_args": scorer_args, "baseline": "base", "batch_size": 8,
                     "grid_columns": 2, "reward_curve": False, "implicit_accuracy": False, "bootstrap_samples": 100,
                     "report": True},
    }
    return parse_params(merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides))


def _trained_unet(tmp_path: Path) -> Path:
    """A fully fine-tuned tiny UNet stand-in: the base weights plus noise, so trained samples differ from the base
    ones (a full UNet loads in milliseconds; a LoRA takes seconds)."""
    import torch

    from prefdiff.models.finetuned import FULL_UNET_DIR
    from prefdiff.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline().unet
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    unet.save_pretrained(tmp_path / "trained" / FULL_UNET_DIR)
    return tmp_path / "trained"


def test_evaluate_trained_reports_digit_accuracy_only_for_digit_prompts(tmp_path):
    """End to end on the tiny model (random classifier): the block, eval/digits.png and the report sections with
    digit prompts; none of them with animal prompts, and a digit grid left by the first run is removed."""
    import torch
    from safetensors.torch import save_file

    from evaluation.evaluate import DIGIT_GRID, evaluate_trained
    from prefdiff.paths import Paths
    from prefdiff.scorers.digits import DigitClassifier

    torch.manual_seed(3)
    save_file(DigitClassifier(hidden=16).state_dict(), str(tmp_path / "classifier.safetensors"))
    trained = _trained_unet(tmp_path)
    digits = ["the digit seven", "a 2 written by hand", "the digit zero"]
    paths = Paths(tmp_path / "ws")
    params = _params(tmp_path, digits, {"digit_alignment": {"classifier": str(tmp_path / "classifier.safetensors")}})
    m = evaluate_trained(params, trained, paths, progress=lambda _: None).metrics

    block = m["digit_accuracy"]
    assert (block["n"], block["n_prompts"]) == (6, 3) and sorted(block["per_digit"]) == ["0", "2", "7"]
    assert block["base_wilson_low"] <= block["base"] <= block["base_wilson_high"]
    assert block["base"] * 6 == round(block["base"] * 6) and block["trained"] * 6 == round(block["trained"] * 6)
    assert json.loads(paths.eval_metrics.read_text())["digit_accuracy"] == block
    assert "digit_accuracy" not in m["skipped_scorers"]
    with Image.open(paths.eval_dir / DIGIT_GRID) as grid:  # 3 digit rows, 2 samples per side (grid_columns)
        assert grid.size[0] > 4 * 64 + DIVIDER_W and grid.size[1] > 3 * 64
    report = (paths.eval_dir / "report.html").read_text()
    assert "Digit accuracy per digit" in report and "Samples per digit" in report
    assert report.count("<img") == 2 * 2 + 1  # the two image pairs stay; plus the digit grid

    # prompts that name no digit: no new key, no grid, nothing skipped
    params = _params(tmp_path, ["cat", "dog", "owl"], {})
    m = evaluate_trained(params, trained, paths, progress=lambda _: None).metrics
    assert "digit_accuracy" not in m and m["skipped_scorers"] == {}
    assert not any(k.startswith("digit") for k in json.loads(paths.eval_metrics.read_text()))
    assert not (paths.eval_dir / DIGIT_GRID).exists()
    assert "Digit accuracy" not in (paths.eval_dir / "report.html").read_text()


def test_a_missing_classifier_is_a_skip_with_the_reason(tmp_path):
    from evaluation.evaluate import digit_classifier

    digits = ["the digit seven", "the digit zero"]
    params = _params(tmp_path, digits, {"digit_alignment": {"classifier": str(tmp_path / "absent.safetensors")}})
    scorer, reason = digit_classifier(params, {})
    assert scorer is None and "digit_alignment" in reason and str(tmp_path / "absent.safetensors") in reason
    present = tmp_path / "classifier.safetensors"
    present.write_bytes(b"")  # availability checks the file's existence only; nothing is loaded here
    scorer, reason = digit_classifier(_params(tmp_path, digits, {"digit_alignment": {"classifier": str(present)}}), {})
    assert reason == "" and scorer.params() == {"classifier_sha256": hashlib.sha256(b"").hexdigest()}
    own = object()  # the evaluation's own digit_alignment scorer is reused, not built again
    assert digit_classifier(params, {"digit_alignment": own}) == (own, "")


def test_report_shows_a_figure_section_inline(tmp_path):
    from evaluation.report import Figure, render_report

    grid = Image.new("RGB", (30, 20), (5, 6, 7))
    html = render_report(tmp_path / "r.html", title="t", metrics_table=[],
                         extra_sections={"Samples per digit": Figure(grid, "rows <b>digits</b>")}).read_text()
    assert '<figure class="figure"><img src="data:image/png;base64,' in html
    assert 'width="30"' in html and 'height="20"' in html and "rows &lt;b&gt;digits&lt;/b&gt;" in html


def test_the_stage_prints_both_accuracies_with_their_intervals():
    from stages.evaluate import digit_line

    block = digit_accuracy(PROMPTED, BASE_PRED, TRAINED_PRED, PROMPTS, n_boot=50, seed=0)
    line = digit_line(block, "base")
    assert line.startswith("digit accuracy base 0.500 [") and "trained 0.833 [" in line and "gain +0.333 [" in line
    assert f"(Wilson [{block['base_wilson_low']:.3f}, {block['base_wilson_high']:.3f}])" in line
    assert line.endswith("over 3 prompts, 6 samples")
