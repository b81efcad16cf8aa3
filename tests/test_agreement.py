import math

import numpy as np
import pytest

from prefdiff.agreement import cohens_kappa, fleiss_kappa, fleiss_kappa_from_labels, label_counts, majority_vote

# Fleiss (1971) / Wikipedia "Fleiss' kappa" worked example: 10 items, 14 raters, 5 categories.
# column totals (20, 28, 39, 21, 32) -> p_j = (0.143, 0.200, 0.279, 0.150, 0.229),
# P_i = (1.000, 0.253, 0.308, 0.440, 0.330, 0.462, 0.242, 0.176, 0.286, 0.286), P_bar = 0.378, P_bar_e = 0.213,
# kappa = 0.210.
WIKI_COUNTS = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_wikipedia_example():
    assert round(fleiss_kappa(WIKI_COUNTS), 3) == 0.210
    # exact: P_bar = 68.8/182 = 0.378021978, P_e = (20^2+28^2+39^2+21^2+32^2)/140^2 = 4170/19600 = 0.21275510
    c = np.array(WIKI_COUNTS, dtype=float)
    p_bar = (((c ** 2).sum(1) - 14) / (14 * 13)).mean()
    p_e = ((c.sum(0) / 140) ** 2).sum()
    assert p_bar == pytest.approx(0.378021978, abs=1e-9) and p_e == pytest.approx(4170 / 19600, abs=1e-15)
    assert fleiss_kappa(WIKI_COUNTS) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=1e-15)
    assert fleiss_kappa(WIKI_COUNTS) == pytest.approx(0.20993070442195522, abs=1e-12)


def test_fleiss_from_labels_equals_counts():
    # expand the Wikipedia table to a [10, 14] label matrix (category index per rater)
    labels = np.array([np.repeat(np.arange(5), row) for row in WIKI_COUNTS])
    assert labels.shape == (10, 14)
    counts, cats = label_counts(labels)
    assert counts.tolist() == WIKI_COUNTS and cats.tolist() == [0, 1, 2, 3, 4]
    assert fleiss_kappa_from_labels(labels) == pytest.approx(fleiss_kappa(WIKI_COUNTS), abs=1e-15)


# Wikipedia "Cohen's kappa" example: 50 proposals, A yes & B yes 20, A yes & B no 5, A no & B yes 10, both no 15.
COHEN_A = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
COHEN_B = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15


def test_cohens_kappa_wikipedia_example():
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    assert cohens_kappa(COHEN_A, COHEN_B) == pytest.approx(0.4, abs=1e-12)
    assert cohens_kappa(COHEN_B, COHEN_A) == pytest.approx(0.4, abs=1e-12)


def test_two_rater_fleiss_is_scotts_pi_not_cohen():
    labels = np.column_stack([COHEN_A, COHEN_B])
    # pooled marginals: yes 55/100, no 45/100 -> P_e = 0.3025 + 0.2025 = 0.505; P_bar = p_o = 0.7
    # Scott's pi = (0.7 - 0.505) / 0.495 = 0.393939...
    assert fleiss_kappa_from_labels(labels) == pytest.approx(0.195 / 0.495, abs=1e-12)


def test_cohens_kappa_hand_three_categories_with_missing():
    # preference labels 0 / 0.5 / 1; items 5 (a missing) and 6 (b NaN) are dropped
    a = [1, 1, 0, 0.5, 1, -1, 0, 0]
    b = [1, 0, 0, 0.5, 1, 1, np.nan, 1]
    # kept pairs (6): (1,1) (1,0) (0,0) (.5,.5) (1,1) (0,1): p_o = 4/6
    # marginals a: 0: 2/6, .5: 1/6, 1: 3/6 ; b: 0: 2/6, .5: 1/6, 1: 3/6 -> p_e = (4 + 1 + 9)/36 = 14/36
    # kappa = (24/36 - 14/36) / (22/36) = 10/22
    assert cohens_kappa(a, b) == pytest.approx(10 / 22, abs=1e-12)


def test_kappa_degenerate_and_perfect():
    assert cohens_kappa([1, 1, 1], [1, 1, 1]) != cohens_kappa([1, 1, 1], [1, 1, 1])  # nan: p_e = 1
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))
    assert cohens_kappa([0, 1, 1, 0], [0, 1, 1, 0]) == 1.0
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert math.isnan(cohens_kappa([-1, 1], [0, -1]))  # nothing left after dropping missing
    # systematic disagreement is below chance: a = [0,1,0,1], b = [1,0,1,0] -> p_o 0, p_e .5 -> -1
    assert cohens_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_fleiss_errors_and_drop_incomplete():
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa([[2, 1], [1, 1]])
    with pytest.raises(ValueError, match="at least 2"):
        fleiss_kappa([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="non-negative integers"):
        fleiss_kappa([[1.5, 0.5]])
    labels = [[1, 1, 0], [0, 0, -1], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa_from_labels(labels)
    # drop item 1: counts (cats 0, 1) = [1,2], [0,3], [3,0]: P_i = (5-3)/6, 1, 1 -> P_bar = 7/9
    # p = (4/9, 5/9) -> P_e = 41/81 ; kappa = (63/81 - 41/81) / (40/81) = 22/40
    assert fleiss_kappa_from_labels(labels, drop_incomplete=True) == pytest.approx(22 / 40, abs=1e-12)
    with pytest.raises(ValueError, match="not in categories"):
        label_counts([[0, 2]], categories=[0, 1])


def test_majority_vote_plurality_ties_and_missing():
    labels = [
        [1, 1, 0],        # 2:1 -> 1
        [0, 0, 1],        # -> 0
        [1, 0, -1],       # 1:1 -> tie 0.5
        [1, 0, 0.5],      # three-way -> tie 0.5
        [0.5, 0.5, 1],    # plurality tie label -> 0.5
        [-1, -1, -1],     # nobody -> nan
        [np.nan, 1, -1],  # one vote -> 1
    ]
    out = majority_vote(labels)
    assert out[:5].tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert math.isnan(out[5]) and out[6] == 1.0
    # any categories: most frequent wins, ties -> tie_value
    assert majority_vote([[2, 2, 3], [2, 3, 4]], tie_value=-9).tolist() == [2.0, -9.0]


def test_majority_vote_decisive_rule():
    labels = [[1, 0.5, 0.5], [0, 0.5, -1], [1, 0, 0.5], [0.5, 0.5, 0.5], [1, 1, 0], [-1, -1, -1]]
    out = majority_vote(labels, rule="decisive")
    assert out[:5].tolist() == [1.0, 0.0, 0.5, 0.5, 1.0] and math.isnan(out[5])
    # plurality would say tie for the first item
    assert majority_vote(labels)[0] == 0.5
    with pytest.raises(ValueError, match="not allowed"):
        majority_vote([[2, 1]], rule="decisive")
    with pytest.raises(ValueError, match="rule"):
        majority_vote([[1, 1]], rule="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        majority_vote([1, 0, 1])
