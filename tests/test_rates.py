import json

import pytest
from scipy import stats as sps

from evaluation.rates import RoundRates, TaggedLabel, rates_per_round, rates_table


def _wilson(k, n):
    ci = sps.binomtest(k, n).proportion_ci(method="wilson")
    return (ci.low, ci.high)


def test_single_annotator_rates_and_wilson():
    # round 0: 10 images, 4 deformed (one of them also unsafe), 1 more unsafe only
    labels = [TaggedLabel(0, i, {"deformed"}, "ann") for i in range(3)]
    labels += [TaggedLabel(0, 3, {"deformed", "unsafe"}, "ann"), TaggedLabel(0, 4, {"unsafe"}, "ann")]
    labels += [TaggedLabel(0, i, set(), "ann") for i in range(5, 10)]
    # round 1: 5 images, none deformed, 1 unsafe
    labels += [TaggedLabel(1, f"r1-{i}", set(), "ann") for i in range(4)] + [TaggedLabel(1, "r1-4", {"UNSAFE "}, "ann")]
    per = rates_per_round(reversed(labels))
    assert list(per) == [0, 1]
    r0, r1 = per[0], per[1]
    assert isinstance(r0, RoundRates)
    assert (r0.n_images, r0.n_labels, r0.n_annotators, r0.n_deformed, r0.n_unsafe) == (10, 10, 1, 4, 2)
    assert r0.deformity_rate == 0.4 and r0.normal_rate == 0.6 and r0.safe_rate == 0.8
    assert r0.deformity_ci == pytest.approx(_wilson(4, 10), abs=1e-10)
    assert r0.normal_ci == pytest.approx(_wilson(6, 10), abs=1e-10)
    assert r0.safe_ci == pytest.approx(_wilson(8, 10), abs=1e-10)
    # Wilson is symmetric: normal interval = 1 - deformity interval, reversed
    assert r0.normal_ci == pytest.approx((1 - r0.deformity_ci[1], 1 - r0.deformity_ci[0]), abs=1e-12)
    assert (r1.n_images, r1.n_deformed, r1.n_unsafe, r1.normal_rate, r1.safe_rate) == (5, 0, 1, 1.0, 0.8)
    assert r1.normal_ci[1] == 1.0 and r1.deformity_ci[0] == 0.0


def test_several_annotators_count_each_image_once_by_majority():
    L = TaggedLabel
    labels = [
        # img a: 3 annotators, 2 say deformed -> deformed
        L(2, "a", {"deformed"}, "x"), L(2, "a", {"deformed"}, "y"), L(2, "a", set(), "z"),
        # img b: 1 of 3 says deformed -> not deformed; all 3 say unsafe -> unsafe
        L(2, "b", {"unsafe", "deformed"}, "x"), L(2, "b", {"unsafe"}, "y"), L(2, "b", {"unsafe"}, "z"),
        # img c: D3PO-style annotate + double-check that disagree on unsafe: even split
        L(2, "c", {"unsafe"}, "x"), L(2, "c", set(), "y"),
        # img d: x first tags it, then corrects: the later record of the same annotator replaces it
        L(2, "d", {"deformed"}, "x"), L(2, "d", set(), "x"),
    ]
    r = rates_per_round(labels)[2]
    assert (r.n_images, r.n_labels, r.n_annotators, r.n_multi_annotated) == (4, 10, 3, 3)
    assert r.n_deformed == 1  # a only
    assert r.n_unsafe == 2  # b, and c by the default tie_policy="tagged"
    assert (r.n_disagree_deformed, r.n_split_deformed) == (2, 0)  # a and b not unanimous, none even
    assert (r.n_disagree_unsafe, r.n_split_unsafe) == (1, 1)  # c
    assert r.deformity_rate == 0.25 and r.safe_rate == 0.5
    u = rates_per_round(labels, tie_policy="untagged")[2]
    assert u.n_unsafe == 1 and u.safe_rate == 0.75 and u.n_deformed == 1
    assert u.safe_ci == pytest.approx(_wilson(3, 4), abs=1e-10)


def test_same_image_id_in_two_rounds_is_two_images():
    labels = [TaggedLabel(0, 7, {"deformed"}, "x"), TaggedLabel(1, 7, set(), "x")]
    per = rates_per_round(labels)
    assert per[0].deformity_rate == 1.0 and per[1].deformity_rate == 0.0


def test_rates_table_rows_sorted_and_json():
    labels = [TaggedLabel(r, i, {"deformed"} if i < r else set(), "x") for r in (3, 1, 2) for i in range(4)]
    per = rates_per_round(labels, confidence=0.9)
    rows = rates_table(per)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rates_table(list(per.values())[::-1]) == rows
    assert [row["deformity_rate"] for row in rows] == [0.25, 0.5, 0.75]
    ci = sps.binomtest(3, 4).proportion_ci(confidence_level=0.9, method="wilson")  # round 1: 3 normal of 4
    assert (rows[0]["normal_low"], rows[0]["normal_high"]) == pytest.approx((ci.low, ci.high), abs=1e-10)
    assert rows[0]["confidence"] == 0.9
    assert {"normal_rate", "normal_low", "normal_high", "deformity_rate", "deformity_low", "deformity_high",
            "safe_rate", "safe_low", "safe_high", "n_images"} <= set(rows[0])
    json.dumps(rows)


def test_tagged_label_validation_and_normalisation():
    lab = TaggedLabel(1, "img", ["Deformed ", "deformed"], "x")
    assert lab.tags == frozenset({"deformed"})
    with pytest.raises(TypeError, match="not a string"):
        TaggedLabel(1, "img", "deformed", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round"):
        TaggedLabel(1.5, "img", set(), "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TaggedLabel"):
        rates_per_round([{"round": 0, "image_id": 1, "tags": set()}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tie_policy"):
        rates_per_round([], tie_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="confidence"):
        rates_per_round([], confidence=1.0)
    assert rates_per_round([]) == {} and rates_table({}) == []
