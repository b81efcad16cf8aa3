"""Simulated annotators (prefdiff.labeling.annotators): calibration of the Bradley-Terry temperature, position
bias, reproducible draws, round-robin assignment, params validation, and the label stage end to end.

Statistical checks compare a count of independent Bernoulli draws with its expectation under the model:
the tolerance is 4 standard errors, sqrt(sum_i p_i (1 - p_i)) <= sqrt(n p (1 - p)), stated per test. The
draws are seeded, so each check is deterministic; 4 SE is how far the model allows them to land."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from prefdiff.config import ParamsError, parse_params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.labeling.annotators import Annotator, calibrate_temperature, sigmoid, simulate_annotators

N_PAIRS = 4000


def random_groups(n_groups: int, group_size: int = 2, seed: int = 0) -> tuple[list[dict], dict[int, float]]:
    """``n_groups`` groups of ``group_size`` images with standard-normal judge scores."""
    rng = random.Random(seed)
    groups = [{"group_id": g, "prompt": f"prompt {g % 7}", "seed": g,
               "image_ids": list(range(group_size * g, group_size * (g + 1)))} for g in range(n_groups)]
    scores = {i: rng.gauss(0.0, 1.0) for i in range(group_size * n_groups)}
    return groups, scores


def four_se(p: float, n: int) -> float:
    """4 standard errors of a share of n Bernoulli(p) draws (an upper bound when the p_i differ, mean p)."""
    return 4 * math.sqrt(p * (1 - p) / n)


# -- (a) calibration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accuracy", [0.6, 0.8, 0.95])
def test_agreement_with_the_judge_is_the_configured_accuracy(accuracy: float) -> None:
    groups, scores = random_groups(N_PAIRS)
    labels = simulate_annotators(groups, scores, [Annotator(accuracy)], seed=3)
    (report,) = labels.reports
    margins = [abs(scores[2 * g] - scores[2 * g + 1]) for g in range(N_PAIRS)]
    # Eq. (2) holds for the calibrated temperature (bisection to relative width 1e-13)
    expected = sum(sigmoid(m / report.temperature) for m in margins) / N_PAIRS
    assert expected == pytest.approx(accuracy, abs=1e-9)
    # measured agreement: 4000 Bernoulli draws with mean probability `accuracy`
    assert report.num_pairs == report.num_decided_by_judge == N_PAIRS
    assert abs(report.agreement - accuracy) < four_se(accuracy, N_PAIRS)  # 0.031 / 0.025 / 0.014
    agreed = sum((scores[p.winner] > scores[p.loser]) for p in labels.pairs)  # recount from the pairs
    assert agreed == report.num_agree and labels.agreement == report.agreement
    # a person always picks, and the stored scores are the judge's scores of the chosen and the other image
    assert not any(p.tie for p in labels.pairs)
    assert all((p.winner_score, p.loser_score) == (scores[p.winner], scores[p.loser]) for p in labels.pairs)


def test_temperature_closed_form_order_independence_and_errors() -> None:
    # equal margins: mean sigmoid(m / tau) = sigmoid(m / tau) = a  <=>  tau = m / logit(a)
    assert calibrate_temperature([2.0] * 5, 0.8) == pytest.approx(2.0 / math.log(4.0), rel=1e-12)
    margins = [abs(random.Random(1).gauss(0, 1)) + 1e-3 for _ in range(501)]
    shuffled = random.Random(2).sample(margins, len(margins))
    assert calibrate_temperature(shuffled, 0.7) == calibrate_temperature(margins, 0.7)  # bit-identical: sorted first
    # more accurate -> less noise -> smaller temperature
    assert calibrate_temperature(margins, 0.9) < calibrate_temperature(margins, 0.7)
    with pytest.raises(ValueError, match="decides none of the pairs"):
        calibrate_temperature([], 0.8)
    with pytest.raises(ValueError, match="> 0"):
        calibrate_temperature([0.0, 1.0], 0.8)
    for bad in (0.5, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"strictly between 0.5 \(a coin flip\) and 1"):
            Annotator(bad)
    with pytest.raises(ValueError, match="bias inf: must be a finite log-odds"):
        Annotator(0.8, float("inf"))


def test_lower_is_better_judge_and_judge_ties() -> None:
    groups, scores = random_groups(N_PAIRS, seed=5)
    labels = simulate_annotators(groups, scores, [Annotator(0.8)], seed=0, higher_is_better=False)
    agreed = sum(scores[p.winner] < scores[p.loser] for p in labels.pairs) / N_PAIRS  # lower is preferred
    assert labels.agreement == agreed and abs(agreed - 0.8) < four_se(0.8, N_PAIRS)
    # the judge ties half the pairs: they are decided by the bias alone, P(first) = sigmoid(1.5) = 0.818,
    # and stay out of the calibration (agreement is measured on the other half)
    tied = {i: (0.0 if (i // 2) % 2 == 0 else s) for i, s in scores.items()}
    labels = simulate_annotators(groups, tied, [Annotator(0.8, bias=1.5)], seed=0)
    (r,) = labels.reports
    assert (r.num_judge_ties, r.num_decided_by_judge) == (N_PAIRS // 2, N_PAIRS // 2)
    on_ties = [p.winner == first for p, first in zip(labels.pairs, labels.shown_first)
               if p.winner_score == p.loser_score]
    assert len(on_ties) == N_PAIRS // 2 and not any(p.tie for p in labels.pairs)
    assert abs(sum(on_ties) / len(on_ties) - sigmoid(1.5)) < four_se(sigmoid(1.5), len(on_ties))  # 0.022
    with pytest.raises(ValueError, match=r"judge 'flat' scored both images of all 3 pairs equally"):
        simulate_annotators(groups[:3], {i: 1.0 for i in range(6)}, [Annotator(0.8)], seed=0, judge_name="judge 'flat'")


# -- (b) position bias ----------------------------------------------------------------------------------------------
def first_share_predicted(labels, scores: dict[int, float], bias: float) -> float:
    """Eq. (1) recomputed here from the shown order: mean over pairs of sigmoid((s_first - s_second)/tau + bias)."""
    tau = labels.reports[0].temperature
    total = 0.0
    for p, first in zip(labels.pairs, labels.shown_first):
        second = p.loser if first == p.winner else p.winner
        total += sigmoid((scores[first] - scores[second]) / tau + bias)
    return total / len(labels.pairs)


def test_position_bias_raises_first_choices_as_the_formula_predicts() -> None:
    groups, scores = random_groups(N_PAIRS, seed=7)
    unbiased = simulate_annotators(groups, scores, [Annotator(0.8)], seed=11)
    biased = simulate_annotators(groups, scores, [Annotator(0.8, bias=2.0)], seed=11)
    # the same draws decide which image is shown first: the bias is the only difference
    assert unbiased.shown_first == biased.shown_first
    # which image is shown first does not follow the ids: the lower id is first about half the time
    lower_first = sum(f == min(p.winner, p.loser) for p, f in zip(biased.pairs, biased.shown_first)) / N_PAIRS
    assert abs(lower_first - 0.5) < four_se(0.5, N_PAIRS)
    share0 = unbiased.reports[0].num_first / N_PAIRS
    share2 = biased.reports[0].num_first / N_PAIRS
    predicted0 = first_share_predicted(unbiased, scores, 0.0)
    predicted2 = first_share_predicted(biased, scores, 2.0)
    assert abs(predicted0 - 0.5) < 0.02  # symmetric scores, random order: the formula gives ~0.5 itself
    assert predicted2 == pytest.approx(biased.reports[0].expected_first / N_PAIRS, rel=1e-12)
    assert predicted2 - predicted0 > 0.25  # a log-odds of 2 is a large push (sigmoid(2) = 0.88 on a tie)
    assert abs(share0 - 0.5) < four_se(0.5, N_PAIRS)  # 0.032
    assert abs(share2 - predicted2) < four_se(predicted2, N_PAIRS)  # 0.027
    # the rise itself: both shares use the same choice draws, so their difference is at most as noisy
    # as the sum of the two, 4 SE each
    assert abs((share2 - share0) - (predicted2 - predicted0)) < four_se(0.5, N_PAIRS) + four_se(predicted2, N_PAIRS)


# -- (c) determinism ------------------------------------------------------------------------------------------------
def test_same_seed_same_pairs_other_seed_other_pairs_any_group_order() -> None:
    groups, scores = random_groups(500, group_size=3, seed=9)
    annotators = [Annotator(0.75), Annotator(0.9, bias=-0.5)]
    a = simulate_annotators(groups, scores, annotators, seed=4)
    assert simulate_annotators(groups, scores, annotators, seed=4) == a
    other = simulate_annotators(groups, scores, annotators, seed=5)
    changed = sum(x.winner != y.winner for x, y in zip(a.pairs, other.pairs))
    # with 0.75-0.9 accuracy, P(two independent choices differ) = 2p(1-p) averages well above 0.1
    assert changed > 0.1 * len(a.pairs)
    # processing order: reversed groups and a shuffled score dict give the same decision for every pair
    rev_scores = dict(reversed(list(scores.items())))
    reordered = simulate_annotators(list(reversed(groups)), rev_scores, annotators, seed=4)
    key = lambda p: (p.group_id, min(p.winner, p.loser), max(p.winner, p.loser))  # noqa: E731
    assert sorted(reordered.pairs, key=key) == sorted(a.pairs, key=key)
    assert reordered.reports == a.reports


# -- (d) assignment -------------------------------------------------------------------------------------------------
def test_groups_go_round_robin_and_choices_can_be_intransitive() -> None:
    groups, scores = random_groups(1000, group_size=3, seed=13)
    annotators = [Annotator(0.6), Annotator(0.7), Annotator(0.95, bias=0.3)]
    labels = simulate_annotators(groups, scores, annotators, seed=0)
    assert len(labels.pairs) == 3000  # C(3, 2) per group
    assert all(p.annotator == p.group_id % 3 for p in labels.pairs)
    assert [r.num_groups for r in labels.reports] == [334, 333, 333]
    assert [r.num_pairs for r in labels.reports] == [1002, 999, 999]
    for r in labels.reports:  # each annotator calibrated on its own pairs: about its own accuracy
        assert abs(r.agreement - r.accuracy) < four_se(r.accuracy, r.num_pairs)
    # each pair is decided on its own: a noisy annotator sometimes prefers a > b > c > a within a group
    cycles = 0
    for g in range(0, 1000, 3):  # annotator 0's groups
        beats = {(p.winner, p.loser) for p in labels.pairs if p.group_id == g}
        a, b, c = groups[g]["image_ids"]
        cycles += {(a, b), (b, c), (c, a)} <= beats or {(b, a), (c, b), (a, c)} <= beats
    assert cycles > 10
    # more annotators than groups: the idle ones report no pairs and no temperature
    few = simulate_annotators(groups[:2], scores, [Annotator(0.8)] * 4, seed=0)
    assert [r.num_pairs for r in few.reports] == [3, 3, 0, 0] and few.reports[3].temperature is None
    with pytest.raises(ValueError, match="no annotators"):
        simulate_annotators(groups, scores, [], seed=0)


# -- (e) params -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("annotators", "line"), [
    ([{"accuracy": 0.5}], "label.simulated.annotators.0.accuracy = 0.5: must be strictly between 0.5"),
    ([{"accuracy": 0.9}, {"accuracy": 1.0}], "label.simulated.annotators.1.accuracy = 1.0: must be strictly between"),
    ([], "label.simulated.annotators = []: needs at least one annotator, e.g. [{accuracy: 0.85, bias: 0.0}]"),
    ([{"accuracy": 0.8, "bias": float("inf")}], "label.simulated.annotators.0.bias = inf: Input should be a finite"),
    ([{"acuracy": 0.8}], "label.simulated.annotators.0.acuracy: unknown key; allowed keys here: accuracy, bias"),
])
def test_bad_annotator_params_give_one_clear_line(annotators: list, line: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params({"label": {"source": "simulated", "simulated": {"annotators": annotators}}})
    lines = str(err.value).splitlines()
    assert lines[0] == "params: 1 invalid value(s)" and len(lines) == 2
    assert lines[1].strip().startswith(line), lines[1]


def test_simulated_params_parse() -> None:
    params = parse_params({"label": {"source": "simulated", "simulated": {
        "annotators": [{"accuracy": "9e-1"}, {"accuracy": 0.7, "bias": -1}], "seed": 3}}})
    sim = params.label.simulated
    assert [(a.accuracy, a.bias) for a in sim.annotators] == [(0.9, 0.0), (0.7, -1.0)] and sim.seed == 3
    default = parse_params({}).label
    assert default.source == "judge" and [(a.accuracy, a.bias) for a in default.simulated.annotators] == [(0.85, 0.0)]


# -- (f) the label stage end to end ---------------------------------------------------------------------------------
def test_label_stage_with_simulated_annotators(tmp_path: Path, monkeypatch, capsys) -> None:
    """Real sampler (builtin:tiny-sd, 4 groups of 3, 2 DDIM steps), real judge (JPEG size), the stage's main()."""
    import mlflow
    import yaml

    from conftest import REPO, isolated_mlflow
    from prefdiff.config import load_params
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import judge_scorer, score_trajectories
    from prefdiff.profile import merged
    from prefdiff.sampling.dataset import sample_dataset

    ws = tmp_path / "ws"
    ws.mkdir()
    overrides = {
        "model": {"source": "builtin:tiny-sd", "device": "cpu"},
        "sampling": {"num_steps": 2},
        "train": {"d3po": {"timestep_window": None}},  # params.yaml's window (5) exceeds these 2 steps
        "sample": {"num_prompts": 2, "groups_per_prompt": 2, "images_per_group": 3, "batch_size": 12},
        "label": {"source": "simulated", "judge": "jpeg_compressibility",
                  "simulated": {"annotators": [{"accuracy": 0.9, "bias": 0.0}, {"accuracy": 0.7, "bias": 1.0}],
                                "seed": 1}},
    }
    (ws / "params.yaml").write_text(yaml.safe_dump(merged(yaml.safe_load((REPO / "params.yaml").read_text()),
                                                          overrides), sort_keys=False))
    params = load_params(ws / "params.yaml")
    sample_dataset(params, ws / "data" / "trajectories", progress=lambda _: None, root=ws)
    monkeypatch.chdir(ws)
    from stages import label

    with isolated_mlflow(f"sqlite:///{tmp_path}/mlflow.db") as uri:
        label.main()
        runs = mlflow.MlflowClient(uri).search_runs(
            [mlflow.get_experiment_by_name(params.register.experiment).experiment_id])
    out = capsys.readouterr().out

    store = TrajectoryStore.open(ws / "data" / "trajectories")
    prefs = PreferenceStore.open(ws / "data" / "preferences")
    assert store.num_groups == 4 and len(prefs.pairs) == 12 and prefs.summary().num_ties == 0
    assert [p.annotator for p in prefs.pairs] == [p.group_id % 2 for p in prefs.pairs]
    prefs.check_trajectories(store)
    # the stage wrote exactly what the library gives for the judge's scores of these images
    scores = score_trajectories(store, judge_scorer("jpeg_compressibility", {}, 95), progress=lambda _: None)
    annotators = [Annotator(0.9), Annotator(0.7, bias=1.0)]
    expected = simulate_annotators(store.groups(), scores, annotators, seed=1)
    assert prefs.pairs == expected.pairs
    index = json.loads((ws / "data" / "preferences" / "index.json").read_text())
    assert index["judge"] == {"name": "jpeg_compressibility", "higher_is_better": True, "params": {"quality": 95}}
    assert index["annotators"] == {"model": "bradley_terry", "seed": 1, "assignment": "group_id % number of annotators",
                                   "annotators": [r.as_json() for r in expected.reports]}
    # logged agreement = the share of the stored pairs where the annotator chose the judge's better image
    (run,) = runs
    for k in (0, 1):
        mine = [p for p in prefs.pairs if p.annotator == k and p.winner_score != p.loser_score]
        agreed = sum(p.winner_score > p.loser_score for p in mine) / len(mine)
        assert run.data.metrics[f"label/annotator_{k}_agreement"] == pytest.approx(agreed, abs=1e-12)
    decided = [p for p in prefs.pairs if p.winner_score != p.loser_score]
    overall = sum(p.winner_score > p.loser_score for p in decided) / len(decided)
    assert run.data.metrics["label/annotator_agreement"] == pytest.approx(overall, abs=1e-12)
    assert run.data.metrics["label/pairs"] == 12
    summary = [line for line in out.splitlines() if "simulated annotator(s) agree" in line]
    assert summary == [f"label: 2 simulated annotator(s) agree with judge jpeg_compressibility on {overall:.3f} of "
                       f"{len(decided)} pairs it decides; annotator 0 {expected.reports[0].agreement:.3f} of "
                       f"{expected.reports[0].num_decided_by_judge} (accuracy 0.9, bias 0.0); annotator 1 "
                       f"{expected.reports[1].agreement:.3f} of {expected.reports[1].num_decided_by_judge} "
                       "(accuracy 0.7, bias 1.0)"]


def test_annotator_rows_round_trip_and_judge_rows_keep_their_bytes(tmp_path: Path) -> None:
    """Judge-labeled rows and indexes carry no annotator keys (their bytes are as before); annotator rows
    read back with their index; a row naming an annotator the index does not list is refused."""
    import numpy as np
    import torch
    from PIL import Image

    from prefdiff.data import DatasetError
    from prefdiff.data.preferences import PreferencePair, write_preferences
    from prefdiff.data.trajectories import TrajectoryGroup, TrajectoryStore, TrajectoryWriter

    with TrajectoryWriter(tmp_path / "traj", shard_size=4, model={}, params={}) as w:
        w.add_group(TrajectoryGroup(
            prompt="cat", seed=0, latents=torch.zeros(3, 3, 4, 2, 2), log_probs=torch.zeros(3, 2),
            timesteps=torch.tensor([500, 0]),
            images=[Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (0, 100, 200)]))
    store = TrajectoryStore.open(tmp_path / "traj")
    judge = {"name": "j", "higher_is_better": True, "params": {}}
    by_judge = [PreferencePair(0, "cat", 1, 0, 2.0, 1.0, False)]
    by_people = [PreferencePair(0, "cat", 0, 2, 1.0, 3.0, False, annotator=1)]

    write_preferences(tmp_path / "judge", by_judge, judge=judge, trajectories=store)
    row = json.loads((tmp_path / "judge" / "pairs.jsonl").read_text())
    assert list(row) == ["group_id", "prompt", "winner", "loser", "winner_score", "loser_score", "tie",
                         "winner_png", "loser_png"]
    judged = PreferenceStore.open(tmp_path / "judge")
    assert "annotators" not in judged.index and judged.pairs == by_judge and judged.pairs[0].annotator is None

    listed = {"annotators": [{"annotator": 0}, {"annotator": 1}]}
    write_preferences(tmp_path / "people", by_people, judge=judge, trajectories=store, annotators=listed)
    people = PreferenceStore.open(tmp_path / "people")
    assert people.pairs == by_people and people.index["annotators"] == listed
    assert json.loads((tmp_path / "people" / "pairs.jsonl").read_text())["annotator"] == 1

    write_preferences(tmp_path / "unlisted", by_people, judge=judge, trajectories=store)
    with pytest.raises(DatasetError, match=r"rows name annotators \[1\], but .* lists 0 annotator\(s\)"):
        PreferenceStore.open(tmp_path / "unlisted")
