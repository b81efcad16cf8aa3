"""Known-answer experiment on images (experiments.digits): on the committed digits model, preferences by the
digit classifier (``digit_alignment``) must make D3PO and Diffusion-DPO draw the prompted digit more often.

The experiment trains on the 4 digits the base draws worst (192 pairs) and measures the mean
``digit_alignment`` of 48 held-out samples (the same seeds for every model). Thresholds were fixed after
``python -m experiments.digits --seeds 0 1 2`` (2 threads): base 0.420 on every seed (the same model and
seeds), D3PO 0.449-0.486 (+0.029 .. +0.066), Diffusion-DPO 0.457-0.474 (+0.037 .. +0.054). Seed 0 is
asserted; its margins (+0.066, +0.054) are twice the bound. About 50-65 s on 2 CPU cores.
"""

import pytest

from experiments import digits

MARGIN = 0.02  # mean classifier probability of the prompted digit, trained minus base


@pytest.fixture(scope="module")
def result() -> dict:
    return digits.run_known_answer(seed=0)


def test_base_draws_the_hard_digits_less_than_half_the_time(result):
    assert 0.3 <= result["base"] <= 0.55  # measured 0.420: room to improve, far above chance (0.1)


def test_d3po_raises_digit_alignment(result):
    assert result["d3po"] >= result["base"] + MARGIN


def test_diffusion_dpo_raises_digit_alignment(result):
    assert result["diffusion_dpo"] >= result["base"] + MARGIN
