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


# ------------------------------------------------------------------------------------------------
# higher_is_better, sign test, cluster bootstrap, win_rate_summary

from evaluation.stats import WinRateSummary, cluster_bootstrap_ci, sign_test, win_rate_summary  # noqa: E402


def test_paired_outcomes_lower_is_better_flips_and_rejects_bad_margin():
    trained, base = [1.0, 2.0, 3.0], [2.0, 2.0, 1.0]
    assert paired_outcomes(trained, base).tolist() == [-1, 0, 1]
    assert paired_outcomes(trained, base, 0.0, higher_is_better=False).tolist() == [1, 0, -1]
    assert paired_outcomes(trained, base, 1.5, False).tolist() == [0, 0, -1]
    with pytest.raises(ValueError, match="tie_margin"):
        paired_outcomes(trained, base, float("nan"))


def test_sign_test_hand_values():
    # W=5, L=2: n=7, k=2: 2 * (C(7,0)+C(7,1)+C(7,2)) / 2^7 = 2 * 29 / 128 = 0.453125
    assert sign_test(5, 2) == 0.453125
    # W=0, L=5: 2 * 1/32 = 0.0625; symmetric in (W, L)
    assert sign_test(0, 5) == sign_test(5, 0) == 0.0625
    assert sign_test(7, 7) == 1.0 and sign_test(0, 0) == 1.0 and sign_test(1, 0) == 1.0
    with pytest.raises(ValueError, match="wins"):
        sign_test(-1, 3)
    with pytest.raises(ValueError, match="losses"):
        sign_test(1, 2.5)


@pytest.mark.parametrize("w,l", [(0, 1), (3, 4), (9, 1), (30, 12), (12, 30), (0, 60), (600, 540), (1500, 1400)])
def test_sign_test_matches_scipy_binomtest(w, l):
    assert sign_test(w, l) == pytest.approx(sps.binomtest(w, w + l, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_cluster_bootstrap_deterministic_and_mean_fast_path_equals_generic():
    rng = np.random.default_rng(1)
    vals = rng.normal(size=60)
    clusters = np.repeat([f"p{i}" for i in range(20)], 3)
    a = cluster_bootstrap_ci(vals, clusters, n_boot=500, seed=7)
    b = cluster_bootstrap_ci(vals, clusters, n_boot=500, seed=7)
    c = cluster_bootstrap_ci(vals, clusters, lambda x: float(np.mean(x)), n_boot=500, seed=7)
    assert a == b
    assert a == pytest.approx(c, abs=1e-12)  # same resamples, vectorised vs per-resample stat
    assert a != cluster_bootstrap_ci(vals, clusters, n_boot=500, seed=8)
    assert a[0] < vals.mean() < a[1]


def test_cluster_bootstrap_one_value_per_cluster_matches_scipy_iid_percentile():
    rng = np.random.default_rng(3)
    vals = rng.normal(1.0, 2.0, size=200)
    ours = cluster_bootstrap_ci(vals, list(range(200)), n_boot=4000, seed=0)
    ref = sps.bootstrap((vals,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(0))
    # different random streams: the two percentile intervals agree to Monte-Carlo error (~0.03 here)
    assert ours == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.06)


def test_cluster_bootstrap_widens_when_seeds_of_a_prompt_are_correlated():
    # 30 prompts x 4 seeds with identical values within a prompt: the clustered interval must be ~2x
    # wider (sqrt(4)) than pretending the 120 values are independent.
    rng = np.random.default_rng(5)
    per_prompt = rng.normal(size=30)
    vals = np.repeat(per_prompt, 4)
    prompts = np.repeat(np.arange(30), 4)
    lo_c, hi_c = cluster_bootstrap_ci(vals, prompts, n_boot=3000, seed=0)
    lo_i, hi_i = cluster_bootstrap_ci(vals, np.arange(120), n_boot=3000, seed=0)
    assert 1.6 < (hi_c - lo_c) / (hi_i - lo_i) < 2.4


def test_cluster_bootstrap_other_stat_and_errors():
    vals = [1.0, 2.0, 3.0, 100.0]
    lo, hi = cluster_bootstrap_ci(vals, ["a", "b", "c", "d"], np.median, n_boot=300, seed=0)
    assert 1.0 <= lo <= hi <= 100.0
    assert cluster_bootstrap_ci([2.0, 4.0], ["x", "x"], n_boot=50) == (3.0, 3.0)  # one cluster: degenerate
    with pytest.raises(ValueError, match="length"):
        cluster_bootstrap_ci([1.0, 2.0], ["a"])
    with pytest.raises(ValueError, match="empty"):
        cluster_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="n_boot"):
        cluster_bootstrap_ci([1.0], ["a"], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        cluster_bootstrap_ci([1.0], ["a"], confidence=0.0)


def _toy_pairs():
    # 4 prompts x 2 seeds; a - b = [+1, +1, -1, 0.05, +2, +0.5, -0.5, 0]
    b = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    d = np.array([1.0, 1.0, -1.0, 0.05, 2.0, 0.5, -0.5, 0.0])
    return b + d, b, ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"], d


def test_win_rate_summary_hand_values_and_scipy():
    a, b, prompts, d = _toy_pairs()
    s = win_rate_summary(a, b, prompts, tie_margin=0.1, n_boot=1000, seed=0)
    assert isinstance(s, WinRateSummary)
    # margin 0.1: wins = {1, 1, 2, 0.5} = 4, losses = {-1, -0.5} = 2, ties = {0.05, 0} = 2
    assert (s.n, s.n_prompts, s.wins, s.losses, s.ties) == (8, 4, 4, 2, 2)
    assert s.win_rate == pytest.approx(5 / 8)  # (4 + 2/2) / 8
    ref = sps.binomtest(5, 8).proportion_ci(method="wilson")  # W + T/2 = 5 is integral here
    assert s.win_rate_ci_wilson == pytest.approx((ref.low, ref.high), abs=1e-10)
    assert s.decisive_rate == pytest.approx(4 / 6)
    ref = sps.binomtest(4, 6).proportion_ci(method="wilson")
    assert s.decisive_rate_ci_wilson == pytest.approx((ref.low, ref.high), abs=1e-10)
    assert s.sign_test_p == pytest.approx(sps.binomtest(4, 6, 0.5).pvalue) == 0.6875  # 2*(1+6+15)/64
    assert s.mean_diff == pytest.approx(d.mean())
    lo, hi = sps.t.interval(0.95, 7, loc=d.mean(), scale=sps.sem(d))
    assert s.mean_diff_ci == pytest.approx((lo, hi), abs=1e-12)
    assert s.wilcoxon_p == pytest.approx(sps.wilcoxon(d[d != 0]).pvalue)
    lo_b, hi_b = s.win_rate_ci_bootstrap
    assert lo_b <= s.win_rate <= hi_b
    # the bootstrap is exactly the cluster bootstrap of the per-pair points (1, 1/2, 0) by prompt
    points = [1, 1, 0, 0.5, 1, 1, 0, 0.5]
    assert s.win_rate_ci_bootstrap == cluster_bootstrap_ci(points, prompts, n_boot=1000, seed=0)
    assert win_rate_summary(a, b, prompts, tie_margin=0.1, n_boot=1000, seed=0) == s  # deterministic


def test_win_rate_summary_all_wins_and_all_ties():
    b = np.zeros(12)
    s = win_rate_summary(b + 1.0, b, np.repeat(np.arange(4), 3), n_boot=200)
    assert (s.win_rate, s.wins, s.decisive_rate) == (1.0, 12, 1.0)
    assert s.win_rate_ci_wilson[1] == 1.0 and s.win_rate_ci_bootstrap == (1.0, 1.0)
    assert s.sign_test_p == pytest.approx(2 / 2**12)
    t = win_rate_summary(b, b, np.arange(12), n_boot=200)
    assert (t.ties, t.win_rate, t.sign_test_p) == (12, 0.5, 1.0)
    assert math.isnan(t.decisive_rate) and all(math.isnan(v) for v in t.decisive_rate_ci_wilson)
    assert math.isnan(t.wilcoxon_p) and t.mean_diff == 0.0


def test_win_rate_summary_lower_is_better():
    a, b, prompts, d = _toy_pairs()
    hi = win_rate_summary(a, b, prompts, tie_margin=0.1, n_boot=100)
    lo = win_rate_summary(a, b, prompts, tie_margin=0.1, higher_is_better=False, n_boot=100)
    assert (lo.wins, lo.losses, lo.ties) == (hi.losses, hi.wins, hi.ties)
    assert lo.win_rate == pytest.approx(1 - hi.win_rate)
    assert lo.mean_diff == hi.mean_diff  # raw a - b, not flipped


def test_win_rate_summary_one_seed_per_prompt_bootstrap_close_to_iid():
    rng = np.random.default_rng(11)
    b = rng.normal(size=300)
    a = b + rng.normal(0.2, 1.0, size=300)  # continuous: no ties
    s = win_rate_summary(a, b, [f"prompt {i}" for i in range(300)], n_boot=3000, seed=1)
    assert s.ties == 0
    points = (a > b).astype(float)
    ref = sps.bootstrap((points,), np.mean, n_resamples=3000, method="percentile", rng=np.random.default_rng(1))
    assert s.win_rate_ci_bootstrap == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high),
                                                    abs=0.02)
    # and both close to the Wilson interval (n = 300, p ~ 0.57)
    assert s.win_rate_ci_bootstrap == pytest.approx(s.win_rate_ci_wilson, abs=0.02)


def test_win_rate_summary_as_dict_flat_and_stable():
    a, b, prompts, _ = _toy_pairs()
    s = win_rate_summary(a, b, prompts, tie_margin=0.1, n_boot=100)
    d = s.as_dict("pickscore_")
    assert list(d) == ["pickscore_" + k for k in (
        "n", "n_prompts", "wins", "losses", "ties", "win_rate", "win_rate_wilson_low", "win_rate_wilson_high",
        "win_rate_boot_low", "win_rate_boot_high", "decisive_rate", "decisive_rate_low", "decisive_rate_high",
        "sign_test_p", "mean_diff", "mean_diff_low", "mean_diff_high", "wilcoxon_p", "tie_margin", "confidence")]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())
    assert d["pickscore_wins"] == 4 and d["pickscore_win_rate_boot_low"] == s.win_rate_ci_bootstrap[0]
    assert json.loads(json.dumps(s.as_dict()))["ties"] == 2


def test_win_rate_summary_errors():
    with pytest.raises(ValueError, match="length"):
        win_rate_summary([1.0, 2.0], [1.0], ["a", "b"])
    with pytest.raises(ValueError, match="prompt_ids"):
        win_rate_summary([1.0, 2.0], [1.0, 1.0], ["a"])
    with pytest.raises(ValueError, match="empty"):
        win_rate_summary([], [], [])
    with pytest.raises(ValueError, match="non-finite"):
        win_rate_summary([1.0, float("nan")], [1.0, 1.0], ["a", "b"])
