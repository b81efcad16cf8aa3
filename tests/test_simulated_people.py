"""Simulated people end to end (issue 10, part 6): three simulated annotators label a real trajectory dataset
through the real labeling server's HTTP API; the label stage (``label.source: human``, run as the CLI DVC runs)
turns their labels into preferences and reports Fleiss' kappa; D3PO trains on them (the ``fit`` loop of the
train stage); the trained policy draws what the simulated people prefer.

The people. The model is the committed digits model (a person can judge its images), the judge
``stroke_bold`` (the image's mean ink in percent: bolder strokes, a preference a person can see). Shown a
pair (first = left, second = right) annotator k chooses the first with the Bradley-Terry probability of
``prefdiff.labeling.annotators`` (Eq. 1), ``sigmoid((u_first - u_second) / tau_k + bias_k)``, u = the ink,
tau_k calibrated (``calibrate_temperature``) on the dataset's pairs so that with bias 0 k agrees with the
judge on a share ``accuracy_k`` in expectation. alice 0.9, bob 0.8, carol 0.7 with a position bias of +0.5
log-odds for the left image. Each choice is drawn by ``annotators.uniforms`` (a pure function of seed,
annotator, group and image ids), so the labels do not depend on how the three annotators' concurrent requests
interleave. Every group is labeled by all three (``label.human.annotators_per_group: 3``).

Expected kappa. Each item (one group's pair) gets a vote from every annotator; each annotator is right
independently of the others given the pair. With accuracies a_k and balanced marginals (the pair's two
images come from the same noise, so which one the judge prefers is a coin flip in id order) p_e = 1/2, and
for three annotators the share of items where all three agree is q = a1 a2 a3 + (1 - a1)(1 - a2)(1 - a3);
Fleiss' P_i is 1 then and 1/3 on a 2-1 split, so E[P_bar] = (1 + 2q) / 3 and kappa = (P_bar - p_e) /
(1 - p_e) = (4q - 1) / 3 (the mean over annotator pairs of Cohen's 2 p_o - 1, p_o = a_j a_k + (1 - a_j)(1 - a_k)).
Here a_k is the share of the pairs on which k is expected to agree with the judge (= accuracy_k for alice and
bob by the calibration; carol's bias lowers hers). The Bradley-Terry noise is not the same on every pair
(near-equal pairs are coin flips for everyone, clear ones are right for everyone), which raises agreement
above that formula; the exact expectation from each pair's probabilities is computed too. Tolerance: three
standard errors of kappa from the binomial share of unanimous items, (4/3) sqrt(q (1 - q) / n), n items.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import venv_env
from label_server_fixture import LabelServer

from prefdiff.labeling.annotators import Annotator, calibrate_temperature, probability_first, uniforms

REPO = Path(__file__).resolve().parents[1]
JUDGE = "stroke_bold"
PEOPLE = {"alice": Annotator(accuracy=0.9), "bob": Annotator(accuracy=0.8), "carol": Annotator(accuracy=0.7, bias=0.5)}
# params.yaml's defaults but for the test's time: 10 DDIM steps instead of 20, D3PO on the chain's first 2 steps
# (instead of 5 of 20); on one CPU thread sampling costs ~18 s, each training ~8 s (README "Simulated people
# end to end").
OVERRIDES = {
    "sampling": {"num_steps": 10},
    "sample": {"groups_per_prompt": 5, "images_per_group": 2},  # 40 digit prompts x 5 = 200 groups = 200 items
    "label": {"source": "human", "human": {"mode": "pair", "annotators_per_group": len(PEOPLE)}},
    "train": {"checkpoint_every": 10_000, "d3po": {"timestep_window": 2}},
}
EVAL_PROMPTS, EVAL_SEEDS_PER_PROMPT = 20, 2  # digits_heldout: 40 samples, the same seeds for base and trained
# Fixed after seeds 0-2 (README "Simulated people end to end", 1 thread): mean ink 32.3 % for the base, +5.8 ..
# +6.0 points trained on the people's labels (40 of 40 seeds bolder), -5.9 .. -7.6 on the reversed labels (0 of
# 40 bolder); the bounds are under half of that
GAIN, WIN_RATE = 2.5, 0.8


def quiet(line: str) -> None:  # the stages' progress lines are not this test's output
    pass


class Phases:
    """Wall and CPU seconds per phase (CPU: this process and its waited-for children, e.g. the label stage;
    on a shared machine the CPU seconds say what the phase costs, the wall seconds what it took)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._mark = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.time(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def done(self, name: str) -> None:
        now = self._now()
        self.seconds[name] = round(now[0] - self._mark[0], 1)
        self.cpu_seconds[name] = round(now[1] - self._mark[1], 1)
        self._mark = now


def label_as(name: str, index: int, server_url: str, ink: dict[int, float], tau: float, seed: int,
             out: list[dict]) -> None:
    """One simulated person at the page's API: next task, choose by Eq. (1), submit, until done (or until a
    submission is refused: the server would serve the same group again; the test then fails on the status)."""
    person = PEOPLE[name]
    with httpx.Client(base_url=server_url, timeout=60) as http:
        while True:
            nxt = http.get("/api/next", params={"annotator": name}).raise_for_status().json()
            if nxt["state"] == "done":
                return
            task = nxt["task"]
            first, second = task["image_ids"]
            p_first = probability_first(ink[first] - ink[second], tau, person.bias)
            _, u = uniforms(seed, index, task["group_id"], min(first, second), max(first, second))
            choice = "first" if u < p_first else "second"
            r = http.post("/api/labels", json={"annotator": name, "dataset_sha256": nxt["dataset_sha256"],
                                                "group_id": task["group_id"], "image_ids": task["image_ids"],
                                                "choice": choice})
            out.append({"annotator": name, "group_id": task["group_id"], "first": first, "second": second,
                        "p_first": p_first, "choice": choice, "status": r.status_code, "seq": r.json().get("seq")})
            if r.status_code != 201:
                return


def run_simulated_people(root: Path, seed: int = 0) -> dict:
    """The whole experiment in ``root``; returns what the tests assert on."""
    from prefdiff.config import merged, parse_params
    from prefdiff.data.preferences import PreferenceStore, write_preferences
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import judge_scorer, score_trajectories
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.models.loading import load_pipeline
    from prefdiff.paths import Paths
    from prefdiff.prompts import get_prompt_set
    from prefdiff.sampling.dataset import sample_dataset
    from prefdiff.sampling.sampler import SamplingConfig, generate
    from prefdiff.training.fit import fit

    phases = Phases()
    paths = Paths(root / "ws")
    paths.root.mkdir(parents=True)
    raw = merged(yaml.safe_load((REPO / "params.yaml").read_text()),
                 merged(OVERRIDES, {"sample": {"seed": seed}, "train": {"seed": seed}}))
    paths.params.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw, str(paths.params))

    pipe = load_pipeline(params.model.source)
    sample_dataset(params, paths.trajectories, pipe=pipe, progress=quiet, root=paths.root)
    store = TrajectoryStore.open(paths.trajectories)
    judge = judge_scorer(JUDGE, {}, params.label.jpeg_quality)
    ink = score_trajectories(store, judge, progress=quiet)
    items = [tuple(g["image_ids"][:2]) for g in store.groups()]  # what pair mode shows of each group
    margins = [abs(ink[a] - ink[b]) for a, b in items if ink[a] != ink[b]]
    tau = {name: calibrate_temperature(margins, p.accuracy) for name, p in PEOPLE.items()}
    phases.done("sample")

    # -- the people, at the real server, all at once --------------------------------------------------------
    submitted: list[dict] = []
    with LabelServer(paths.root) as server:
        threads = [threading.Thread(target=label_as, args=(name, k, server.url, ink, tau[name], seed, submitted))
                   for k, name in enumerate(PEOPLE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        progress = httpx.get(f"{server.url}/api/progress").json()
    log_lines = [json.loads(line) for line in (paths.labels / "labels.jsonl").read_text().splitlines()]
    phases.done("label_http")

    # -- the label stage, as `dvc repro label` runs it ----------------------------------------------------
    mlflow_uri = f"sqlite:///{root}/mlflow.db"
    env = {**_env(), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri}
    stage = subprocess.run([sys.executable, "-m", "stages.label"], cwd=paths.root, capture_output=True, text=True,
                           timeout=300, check=False, env=env)
    phases.done("label_stage")

    # -- training on their preferences, then the policy's samples against the base's -----------------------
    fit(params, trajectories_dir=paths.trajectories, preferences_dir=paths.preferences, out_dir=paths.trained,
        checkpoint_dir=paths.checkpoints, progress=quiet)
    # The control: the same pairs with every choice reversed (people who prefer thin strokes), trained alike.
    # The policy must move the other way: the direction comes from the labels, not from training as such.
    preferences = PreferenceStore.open(paths.preferences)
    reversed_dir = root / "reversed"
    write_preferences(reversed_dir, [replace(p, winner=p.loser, loser=p.winner, winner_score=p.loser_score,
                                             loser_score=p.winner_score) for p in preferences.pairs],
                      judge=preferences.index["judge"], trajectories=store)
    fit(params, trajectories_dir=paths.trajectories, preferences_dir=reversed_dir, out_dir=root / "reversed-lora",
        checkpoint_dir=root / "reversed-checkpoints", progress=quiet)
    phases.done("train")
    prompts = [p for p in get_prompt_set("digits_heldout", EVAL_PROMPTS) for _ in range(EVAL_SEEDS_PER_PROMPT)]
    seeds = [params.evaluate.seed + i for i in range(len(prompts))]
    cfg = SamplingConfig(**params.sampling.model_dump())
    base = judge.score(generate(pipe, prompts, seeds, cfg, batch_size=len(prompts)), prompts).tolist()
    with trained_weights(pipe, paths.trained):
        trained = judge.score(generate(pipe, prompts, seeds, cfg, batch_size=len(prompts)), prompts).tolist()
    with trained_weights(pipe, root / "reversed-lora"):
        reversed_ = judge.score(generate(pipe, prompts, seeds, cfg, batch_size=len(prompts)), prompts).tolist()
    phases.done("evaluate")
    return {"ink": ink, "items": items, "tau": tau, "submitted": submitted, "progress": progress,
            "log": log_lines, "stage": stage, "mlflow_uri": mlflow_uri, "root": paths.root,
            "preferences": preferences, "base": base, "trained": trained, "reversed": reversed_,
            "seconds": phases.seconds, "cpu_seconds": phases.cpu_seconds}


def _env() -> dict[str, str]:
    env = venv_env()
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    return env


# -- the expectations, from the probabilities each person chose with ---------------------------------------
def vote_probabilities(run: dict) -> dict[str, dict[tuple[int, int], float]]:
    """annotator -> item (lower id, higher id) -> P(it votes for the lower id), from the pair it was shown."""
    out: dict[str, dict[tuple[int, int], float]] = {name: {} for name in PEOPLE}
    for s in run["submitted"]:
        low, high = sorted((s["first"], s["second"]))
        out[s["annotator"]][(low, high)] = s["p_first"] if s["first"] == low else 1.0 - s["p_first"]
    return out


def judge_agreement_probabilities(run: dict) -> dict[str, list[float]]:
    """annotator -> per item, P(it chooses the image the judge prefers) (the judge ties no pair here)."""
    ink = run["ink"]
    votes = vote_probabilities(run)
    return {name: [p if ink[low] > ink[high] else 1.0 - p for (low, high), p in votes[name].items()]
            for name in PEOPLE}


def expected_fleiss(run: dict) -> dict[str, float]:
    """Fleiss' kappa expected by the accuracies alone (the formula in the module docstring) and exactly from
    each pair's probabilities, with the binomial standard error of kappa over the n items."""
    agree = judge_agreement_probabilities(run)
    a = {name: sum(ps) / len(ps) for name, ps in agree.items()}
    q = math.prod(a.values()) + math.prod(1 - x for x in a.values())
    votes = vote_probabilities(run)
    items = sorted(votes["alice"])
    n = len(items)
    q_items = [math.prod(votes[k][i] for k in PEOPLE) + math.prod(1 - votes[k][i] for k in PEOPLE) for i in items]
    p_bar = sum((1 + 2 * qi) / 3 for qi in q_items) / n
    share_lower = sum(votes[k][i] for k in PEOPLE for i in items) / (n * len(PEOPLE))
    p_e = share_lower**2 + (1 - share_lower) ** 2
    q_exact = sum(q_items) / n
    return {"accuracy_" + k: v for k, v in a.items()} | {
        "formula": (4 * q - 1) / 3, "exact": (p_bar - p_e) / (1 - p_e), "n": n,
        "se": 4 / 3 * math.sqrt(q_exact * (1 - q_exact) / n)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return run_simulated_people(tmp_path_factory.mktemp("people"))


def test_every_label_went_through_the_api_into_the_log(run):
    groups = len(run["items"])
    assert groups == 200 and [s["status"] for s in run["submitted"]] == [201] * 3 * groups
    assert run["progress"]["groups_complete"] == groups and run["progress"]["annotators"] == {n: groups for n in PEOPLE}
    labels = run["log"][1:]
    assert [r["seq"] for r in labels] == list(range(1, 3 * groups + 1))  # nothing lost, nothing twice
    on_disk = {(r["annotator"], r["group_id"], tuple(r["image_ids"]), r["choice"]) for r in labels}
    sent = {(s["annotator"], s["group_id"], (s["first"], s["second"]), s["choice"]) for s in run["submitted"]}
    assert on_disk == sent


def test_each_person_is_as_noisy_as_given(run):
    """Agreement with the judge within 3 binomial standard errors of its expectation; carol's bias shows as
    a preference for the left image."""
    ink = run["ink"]
    assert all(ink[a] != ink[b] for a, b in run["items"])  # the judge decides every pair (no tie to agree with)
    agree = judge_agreement_probabilities(run)
    for name, person in PEOPLE.items():
        mine = [s for s in run["submitted"] if s["annotator"] == name]
        chosen = [s["first"] if s["choice"] == "first" else s["second"] for s in mine]
        other = [s["second"] if s["choice"] == "first" else s["first"] for s in mine]
        measured = sum(ink[c] > ink[o] for c, o in zip(chosen, other)) / len(mine)
        expected = sum(agree[name]) / len(mine)
        if person.bias == 0:
            assert expected == pytest.approx(person.accuracy, abs=1e-9)  # the calibration, exactly
        assert abs(measured - expected) <= 3 * math.sqrt(expected * (1 - expected) / len(mine)), (name, measured)
        left = sum(s["choice"] == "first" for s in mine) / len(mine)
        expected_left = sum(s["p_first"] for s in mine) / len(mine)
        assert abs(left - expected_left) <= 3 * math.sqrt(expected_left * (1 - expected_left) / len(mine))
    assert sum(s["p_first"] for s in run["submitted"] if s["annotator"] == "carol") / len(run["items"]) > 0.55


def test_the_label_stage_reports_the_kappa_of_the_noise_it_was_given(run):
    import mlflow

    stage = run["stage"]
    assert stage.returncode == 0, stage.stdout[-2000:] + stage.stderr[-2000:]
    meta = run["preferences"].index["annotators"]
    kappa = meta["kappa"]
    assert (kappa["kind"], kappa["items"]) == ("fleiss", 200)
    (mlflow_run,) = mlflow.MlflowClient(run["mlflow_uri"]).search_runs(
        [mlflow.MlflowClient(run["mlflow_uri"]).get_experiment_by_name("prefdiff").experiment_id])
    assert mlflow_run.data.metrics["label/fleiss_kappa"] == pytest.approx(kappa["value"], abs=1e-12)
    assert f"Fleiss' kappa {kappa['value']:.3f} on 200 shared image pairs" in stage.stdout
    expected = expected_fleiss(run)
    print(json.dumps({"reported_kappa": kappa["value"], **expected, "seconds": run["seconds"],
                      "cpu_seconds": run["cpu_seconds"]}))
    assert abs(kappa["value"] - expected["exact"]) <= 3 * expected["se"]
    assert abs(kappa["value"] - expected["formula"]) <= 3 * expected["se"]
    # three voters never split evenly and never tie: every item becomes a pair, decided by the majority
    assert (meta["ties_dropped"], meta["splits_dropped"], len(run["preferences"].pairs)) == (0, 0, 200)


def test_the_policy_moves_toward_what_the_people_prefer(run):
    """The judge's mean score (ink, %) of 40 held-out samples, trained vs base from the same seeds, and the
    share of seeds where the trained sample has more ink; the reversed labels move it the other way."""
    base, trained, reversed_ = run["base"], run["trained"], run["reversed"]
    mean = lambda xs: sum(xs) / len(xs)
    gain, reversed_gain = mean(trained) - mean(base), mean(reversed_) - mean(base)
    wins = mean([t > b for t, b in zip(trained, base)])
    reversed_wins = mean([t > b for t, b in zip(reversed_, base)])
    ink, pairs = run["ink"], run["preferences"].pairs
    print(json.dumps({"base_ink": mean(base), "trained_ink": mean(trained), "gain": gain, "win_rate": wins,
                      "reversed_gain": reversed_gain, "reversed_win_rate": reversed_wins,
                      "majority_agrees_with_judge": mean([ink[p.winner] > ink[p.loser] for p in pairs])}))
    assert gain >= GAIN and wins >= WIN_RATE
    assert reversed_gain <= -GAIN and reversed_wins <= 1 - WIN_RATE
