"""The Prefect flow around the DVC stages, the deployments, and their MLflow bookkeeping.

One Prefect test server for the session (``prefect_test_harness``, ~20 s to start). The end-to-end
round runs the six real stages ONCE in a module-scoped tiny workspace (conftest's ``make_workspace``
with ``TINY_OVERRIDES``, the same as ``tiny_workspace``): ~2.5 min on 2 CPU cores, dominated by the
six stage subprocesses importing torch/diffusers/mlflow. The no-op second round and the stage-failure
round reuse that workspace (a copy for the failure), so they cost seconds.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES, dvc, git, isolated_mlflow, make_workspace

from flows.round import (
    STAGES,
    check_stages,
    preference_round,
    file_metrics,
    is_transient_io_error,
    open_parent_run,
    push_data,
    retry_on_io_error,
    run_stage,
    summarize,
)
from prefdiff.config import ParamsError
from prefdiff.paths import Paths

EXPERIMENT = "prefdiff"  # params.yaml register.experiment (not overridden by TINY_OVERRIDES)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@dataclass
class Round:
    ws: Path
    uri: str
    first_state: object
    first_lock: bytes
    first_versions: int


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str):
    client = _client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _model_versions(uri: str) -> int:
    return len(_client(uri).search_model_versions("name = 'prefdiff-d3po'"))  # register.model_name null


def _flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs are sent in batches by a background worker
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200, offset=len(messages))
            messages += [log.message for log in page]
            if len(page) < 200:
                return messages


@pytest.fixture(scope="module")
def round1(prefect_harness, tmp_path_factory):
    """The six real stages, once, in a tiny workspace; the flow's final state."""
    tmp = tmp_path_factory.mktemp("round")
    with isolated_mlflow(f"sqlite:///{tmp}/mlflow.db") as uri:
        ws = make_workspace(tmp / "ws", TINY_OVERRIDES)
        (ws / ".dvcignore").write_text((REPO / ".dvcignore").read_text())  # bytecode never enters a code dep's hash
        dvc(ws, "remote", "add", "-d", "shared", str(tmp / "remote"))  # the round pushes to it
        git(ws, "add", "-A")
        git(ws, "commit", "-q", "-m", "a default DVC remote")
        state = preference_round(repo=str(ws), run_name="round-1", return_state=True)
        lock = (ws / "dvc.lock").read_bytes() if (ws / "dvc.lock").is_file() else b""
        yield Round(ws=ws, uri=uri, first_state=state, first_lock=lock, first_versions=_model_versions(uri))


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_round_runs_six_stages_into_one_mlflow_run(round1):
    state = round1.first_state
    assert state.is_completed(), f"flow ended {state.type}: {state.message}"
    result = state.result()
    paths = Paths(round1.ws)
    for path in (paths.trajectories / "index.json", paths.preferences / "index.json",
                 paths.trained / "pytorch_lora_weights.safetensors", paths.eval_metrics, paths.decision):
        assert path.is_file(), f"{path} missing"
    assert result["stages"] == dict.fromkeys(STAGES, True)

    runs = _runs(round1.uri)
    assert len(runs) == 1, f"expected the stages to log into the parent run, got {[r.info.run_name for r in runs]}"
    run = runs[0]
    assert run.info.run_id == result["run_id"]
    assert run.info.run_name == "round-1"
    assert run.info.status == "FINISHED"

    metrics = run.data.metrics
    for key in ("sample/images", "sample/groups", "label/pairs", "train/final_loss", "train/steps", "heldout/pairs",
                "eval/win_rate", "eval/win_rate_wilson_low", "eval/trained_mean_reward", "register/version",
                "sample/seconds", "label/seconds", "train/seconds", "heldout/seconds", "evaluate/seconds",
                "register/seconds"):
        assert key in metrics, f"{key} not logged; have {sorted(metrics)}"
    history = _client(round1.uri).get_metric_history(run.info.run_id, "train/loss")
    assert len({m.step for m in history}) > 1, "train/loss should be a per-step curve"
    evaluated = json.loads(paths.eval_metrics.read_text())
    assert metrics["eval/win_rate"] == pytest.approx(evaluated["win_rate"])
    assert result["eval"]["win_rate"] == pytest.approx(evaluated["win_rate"])
    assert result["decision"]["version"] == 1 and metrics["register/version"] == 1

    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    for stage in STAGES:
        assert tags[f"prefdiff.stage.{stage}"] == "done"
    for key in ("git_sha", "dvc_lock_sha256", "params_sha256", "dvc.sample.data/trajectories", "dvc.train.models/trained"):
        assert key in tags, f"lineage tag {key} missing; have {sorted(tags)}"
    assert tags["registry.version"] == "1"

    client = _client(round1.uri)
    listed = {a.path for d in ("plots", "eval", "lineage", "registry") for a in client.list_artifacts(run.info.run_id, d)}
    for art in ("plots/train.csv", "plots/reward_curve.csv", "plots/win_rate.csv", "eval/grid.png",
                "lineage/dvc.lock", "lineage/params.yaml", "registry/decision.json"):
        assert art in listed, f"artifact {art} missing; have {sorted(listed)}"

    # every stage's output reached the Prefect log line by line, as it ran
    logs = _flow_run_logs(state.state_details.flow_run_id)
    for stage in STAGES:
        assert f"Running stage '{stage}':" in logs
        assert f"> python -m stages.{stage}" in logs
    assert any(line.startswith("step 1/") for line in logs), "training progress was not streamed"
    assert any("win-rate" in line and "MLflow UI" in line for line in logs), "no summary printed"
    assert any("prompt-clustered bootstrap" in line and "MLflow UI" in line for line in logs)
    assert any(line.startswith("baseline: base") for line in logs), "the baseline was not resolved before evaluate"


def test_second_round_skips_every_stage_and_logs_metrics_from_files(round1):
    with isolated_mlflow(round1.uri):
        state = preference_round(repo=str(round1.ws), run_name="round-2", return_state=True)
    assert state.is_completed(), f"flow ended {state.type}: {state.message}"
    result = state.result()
    assert result["stages"] == dict.fromkeys(STAGES, False)
    assert (round1.ws / "dvc.lock").read_bytes() == round1.first_lock
    assert _model_versions(round1.uri) == round1.first_versions == 1

    runs = _runs(round1.uri)
    assert [r.info.run_name for r in runs] == ["round-1", "round-2"]
    run = runs[1]
    assert run.info.run_id == result["run_id"] != runs[0].info.run_id
    metrics, tags = run.data.metrics, run.data.tags
    evaluated = json.loads(Paths(round1.ws).eval_metrics.read_text())
    assert metrics["eval/win_rate"] == pytest.approx(evaluated["win_rate"])
    assert metrics["eval/base_mean_reward"] == pytest.approx(evaluated["base_mean_reward"])
    assert "train/final_loss" in metrics and "train/steps" in metrics
    assert metrics["register/version"] == 1
    assert "train/loss" not in metrics, "a skipped round must not fake a training curve"
    for stage in STAGES:
        assert tags[f"prefdiff.stage.{stage}"] == "skipped"
    assert tags["dvc_lock_sha256"] == runs[0].data.tags["dvc_lock_sha256"]
    assert result["decision"]["version"] == 1

    logs = _flow_run_logs(state.state_details.flow_run_id)
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in logs


def test_the_round_pushes_to_the_dvc_remote_and_a_fresh_clone_pulls_to_a_noop(round1, tmp_path):
    """After the round, the default remote holds every cached output: a clone of the committed workspace pulls
    them and finds every stage up to date."""
    result = round1.first_state.result()
    assert result["push"]["remote"] == "shared" and result["push"]["pushed"], result["push"]
    assert "DVC remote  : pushed to 'shared'" in summarize(result, round1.uri, EXPERIMENT)
    ws = tmp_path / "committed"
    shutil.copytree(round1.ws, ws, symlinks=True)
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "round 1")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws), str(clone))
    assert not (clone / "data/trajectories").exists()
    dvc(clone, "pull")  # from the remote only: the clone has an empty cache
    for path in ("data/trajectories/index.json", "data/preferences/index.json", "metrics/eval.json",
                 "models/trained/pytorch_lora_weights.safetensors"):
        assert (clone / path).read_bytes() == (round1.ws / path).read_bytes(), path
    assert "Data and pipelines are up to date" in dvc(clone, "status")


def test_a_remote_that_fails_is_retried_then_named_and_the_round_still_succeeds(round1, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(round1.ws, ws, symlinks=True)
    gone = tmp_path / "gone"
    gone.write_text("a file where the remote directory should be")  # dvc push to it fails every time
    dvc(ws, "remote", "add", "-f", "-d", "broken", str(gone))
    monkeypatch.setattr("flows.round.PUSH_DELAY_S", 0.01)
    pushed = push_data.fn(str(ws), "no-run")
    assert pushed["remote"] == "broken" and not pushed["pushed"] and pushed["detail"], pushed
    line = summarize({"push": pushed}, round1.uri, EXPERIMENT)
    assert "DVC remote  : NOT pushed to 'broken'" in line and "run `dvc push` when it is reachable" in line
    dvc(ws, "remote", "remove", "broken")
    assert push_data.fn(str(ws), "no-run") == {"remote": None, "pushed": False,
                                                "detail": "no default DVC remote (dvc remote add -d NAME URL)"}


def test_stage_failure_fails_the_flow_naming_the_stage(round1, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(round1.ws, ws, symlinks=True)
    # label's code changes (a dependency), so DVC re-runs it, and the stage process dies
    (ws / "stages" / "label.py").write_text('raise SystemExit("label exploded on purpose")\n')
    with isolated_mlflow(round1.uri):
        with pytest.raises(RuntimeError, match="stage 'label' failed") as err:
            preference_round(repo=str(ws), stages=["sample", "label", "train"], run_name="round-broken")
    assert "label exploded on purpose" in str(err.value)  # the tail of the stage's own output
    run = [r for r in _runs(round1.uri) if r.info.run_name == "round-broken"][0]
    assert run.info.status == "FAILED"
    assert run.data.tags["prefdiff.failed_stage"] == "label"
    assert run.data.tags["prefdiff.stage.sample"] == "skipped"
    assert run.data.tags["prefdiff.stage.label"] == "failed"
    assert "prefdiff.stage.train" not in run.data.tags  # never reached


def test_invalid_params_fail_before_anything_runs(prefect_harness, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = -1.0
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    (ws / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    with isolated_mlflow(f"sqlite:///{tmp_path}/mlflow.db"):
        with pytest.raises(ParamsError, match=r"train\.lr"):
            preference_round(repo=str(ws))
    assert not (tmp_path / "mlflow.db").exists(), "validation must come before MLflow is touched"


# --------------------------------------------------------------------------------------------------
# Retries (I/O only) and pieces
# --------------------------------------------------------------------------------------------------


def test_transient_io_errors_are_recognised():
    from mlflow.exceptions import MlflowException

    locked = MlflowException("(sqlite3.OperationalError) database is locked")
    assert is_transient_io_error(OSError("disk"))
    assert is_transient_io_error(ConnectionError("refused"))
    assert is_transient_io_error(TimeoutError())
    assert is_transient_io_error(sqlite3.OperationalError("database is locked"))
    assert is_transient_io_error(locked)
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as inner:
            raise MlflowException("store failed") from inner
    except MlflowException as chained:
        assert is_transient_io_error(chained)
    for exc in (TypeError("x"), KeyError("k"), ValueError("v"), ParamsError("p"), FileNotFoundError("f"),
                PermissionError("p"), MlflowException("RESOURCE_DOES_NOT_EXIST: no run"), RuntimeError("r")):
        assert not is_transient_io_error(exc), exc


def test_retry_condition_reads_the_failed_state():
    from prefect.states import Failed

    class _Task:
        name = "t"

    assert retry_on_io_error(_Task(), None, Failed(data=ConnectionError("refused")))
    assert not retry_on_io_error(_Task(), None, Failed(data=TypeError("bug")))


def test_open_parent_run_retries_io_errors_only(prefect_harness, tmp_path, monkeypatch):
    import prefdiff.tracking as tracking

    real = tracking.ensure_experiment
    calls: list[str] = []

    def flaky(name, root):
        calls.append(name)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(name, root)

    from prefect import flow

    @flow
    def quick(repo: str, experiment: str, run_name: str) -> str:
        return open_parent_run.with_options(retry_delay_seconds=0)(repo, experiment, run_name)

    with isolated_mlflow(f"sqlite:///{tmp_path}/mlflow.db") as uri:
        monkeypatch.setattr(tracking, "ensure_experiment", flaky)
        run_id = quick(str(tmp_path), "retry-exp", "r")
        assert len(calls) == 2
        assert _client(uri).get_run(run_id).info.run_name == "r"

        calls.clear()
        monkeypatch.setattr(tracking, "ensure_experiment", lambda name, root: calls.append(name) or 1 / 0)
        with pytest.raises(ZeroDivisionError):
            quick(str(tmp_path), "retry-exp", "r")
        assert len(calls) == 1, "a programming error must not be retried"


def test_run_stage_is_not_retried_and_not_cached():
    from prefect.cache_policies import NO_CACHE

    assert run_stage.retries == 0
    assert run_stage.cache_policy is NO_CACHE
    assert open_parent_run.retries == 2


def test_check_stages():
    assert check_stages(None) == list(STAGES)
    assert check_stages(["train", "evaluate"]) == ["train", "evaluate"]
    with pytest.raises(ValueError, match="unknown stage"):
        check_stages(["sample", "lable"])
    with pytest.raises(ValueError, match="pipeline order"):
        check_stages(["train", "sample"])
    with pytest.raises(ValueError, match="no stages"):
        check_stages([])


def test_file_metrics_and_summary(tmp_path):
    paths = Paths(tmp_path)
    paths.train_metrics.parent.mkdir(parents=True)
    paths.train_metrics.write_text(json.dumps({"steps": 4, "loss": 0.69, "seconds": 2.5}))
    paths.eval_metrics.write_text(json.dumps({
        "judge": "jpeg", "win_rate": 0.75, "win_rate_low": 0.3, "win_rate_high": 0.95, "win_rate_wilson_low": 0.35,
        "win_rate_wilson_high": 0.9, "trained_mean_reward": -3.7, "base_mean_reward": -3.8, "baseline": "base",
        "wins": 3, "losses": 1, "ties": 0, "num_samples": 4, "num_prompts": 2,
        "protocol_fingerprint": "f" * 64, "protocol": {"seeds": {"seed": 1000}}}))
    paths.decision.parent.mkdir(parents=True)
    paths.decision.write_text(json.dumps({"model_name": "m", "version": 2, "alias": "champion", "reused": False,
                                          "reason": "trained_mean_reward -3.7 beats champion v1 -3.75 by more "
                                                    "than 0.0"}))
    got = file_metrics(paths)
    assert got["train/final_loss"] == 0.69 and "train/loss" not in got
    assert got["train/steps"] == 4 and got["eval/win_rate"] == 0.75
    assert "eval/judge" not in got  # numeric only
    assert not [k for k in got if k.startswith("eval/protocol")]  # settings, not measurements
    assert got["register/version"] == 2 and got["register/champion"] == 1
    text = summarize({"run_id": "abc", "eval": json.loads(paths.eval_metrics.read_text()),
                      "decision": json.loads(paths.decision.read_text())}, "sqlite:////x/mlflow.db", "prefdiff")
    assert "0.750  (95% prompt-clustered bootstrap 0.300 - 0.950 over 2 prompts; Wilson 0.350 - 0.900;" in text
    assert "trained -3.7000 vs base -3.8000" in text
    assert "m v2 -> champion (registered): trained_mean_reward -3.7 beats champion v1 -3.75" in text
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in text


# --------------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------------


def test_deployment_applies_with_cron_and_concurrency_one(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment

    monkeypatch.chdir(REPO)  # the entrypoint is recorded relative to the working directory
    deployment_id = build_deployment(name="test-round", cron="*/5 * * * *").apply()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(deployment_id)
        flow = client.read_flow(dep.flow_id)
    assert flow.name == preference_round.name == "preference-round"
    assert dep.name == "test-round"
    assert [s.schedule.cron for s in dep.schedules] == ["*/5 * * * *"]
    assert dep.schedules[0].schedule.timezone == "UTC"
    assert dep.entrypoint == "flows/round.py:preference_round"
    limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else dep.concurrency_limit
    assert limit == 1


def test_deploy_cli_options():
    from flows.deploy import parse_args

    args = parse_args(["--cron", "0 4 * * 1", "--name", "weekly"])
    assert (args.cron, args.name, args.timezone) == ("0 4 * * 1", "weekly", "UTC")


def test_prefect_yaml_is_a_valid_work_pool_deployment():
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with (3.8.8)
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    (dep,) = [d for d in model.deployments if d.name == "nightly-round"]
    assert dep.entrypoint == "flows/round.py:preference_round"
    file, _, func = dep.entrypoint.partition(":")
    assert (REPO / file).is_file()
    assert load_flow_from_entrypoint(str(REPO / dep.entrypoint)).name == "preference-round"
    assert dep.work_pool.name == "prefdiff-local"
    assert dep.concurrency_limit == 1
    (schedule,) = raw["deployments"][0]["schedules"]
    assert schedule["cron"] == "0 3 * * *"
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises on a bad cron/timezone
    steps = [next(iter(s)) for s in raw["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory"]


def test_flow_module_import_is_cheap():
    import subprocess

    code = "import sys, flows.round; print(any(m in sys.modules for m in ('mlflow', 'torch', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
