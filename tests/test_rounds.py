"""Many rounds in one process (prefdiff.rounds): round r samples from round r-1's policy, the previous-round
reference, every round's data, resume/append, and the preference-rounds flow with MLflow child runs.

Tiny: builtin:tiny-sd, 4 DDIM steps, 4 groups of 2 per round, 2 evaluation prompts x 2 seeds; the JPEG judge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_OVERRIDES, isolated_mlflow, make_workspace

from prefdiff.config import merged, parse_params
from prefdiff.paths import Paths

TINY = {
    "model": {"source": "builtin:tiny-sd"},
    "sampling": {"num_steps": 4},
    "sample": {"prompt_set": "digits", "num_prompts": 4, "images_per_group": 2, "batch_size": 8},
    "label": {"judge": "jpeg_compressibility"},
    "train": {"lr": 0.01, "batch_size": 2, "d3po": {"timestep_window": 2}},
    "evaluate": {"prompt_set": "digits_heldout", "num_prompts": 2, "seeds_per_prompt": 2, "batch_size": 4,
                 "bootstrap_samples": 200},
    "rounds": {"count": 2, "groups_per_round": 4, "eval_every": 1},
}
# Log-probs recomputed by another process from the same fp32 weights: the chain is identical, only the batch
# composition of the UNet calls differs (sampling: 8 images x 2 guidance branches; here 64 (image, step) rows),
# which may change the fp32 reduction order. The step's log-prob amplifies an error d in the mean by about
# |z| d / sigma_t; 1e-4 is the bound tests/test_training.py uses for the base's own chains (seen: exactly 0).
LOGP_ATOL = 1e-4


def _params(**overrides):
    return parse_params(merged(TINY, overrides))


def _run(root: Path, params):
    from prefdiff.rounds.loop import run_rounds

    return run_rounds(params, root, progress=lambda _: None)


@pytest.fixture(scope="module")
def base_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds-base")
    return root, _run(root, _params())


@pytest.fixture(scope="module")
def previous_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds-previous")
    return root, _run(root, _params(train={"reference": "previous_round"}))


def _round(root: Path, r: int) -> Path:
    return Paths(root).rounds / f"round-{r:03d}"


def _log_probs(store, lora: Path | None = None) -> torch.Tensor:
    """log pi(x_{t-1} | x_t) [N, T] of ``store``'s chains under a freshly loaded base, with ``lora`` loaded."""
    from prefdiff.models.loading import load_pipeline
    from prefdiff.models.lora import load_lora_weights
    from prefdiff.sampling.guidance import encode_prompts
    from prefdiff.sampling.sampler import SamplingConfig
    from prefdiff.training.trajectory import reference_log_probs

    pipe = load_pipeline("builtin:tiny-sd")
    if lora is not None:
        load_lora_weights(pipe, lora)
    pipe.scheduler.set_timesteps(store.num_steps)
    chain, _ = store.load_all()
    embeds = encode_prompts(pipe, [store.prompt_of(i) for i in range(store.num_images)])
    cfg = SamplingConfig(num_steps=store.num_steps, eta=1.0, guidance_scale=5.0)  # the params' (config defaults)
    return reference_log_probs(pipe, chain, store.timesteps, embeds, encode_prompts(pipe, [""]), cfg, eta=1.0,
                               batch_size=64)


def test_every_round_writes_its_data_metrics_and_curves(base_ref):
    from prefdiff.data.baseline import tree_sha256
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.models.lora import LORA_WEIGHT_NAME

    root, result = base_ref
    assert result.computed == [1, 2] and result.resumed == 0
    for r in (1, 2):
        rdir = _round(root, r)
        store = TrajectoryStore.open(rdir / "trajectories")
        assert (store.num_groups, store.images_per_group, store.num_steps) == (4, 2, 4)
        prefs = PreferenceStore.open(rdir / "preferences")
        prefs.check_trajectories(store)
        assert prefs.summary().num_pairs == 4  # C(2, 2) per group
        assert (rdir / "lora" / LORA_WEIGHT_NAME).is_file()
        record = json.loads((rdir / "round.json").read_text())
        assert record["round"] == r and record["metrics"]["samples"] == 8 * r
        assert record["train_curve"] and record["metrics"]["train_steps"] == len(record["train_curve"])
    # who sampled: round 1 the base, round 2 round 1's saved policy (named and hashed in the trajectory index)
    model1 = TrajectoryStore.open(_round(root, 1) / "trajectories").index["model"]
    model2 = TrajectoryStore.open(_round(root, 2) / "trajectories").index["model"]
    assert model1["policy"] == "base" and model1["unet_sha256"] == model2["unet_sha256"]
    assert model2["policy"] == "round 1" and model2["policy_lora"] == "data/rounds/round-001/lora"
    assert model2["policy_lora_sha256"] == tree_sha256(_round(root, 1) / "lora")
    # the rounds draw different prompts/noise: not the same samples twice
    assert not torch.equal(TrajectoryStore.open(_round(root, 1) / "trajectories").load_all()[0][:, 0],
                           TrajectoryStore.open(_round(root, 2) / "trajectories").load_all()[0][:, 0])

    first, second = result.rows[1], result.rows[2]
    # round 1's sampler is the fresh adapter, B = 0: exactly the base, so its log-ratio is exactly 0 and its
    # implicit reward ties every pair; round 2's sampler moved away from the base
    assert first["kl_proxy"] == 0.0 and first["implicit_acc"] == 0.5
    assert second["kl_proxy"] > 0.01
    for row in (first, second):
        assert 0.0 <= row["win_rate_low"] <= row["win_rate"] <= row["win_rate_high"] <= 1.0
        assert row["eval_reward_low"] <= row["eval_reward"] <= row["eval_reward_high"]
        assert row["sample_reward_low"] <= row["sample_reward"] <= row["sample_reward_high"]
    paths = Paths(root)
    rounds_csv = paths.rounds_plot.read_text().splitlines()
    assert rounds_csv[0].startswith("round,samples,pairs") and [line.split(",")[:2] for line in rounds_csv[1:]] == \
        [["1", "8"], ["2", "16"]]
    eval_csv = paths.rounds_eval_plot.read_text().splitlines()
    assert len(eval_csv) == 3 and "" not in eval_csv[1].split(",") + eval_csv[2].split(",")  # no gaps to plot
    summary = json.loads(paths.rounds_metrics.read_text())
    assert summary["rounds"] == 2 and summary["samples"] == 16 and summary["final_win_rate"] == second["win_rate"]
    assert summary["base_eval_reward"] == result.rows[0]["eval_reward"]
    assert paths.rounds_figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_two_samples_from_round_ones_policy(base_ref):
    """Round 2's stored sampling log-probs are the round-1 policy's: recomputed on round 2's chains under
    round 1's saved LoRA they agree (LOGP_ATOL), under the base they do not; round 1's are the base's."""
    from prefdiff.data.trajectories import TrajectoryStore

    root, _ = base_ref
    store1 = TrajectoryStore.open(_round(root, 1) / "trajectories")
    torch.testing.assert_close(_log_probs(store1), store1.load_all()[1], rtol=0, atol=LOGP_ATOL)
    store2 = TrajectoryStore.open(_round(root, 2) / "trajectories")
    sampled = store2.load_all()[1]
    torch.testing.assert_close(_log_probs(store2, _round(root, 1) / "lora"), sampled, rtol=0, atol=LOGP_ATOL)
    assert (_log_probs(store2) - sampled).abs().max() > 100 * LOGP_ATOL


def test_the_sample_stage_samples_from_a_lora_named_by_sample_lora(base_ref, tmp_path):
    """Stage-based rounds: ``sample.lora`` loads a policy onto the base for sampling (and unloads it after)."""
    from prefdiff.data.baseline import tree_sha256
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.models.loading import load_pipeline, model_fingerprint
    from prefdiff.sampling.dataset import sample_dataset

    root, _ = base_ref
    lora = _round(root, 1) / "lora"
    pipe = load_pipeline("builtin:tiny-sd")
    base_sha = model_fingerprint(pipe)
    params = _params(sample={"num_prompts": 2, "lora": str(lora)})
    sample_dataset(params, tmp_path / "traj", progress=lambda _: None, pipe=pipe)
    assert model_fingerprint(pipe) == base_sha and not getattr(pipe.unet, "peft_config", None)  # base again
    store = TrajectoryStore.open(tmp_path / "traj")
    assert store.index["model"]["unet_sha256"] == base_sha  # the base, and which LoRA drew on it:
    assert store.index["model"]["policy_lora"] == str(lora)
    assert store.index["model"]["policy_lora_sha256"] == tree_sha256(lora)
    sampled = store.load_all()[1]
    torch.testing.assert_close(_log_probs(store, lora), sampled, rtol=0, atol=LOGP_ATOL)
    assert (_log_probs(store) - sampled).abs().max() > 100 * LOGP_ATOL


def test_the_sample_stage_refuses_a_missing_lora_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import venv_env

    every_key = yaml.safe_load((REPO / "params.yaml").read_text())  # a stage refuses a params.yaml missing keys
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged(every_key, merged(TINY, {"sample": {"lora":
                                                                                             "models/nowhere"}}))))
    proc = subprocess.run([sys.executable, "-m", "stages.sample"], cwd=tmp_path, capture_output=True, text=True,
                          env=venv_env({"PYTHONPATH": str(REPO)}), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: sample.lora = 'models/nowhere': {tmp_path}/models/nowhere is not a directory; allowed: a "
        "diffusers-format LoRA dir (a train stage's models/trained) or null"]
    assert not (tmp_path / "data").exists()


def _reference_table(root: Path, r: int):
    """(D3PO's precomputed reference log-probs [n, W] of round r, its rows' image ids)."""
    from safetensors.torch import load_file

    from prefdiff.data.preferences import PreferenceStore

    pairs = PreferenceStore.open(_round(root, r) / "preferences").training_pairs()
    ids = sorted({i for p in pairs for i in (p.winner, p.loser)})
    state = load_file(str(_round(root, r) / "checkpoint" / "state" / "state.safetensors"))
    return state["precomputed.ref_logp"], ids


def test_previous_round_reference_is_the_last_rounds_policy(base_ref, previous_ref):
    """train.reference: previous_round (D3PO Sec. 5.2): round 2's reference log-probs are round 1's policy's,
    i.e. exactly the log-probs its own samples were drawn with; with reference base they are the base's."""
    from prefdiff.data.trajectories import TrajectoryStore

    base_root, _ = base_ref
    prev_root, prev = previous_ref
    # round 1: the previous policy is the fresh adapter = the base, so both runs train identically
    lora = "lora/pytorch_lora_weights.safetensors"
    assert (_round(base_root, 1) / lora).read_bytes() == (_round(prev_root, 1) / lora).read_bytes()
    ref_prev, ids = _reference_table(prev_root, 2)
    sampled = TrajectoryStore.open(_round(prev_root, 2) / "trajectories").load(ids)[1][:, : ref_prev.shape[1]]
    torch.testing.assert_close(ref_prev, sampled, rtol=0, atol=LOGP_ATOL)
    ref_base, ids = _reference_table(base_root, 2)
    store = TrajectoryStore.open(_round(base_root, 2) / "trajectories")
    torch.testing.assert_close(ref_base, _log_probs(store)[ids, : ref_base.shape[1]], rtol=0, atol=LOGP_ATOL)
    assert (ref_base - store.load(ids)[1][:, : ref_base.shape[1]]).abs().max() > 100 * LOGP_ATOL
    # so before round 2's first update the policy IS its reference (log-ratio 0) only with previous_round
    curve = lambda root: json.loads((_round(root, 2) / "round.json").read_text())["train_curve"]  # noqa: E731
    assert abs(curve(prev_root)[0]["mean_log_ratio"]) < 1e-5
    assert abs(curve(base_root)[0]["mean_log_ratio"]) > 1e-3
    assert json.loads(Paths(prev_root).rounds_metrics.read_text())["reference"] == "previous_round"
    assert prev.rows[2]["kl_proxy"] > 0.01  # the KL proxy is always against the base


def test_an_interrupted_run_resumes_and_other_params_start_over(base_ref, tmp_path):
    root, _ = base_ref
    shutil.copytree(Paths(root).rounds, Paths(tmp_path).rounds)
    (_round(tmp_path, 2) / "round.json").unlink()  # a crash in round 2, before its record was written
    kept = (_round(tmp_path, 1) / "round.json").stat().st_mtime_ns
    resumed = _run(tmp_path, _params())
    assert resumed.resumed == 1 and resumed.computed == [2]
    assert (_round(tmp_path, 1) / "round.json").stat().st_mtime_ns == kept  # round 1 was not redone
    # the resumed round 2 is bit for bit the uninterrupted one: weights and optimizer came back from round 1
    lora = "lora/pytorch_lora_weights.safetensors"
    assert (_round(tmp_path, 2) / lora).read_bytes() == (_round(root, 2) / lora).read_bytes()
    assert resumed.rows[1:] == [json.loads((_round(root, r) / "round.json").read_text())["metrics"] | {
        "seconds": resumed.rows[r]["seconds"]} for r in (1, 2)]
    # another lr decides other rounds: nothing is kept, and with count 1 no round 2 remains
    other = _run(tmp_path, _params(train={"lr": 0.02}, rounds={"count": 1}))
    assert other.resumed == 0 and other.computed == [1]
    assert sorted(p.name for p in Paths(tmp_path).rounds.iterdir()) == ["round-001"]


def test_what_the_rounds_and_the_train_stage_refuse():
    from prefdiff.rounds.loop import rounds_refusal
    from stages.train import refusal

    assert rounds_refusal(_params()) is None
    human = rounds_refusal(_params(label={"source": "human"}))
    assert "label.source = 'human'" in human and "allowed: judge, simulated" in human
    assert "allowed: lora" in rounds_refusal(_params(train={"finetune": "full"}))
    crowded = rounds_refusal(_params(rounds={"num_processes": 4}))  # micro-batches of 2 pairs
    assert "rounds.num_processes = 4 > train.batch_size = 2" in crowded and "allowed: train.batch_size >=" in crowded
    assert rounds_refusal(_params(rounds={"num_processes": 2})) is None
    # previous_round without init_lora is valid params (the rounds stage's previous round is the reference) ...
    previous = _params(train={"reference": "previous_round"})
    # ... but the single-round train stage starts from init_lora and says so, in one line
    assert "needs train.init_lora in the train stage" in refusal(previous)
    assert refusal(_params(train={"reference": "previous_round", "init_lora": "models/policy"})) is None


def test_round_count_is_set_in_params_yaml_keeping_every_comment():
    from flows.rounds import with_round_count

    text = (REPO / "params.yaml").read_text()
    changed = with_round_count(text, 37)
    assert yaml.safe_load(changed)["rounds"]["count"] == 37
    diff = [(a, b) for a, b in zip(text.splitlines(), changed.splitlines()) if a != b]
    assert len(diff) == 1 and diff[0][1].split("#")[1] == diff[0][0].split("#")[1]  # the comment stays
    from prefdiff.config import ParamsError

    with pytest.raises(ParamsError, match="no rounds.count"):
        with_round_count("train:\n  count: 3\n", 5)


def test_the_curve_experiment_averages_seeds_at_each_evaluation_point():
    from evaluation.stats import mean_ci
    from experiments.rounds_curve import curve_rows

    def run(method, seed, rewards):  # round 0 (the base) and rounds evaluated at 80 and 160 images
        rows = [{"round": 0, "samples": 0, "eval_reward": 0.7}, {"round": 1, "samples": 80},
                {"round": 2, "samples": 160, "eval_reward": rewards[0]}, {"round": 4, "samples": 320,
                                                                           "eval_reward": rewards[1]}]
        return {"method": method, "seed": seed, "rows": rows}

    runs = [run("d3po", 0, (0.71, 0.75)), run("d3po", 1, (0.73, 0.79)), run("ddpo", 0, (0.70, 0.72))]
    rows = curve_rows(runs, images_per_group=2)
    assert [(r["samples"], r["pairs"]) for r in rows] == [(0, 0), (160, 80), (320, 160)]  # G = 2: a pair per group
    last = rows[-1]
    ci = mean_ci([0.75, 0.79])
    assert (last["d3po_mean"], last["d3po_low"], last["d3po_high"], last["d3po_seeds"]) == (ci.mean, ci.low, ci.high, 2)
    assert (last["ddpo_mean"], last["ddpo_seeds"]) == (0.72, 1) and rows[0]["ddpo_mean"] == 0.7
    groups_of_4 = curve_rows([{"method": "d3po", "seed": 0, "rows": [{"round": 1, "samples": 8, "eval_reward": 1.0}]}],
                             images_per_group=4)
    assert groups_of_4[0]["pairs"] == 12  # 2 groups x C(4, 2)


# --------------------------------------------------------------------------------------------------
# The flow: the DVC stage in a throw-away workspace, one MLflow parent run, a child run per round
# --------------------------------------------------------------------------------------------------

FLOW_OVERRIDES = merged(TINY_OVERRIDES, {**{k: TINY[k] for k in ("model", "label", "evaluate")},
                                         "rounds": {"count": 3, "groups_per_round": 2, "eval_every": 2}})


def _children(uri: str, parent: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return client, {int(run.data.tags["prefdiff.round"]): run for run in runs}


@pytest.fixture(scope="module")
def flown(prefect_harness, tmp_path_factory):
    """A workspace after ``preference_rounds(rounds=2)`` (params.yaml said 3): (ws, MLflow URI, the flow's result)."""
    from flows.rounds import ROUNDS_STAGE, preference_rounds

    tmp = tmp_path_factory.mktemp("rounds-flow")
    ws = make_workspace(tmp / "ws", FLOW_OVERRIDES)
    target = ws / ROUNDS_STAGE.split(":")[0]
    target.parent.mkdir(parents=True)
    shutil.copy2(REPO / ROUNDS_STAGE.split(":")[0], target)
    with isolated_mlflow(f"sqlite:///{tmp}/mlflow.db") as uri:
        yield ws, uri, preference_rounds(rounds=2, repo=str(ws), run_name="rounds-a")


def test_flow_runs_the_rounds_stage_with_a_child_run_per_round(flown):
    ws, uri, first = flown
    assert yaml.safe_load((ws / "params.yaml").read_text())["rounds"]["count"] == 2  # the flow set it
    assert first["ran"] and sorted(first["children"]) == [1, 2]
    client, children = _children(uri, first["run_id"])
    parent = client.get_run(first["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "rounds-a"
    assert sorted(children) == [1, 2] and all(c.info.status == "FINISHED" for c in children.values())
    assert {c.info.run_id for c in children.values()} == set(first["children"].values())
    assert {"sample_reward", "pairs", "train_loss"} <= set(children[1].data.metrics)
    assert {"win_rate", "kl_proxy", "eval_reward"} <= set(children[2].data.metrics)  # eval_every 2: round 2
    assert "win_rate" not in children[1].data.metrics
    curve = client.get_metric_history(first["run_id"], "rounds/sample_reward")  # the parent's per-round curve
    assert sorted(m.step for m in curve) == [1, 2]
    assert {a.path for a in client.list_artifacts(first["run_id"], "rounds")} >= {
        "rounds/rounds.png", "rounds/rounds.csv", "rounds/rounds_eval.csv", "rounds/rounds.json"}
    assert parent.data.metrics["rounds/final/samples"] == 8.0  # 2 rounds x 2 groups x 2 images
    lock = yaml.safe_load((ws / "pipelines/rounds/dvc.lock").read_text())["stages"]["rounds"]
    assert lock["params"]["params.yaml"]["rounds"]["count"] == 2
    outs = {o["path"]: o for o in lock["outs"]}
    assert outs["data/rounds"]["md5"].endswith(".dir") and outs["data/rounds"]["nfiles"] > 10  # in DVC's cache
    assert sorted(p.name for p in (ws / "data/rounds").iterdir()) == ["round-001", "round-002"]


def test_flow_appends_a_round_and_logs_every_round_under_the_new_parent(flown):
    from flows.rounds import preference_rounds

    ws, uri, first = flown
    with isolated_mlflow(uri):
        second = preference_rounds(rounds=3, repo=str(ws), run_name="rounds-b")
    assert second["ran"] and second["summary"]["rounds"] == 3
    client, children = _children(uri, second["run_id"])
    assert sorted(children) == [1, 2, 3]
    # rounds 1-2 were resumed by the stage (not sampled again) and logged from their round.json
    assert {r for r, c in children.items() if c.data.tags.get("prefdiff.round_logged_from")} == {1, 2}
    _, before = _children(uri, first["run_id"])
    for r in (1, 2):
        assert children[r].data.metrics == before[r].data.metrics
    assert sorted(p.name for p in (ws / "data/rounds").iterdir()) == ["round-001", "round-002", "round-003"]


def test_flow_refuses_human_labels_before_any_run(prefect_harness, tmp_path):
    from flows.rounds import preference_rounds

    ws = make_workspace(tmp_path / "ws", {"label": {"source": "human"}})
    with isolated_mlflow(f"sqlite:///{tmp_path}/mlflow.db"), \
            pytest.raises(ValueError, match="allowed: judge, simulated"):
        preference_rounds(repo=str(ws))
    assert not (tmp_path / "mlflow.db").exists()
