import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from evaluation.stats import MeanCI, WinRate, mean_ci, paired_outcomes, wilson_interval, win_rate


def test_mean_ci_matches_scipy_t_interval():
    x = np.array([0.31, -1.2, 2.5, 0.7, 1.1, -0.4, 0.9, 1.8, 0.05, -0.65, 1.33, 0.2])
    ci = mean_ci(x, confidence=0.9)
    lo, hi = sps.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert ci.n == 12
    assert ci.mean == pytest.approx(x.mean(), abs=1e-12)
    assert ci.std == pytest.approx(x.std(ddof=1), abs=1e-12)
    assert (ci.low, ci.high) == pytest.approx((lo, hi), abs=1e-12)


def test_mean_ci_hand_value():
    # [1,2,3]: mean 2, s 1, t_{0.975,2} = 4.302652729749462 -> half = 4.30265/sqrt(3) = 2.48413771
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.std == 1.0 and ci.n == 3
    assert ci.low == pytest.approx(2.0 - 2.4841377117503303, abs=1e-9)
    assert ci.high == pytest.approx(2.0 + 2.4841377117503303, abs=1e-9)


def test_mean_ci_n1_and_n0_and_constant():
    ci = mean_ci([3.5])
    assert (ci.mean, ci.low, ci.high, ci.n, ci.std) == (3.5, 3.5, 3.5, 1, 0.0)
    assert "n=1" in ci.note
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    c = mean_ci([2.0, 2.0, 2.0])
    assert (c.low, c.high) == (2.0, 2.0)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.0)


def test_paired_outcomes_with_tie_margin():
    trained = [1.0, 2.0, 3.0, 4.00, 5.0]
    base = [0.5, 2.0, 3.2, 4.05, 5.1]
    assert paired_outcomes(trained, base).tolist() == [1, 0, -1, -1, -1]
    out = paired_outcomes(trained, base, tie_margin=0.1)
    assert out.dtype.kind == "i"
    # diffs: +0.5, 0, -0.2, -0.05, -0.0999.. (5.0 - 5.1 in floats) -> |diff| <= 0.1 is a tie
    assert out.tolist() == [1, 0, -1, 0, 0]


def test_paired_outcomes_length_mismatch_names_both():
    with pytest.raises(ValueError, match=r"length 3.*length 2"):
        paired_outcomes([1, 2, 3], [1, 2])


def test_wilson_hand_values():
    # closed form with z = 1.959963984540054, p = 0.8, n = 10
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016247153664183, abs=1e-12)
    assert hi == pytest.approx(0.9433178485456247, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    # edges: 0/n and n/n stay inside [0, 1]
    lo0, hi0 = wilson_interval(0, 5)
    assert lo0 == 0.0 and hi0 == pytest.approx(3.841458820694124 / (5 + 3.841458820694124), abs=1e-12)
    lo1, hi1 = wilson_interval(5, 5)
    assert hi1 == 1.0 and lo1 == pytest.approx(5 / (5 + 3.841458820694124), abs=1e-12)


@pytest.mark.parametrize("k,n,conf", [(0, 7, 0.95), (3, 7, 0.95), (8, 10, 0.95), (17, 40, 0.9), (40, 40, 0.99)])
def test_wilson_matches_scipy_binomtest(k, n, conf):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
    assert wilson_interval(k, n, conf) == pytest.approx((ref.low, ref.high), abs=1e-10)


def test_wilson_errors():
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_win_rate_ties_count_half():
    outcomes = [1, 1, 1, 1, 1, 0, 0, 0, -1, -1]  # W=5, T=3, L=2 -> (5 + 1.5) / 10
    wr = win_rate(outcomes)
    assert (wr.wins, wr.losses, wr.ties, wr.n) == (5, 2, 3, 10)
    assert wr.win_rate == pytest.approx(0.65)
    # Wilson on successes = 6.5 of 10, hand closed form at z = 1.959963984540054
    assert wr.low == pytest.approx(0.3536707235111688, abs=1e-12)
    assert wr.high == pytest.approx(0.8630694365299644, abs=1e-12)
    assert win_rate([0, 0, 0, 0]).win_rate == 0.5
    with pytest.raises(ValueError, match="empty"):
        win_rate([])
    with pytest.raises(ValueError, match="not allowed"):
        win_rate([1, 2])


def test_to_dict_is_json_and_frozen():
    ci = mean_ci([1.0, 2.0, 3.0])
    wr = win_rate(np.array([1, -1, 0]))
    d = json.loads(json.dumps({"ci": ci.to_dict(), "wr": wr.to_dict()}))
    assert d["ci"]["mean"] == 2.0 and d["wr"]["ties"] == 1 and set(d["wr"]) == {
        "win_rate", "low", "high", "wins", "losses", "ties", "n"}
    assert all(isinstance(v, (int, float)) for v in d["wr"].values())
    assert isinstance(ci, MeanCI) and isinstance(wr, WinRate)
    with pytest.raises(AttributeError):
        ci.mean = 0.0  # type: ignore[misc]
    assert math.isclose(wr.win_rate, 0.5)
