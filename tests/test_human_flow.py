"""The human-in-the-loop round (flows/human.py) and the deployments (flows/deploy.py, prefect.yaml).

Real Prefect flow runs under the session's ``prefect_test_harness`` in one module-scoped tiny DVC
workspace (``make_workspace`` with ``TINY_OVERRIDES``, ``label.source: human``, two annotators per group).
The first round runs sample -> [paused] -> label -> train for real: the flow starts the real labeling server
(``python -m prefdiff.labeling.server``), two annotators label every group over its HTTP API (one undoes a
label on the way), the flow's watcher resumes the run when every group has two labels, and the label stage
turns the log into the preference pairs training uses. The later rounds reuse the workspace (DVC skips the
unchanged stages) for the operator's resume, resuming twice, done = false and the timeout, so they cost
seconds. ~1.5 min of CPU on 2 cores (2-4 min wall while other jobs shared the machine).
Two human rounds in one flow run get a workspace of their own (one annotator, two prompts, one epoch): six
stage processes, 2.5-3 min wall on the shared 2-core machine, almost all of it process start-up.
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES, isolated_mlflow, make_workspace

from flows.human import (
    FLOW_NAME,
    LabelingStopped,
    LabelingTimeout,
    check_rounds,
    check_wait,
    human_round,
    kept_log_path,
    label_progress,
    parse_args,
    resume,
)
from prefdiff.config import HumanLabelParams, merged
from prefdiff.paths import Paths

ANNOTATORS_PER_GROUP = 2
LOG = "data/labels/labels.jsonl"  # params.yaml label.human.log
EXPERIMENT = "prefdiff"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT = _free_port()  # the labeling server's, in the workspace's params (label.human.port)
OVERRIDES = merged(TINY_OVERRIDES, {"label": {"source": "human", "human": {
    "annotators_per_group": ANNOTATORS_PER_GROUP, "port": PORT}}})


# --------------------------------------------------------------------------------------------------
# Annotators, through the labeling server's HTTP API
# --------------------------------------------------------------------------------------------------


def _label_all(annotator: str, *, limit: int | None = None) -> list[int]:
    """``annotator`` labels every group the server offers (at most ``limit``), always preferring the image
    with the lower id; returns the groups labeled."""
    done: list[int] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as client:
        while limit is None or len(done) < limit:
            nxt = client.get("/api/next", params={"annotator": annotator}).raise_for_status().json()
            if nxt["state"] == "done":
                break
            task = nxt["task"]
            first, second = task["image_ids"]
            client.post("/api/labels", json={
                "annotator": annotator, "dataset_sha256": nxt["dataset_sha256"], "group_id": task["group_id"],
                "image_ids": task["image_ids"], "choice": "first" if first < second else "second",
            }).raise_for_status()
            done.append(task["group_id"])
    return done


def _undo(annotator: str) -> int:
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=30) as client:
        return client.post("/api/undo", json={"annotator": annotator}).raise_for_status().json()["group_id"]


def _make_incomplete(ws: Path) -> None:
    """Bob takes back his last label (with the log's own writer, no server running): one group short."""
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.label_log import LabelLog

    store = TrajectoryStore.open(Paths(ws).trajectories, verify=False)
    with LabelLog.open(ws / LOG, store, writer=True, annotators_per_group=ANNOTATORS_PER_GROUP) as log:
        if log.groups_complete() == log.num_groups:
            log.undo("bob")


# --------------------------------------------------------------------------------------------------
# Prefect helpers
# --------------------------------------------------------------------------------------------------


def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _latest_run():
    """The human round's most recent flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


def _wait_paused(timeout: float = 240.0):
    """The id of the human round's flow run that is Paused (waiting for labels), once there is one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise TimeoutError("the human round never paused")


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run ``fn`` beside the flow (in this context: the harness's Prefect settings); its result or error."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            out["error"] = err

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True)
    thread.start()
    return thread, out


def _joined(thread: threading.Thread, out: dict):
    thread.join(timeout=60)
    if "error" in out:
        raise out["error"]
    return out.get("result")


def _flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)]


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return run


# --------------------------------------------------------------------------------------------------
# End to end: paused, resumed by the watcher, trained
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoRound:
    ws: Path
    uri: str
    state: object
    annotators: dict
    log_bytes: bytes


@pytest.fixture(scope="module")
def auto_round(prefect_harness, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("human")
    with isolated_mlflow(f"sqlite:///{tmp}/mlflow.db") as uri:
        ws = make_workspace(tmp / "ws", OVERRIDES)

        def annotators() -> dict:
            flow_run_id = _wait_paused()  # the flow has started the labeling server by now
            alice = _label_all("alice")
            bob = _label_all("bob", limit=len(alice) - 1)  # never complete before the end: no early resume
            undone = _undo("bob")  # bob takes his last label back: two groups are one label short
            time.sleep(4)  # four watcher polls
            state_while_short = _flow_run(flow_run_id).state.type
            done_at = time.time()
            again = _label_all("bob")
            return {"flow_run_id": flow_run_id, "state_while_short": state_while_short, "done_at": done_at,
                    "alice": alice, "bob": bob, "undone": undone, "again": again}

        thread, out = _in_thread(annotators)
        state = human_round(repo=str(ws), stages=["sample", "label", "train"], timeout_seconds=300, poll_seconds=1,
                            serve_labels=True, run_name="human-1", return_state=True)
        yield AutoRound(ws=ws, uri=uri, state=state, annotators=_joined(thread, out), log_bytes=(ws / LOG).read_bytes())


def test_paused_round_resumes_when_every_group_is_labeled_and_trains_on_the_labels(auto_round):
    from prefect.client.schemas.objects import StateType

    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore

    state, paths, who = auto_round.state, Paths(auto_round.ws), auto_round.annotators
    assert state.is_completed(), f"flow ended {state.type}: {state.message}"
    result = state.result()
    n_groups = TINY_OVERRIDES["sample"]["num_prompts"]
    assert sorted(who["alice"]) == sorted(who["bob"] + [g for g in who["again"] if g != who["undone"]])
    assert sorted(who["alice"]) == list(range(n_groups)) and who["undone"] in who["again"]
    assert who["flow_run_id"] == state.state_details.flow_run_id
    assert who["state_while_short"] == StateType.PAUSED, "resumed before every group had two labels"
    note = (f"automatic: {n_groups}/{n_groups} groups labeled by 2 annotator(s) each ({2 * n_groups} labels by "
            f"alice, bob) in {auto_round.ws / LOG}")
    assert result["labeling"] == {"resumed_by": "automatic", "labeled": n_groups, "total": n_groups, "note": note}
    assert result["stages"] == {"sample": True, "label": True, "train": True}

    # the label stage read the people's log: one pair per group, the lower image id preferred, as both chose
    groups = TrajectoryStore.open(paths.trajectories, verify=False).groups()
    pairs = PreferenceStore.open(paths.preferences).pairs
    assert sorted((p.group_id, p.winner, p.loser, p.tie) for p in pairs) == sorted(
        (g["group_id"], min(g["image_ids"]), max(g["image_ids"]), False) for g in groups)
    assert (paths.trained / "pytorch_lora_weights.safetensors").is_file()
    # sampled before the wait; labeled after it; the log snapshotted into DVC; the flow never wrote the log
    assert (paths.trajectories / "index.json").stat().st_mtime < who["done_at"]
    assert (paths.preferences / "index.json").stat().st_mtime > who["done_at"]
    assert (auto_round.ws / f"{LOG}.dvc").is_file()
    assert (auto_round.ws / LOG).read_bytes() == auto_round.log_bytes

    run = _mlflow_run(auto_round.uri, "human-1")
    assert run.info.status == "FINISHED"
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["human/groups_labeled"] == n_groups == metrics["human/groups_total"]
    assert metrics["human/labels"] == 2 * n_groups
    assert metrics["label/effective_labels"] == 2 * n_groups and metrics["label/undone_labels"] == 1
    # both always prefer the lower id: full agreement with the majority (kappa is undefined: one category only)
    assert metrics["label/majority_agreement/alice"] == metrics["label/majority_agreement/bob"] == 1.0
    assert "train/final_loss" in metrics
    assert tags["human.resumed_by"] == "automatic" and tags["prefdiff.round_kind"] == "human"

    logs = _flow_run_logs(state.state_details.flow_run_id)
    assert f"labeling page: http://127.0.0.1:{PORT}/  (started by this flow)" in logs
    assert any(line.startswith("label-server: label log: ") for line in logs), "the server's output is not logged"
    assert any(f"python -m flows.human resume {state.state_details.flow_run_id}" in line
               and "PREFECT_API_URL=http://127.0.0.1:" in line for line in logs)
    assert any(line.startswith(f"labels: {n_groups - 2}/{n_groups} groups labeled") for line in logs)
    assert "label watcher: every group is labeled; resumed the run" in logs
    assert not _listening(PORT), "the labeling server outlived the wait"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# The operator's resume, twice; the timeout
# --------------------------------------------------------------------------------------------------


def test_operator_resumes_with_done_and_the_label_stage_uses_the_labels_there_are(auto_round):
    from prefdiff.data.preferences import PreferenceStore

    _make_incomplete(auto_round.ws)  # 3 of 4 groups have two labels: the watcher keeps waiting
    thread, out = _in_thread(lambda: resume(str(_wait_paused()), note="enough for today"))
    with isolated_mlflow(auto_round.uri):
        state = human_round(repo=str(auto_round.ws), stages=["sample", "label"], timeout_seconds=300,
                            poll_seconds=1, run_name="human-2", return_state=True)
    code, message = _joined(thread, out)
    flow_run_id = state.state_details.flow_run_id
    name = _flow_run(flow_run_id).name
    assert (code, message) == (0, f"resumed flow run {flow_run_id} ({name}) with done: it goes on with the label stage")
    assert state.is_completed(), f"flow ended {state.type}: {state.message}"
    result = state.result()
    n_groups = TINY_OVERRIDES["sample"]["num_prompts"]
    assert result["labeling"] == {"resumed_by": "operator", "note": "enough for today", "labeled": n_groups - 1,
                                  "total": n_groups}
    assert result["stages"] == {"sample": False, "label": True}  # same samples; the log changed
    assert len(PreferenceStore.open(Paths(auto_round.ws).preferences).pairs) == n_groups - 1
    run = _mlflow_run(auto_round.uri, "human-2")
    assert run.data.tags["human.note"] == "enough for today" and run.data.tags["human.resumed_by"] == "operator"
    assert run.data.metrics["label/groups_left_out"] == 1

    assert resume(str(flow_run_id)) == (1, f"already resumed: flow run {flow_run_id} ({name}) is Completed")
    assert resume("not-a-run")[0] == 2 and "is not a flow run id" in resume("not-a-run")[1]
    code, message = resume(str(uuid4()))
    assert code == 2 and message.startswith("error: no flow run") and "PREFECT_API_URL" in message


def test_resumed_with_done_false_stops_before_the_label_stage(auto_round):
    from prefect.flow_runs import resume_flow_run

    _make_incomplete(auto_round.ws)
    # what the Prefect UI's Resume form sends with done unticked
    thread, out = _in_thread(lambda: resume_flow_run(_wait_paused(), run_input={"done": False, "note": "bad batch"}))
    with isolated_mlflow(auto_round.uri):
        with pytest.raises(LabelingStopped, match=r"resumed with done = false: the round stops before the label "
                                                  r"stage; 3/4 groups labeled .*; start a new human round"):
            human_round(repo=str(auto_round.ws), stages=["sample", "label", "train"], timeout_seconds=300,
                        poll_seconds=1, run_name="human-stop")
    _joined(thread, out)
    run = _mlflow_run(auto_round.uri, "human-stop")
    assert run.info.status == "FAILED" and run.data.tags["prefdiff.stage.sample"] == "skipped"
    assert "prefdiff.stage.label" not in run.data.tags  # never started


def test_timeout_fails_the_round_keeping_the_labels_and_resume_says_timed_out(auto_round):
    _make_incomplete(auto_round.ws)
    log = auto_round.ws / LOG
    before = log.read_bytes()
    with isolated_mlflow(auto_round.uri):
        with pytest.raises(LabelingTimeout, match=r"nobody resumed the round within 2 s; 3/4 groups labeled .* "
                                                  r"in .*labels\.jsonl; the labels are kept there: start a new "
                                                  r"human round"):
            human_round(repo=str(auto_round.ws), stages=["sample", "label"], timeout_seconds=2, poll_seconds=1,
                        run_name="human-3")
    flow_run = _latest_run()
    # the server ends a pause past its deadline itself: the state says so, the flow's log has the line above
    assert flow_run.state.is_failed() and flow_run.state.message == "The flow was failed and never resumed."
    assert log.read_bytes() == before
    assert resume(str(flow_run.id)) == (
        1, f"timed out: flow run {flow_run.id} ({flow_run.name}) was not resumed in time; the labels are kept in "
           f"{auto_round.ws / LOG}; start a new human round (python -m flows.human) to go on from them")
    run = _mlflow_run(auto_round.uri, "human-3")
    assert run.info.status == "FAILED"
    assert run.data.tags["prefdiff.error"].startswith("LabelingTimeout: nobody resumed the round")
    assert "prefdiff.failed_stage" not in run.data.tags  # no stage failed: nobody came


# --------------------------------------------------------------------------------------------------
# Two human rounds in one flow run: round 2 samples from round 1's LoRA; both label logs kept
# --------------------------------------------------------------------------------------------------


def _wait_paused_again(flow_run_id, pauses: int, timeout: float = 240.0) -> None:
    """Until flow run ``flow_run_id`` is Paused for the ``pauses``-th time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            states = client.read_flow_run_states(flow_run_id)
            if client.read_flow_run(flow_run_id).state.is_paused() and sum(
                    s.type == StateType.PAUSED for s in states) >= pauses:
                return
            time.sleep(0.5)
    raise TimeoutError(f"flow run {flow_run_id} never paused {pauses} times")


def _log_header(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def test_two_human_rounds_sample_from_the_previous_round_and_keep_every_rounds_labels(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient

    from prefdiff.data.atomic import sha256_file
    from prefdiff.data.baseline import tree_sha256
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.models.lora import LORA_WEIGHT_NAME
    from prefdiff.tracking import PARENT_RUN_TAG, round_runs

    # lean: one annotator, two prompts, one epoch (what is tested is the hand-over between rounds)
    lean = merged(OVERRIDES, {"label": {"human": {"annotators_per_group": 1}}, "sample": {"num_prompts": 2},
                              "train": {"epochs": 1}})
    with isolated_mlflow(f"sqlite:///{tmp_path}/mlflow.db") as uri:
        ws = make_workspace(tmp_path / "ws", lean)
        paths = Paths(ws)

        def annotator() -> dict:  # alice labels each round; what round 2 starts from, seen while it waits
            flow_run_id = _wait_paused()
            seen = {"dataset_1": TrajectoryStore.open(paths.trajectories, verify=False).index_sha256(),
                    "labeled_1": _label_all("alice")}
            _wait_paused_again(flow_run_id, 2)
            seen |= {"dataset_2": TrajectoryStore.open(paths.trajectories, verify=False).index_sha256(),
                     "trained_1": sha256_file(paths.trained / LORA_WEIGHT_NAME),  # round 2 has not trained yet
                     "labeled_2": _label_all("alice")}
            return seen

        thread, out = _in_thread(annotator)
        state = human_round(repo=str(ws), stages=["sample", "label", "train"], timeout_seconds=300, poll_seconds=1,
                            serve_labels=True, run_name="human-rounds", rounds=2, return_state=True)
        seen = _joined(thread, out)
    assert state.is_completed(), f"flow ended {state.type}: {state.message}"
    result = state.result()
    n_groups = 2
    assert sorted(seen["labeled_1"]) == sorted(seen["labeled_2"]) == list(range(n_groups))
    assert seen["dataset_1"] != seen["dataset_2"]

    # round 2 sampled from round 1's trained LoRA, copied to models/policy: the sample stage recorded its sha256
    model_2 = TrajectoryStore.open(paths.trajectories, verify=False).index["model"]
    assert model_2["policy_lora"] == "models/policy"
    assert model_2["policy_lora_sha256"] == tree_sha256(ws / "models/policy")
    assert sha256_file(ws / "models/policy" / LORA_WEIGHT_NAME) == seen["trained_1"]
    assert result["rounds"][0]["next"] is None
    kept = ws / f"data/labels/labels-{seen['dataset_1'][:16]}.jsonl"
    assert result["rounds"][1]["next"] == {"kept_log": str(kept.relative_to(ws)), "policy": "models/policy"}
    params = yaml.safe_load(paths.params.read_text())
    assert params["sample"]["lora"] == params["train"]["init_lora"] == "models/policy"

    # each round's labels kept, each in its own DVC-tracked log naming its own samples
    assert _log_header(kept)["dataset_sha256"] == seen["dataset_1"]
    assert _log_header(ws / LOG)["dataset_sha256"] == seen["dataset_2"]
    for log in (kept, ws / LOG):
        assert Path(f"{log}.dvc").is_file(), log
        assert sum(json.loads(line)["kind"] == "label" for line in log.read_text().splitlines()) == n_groups

    # one parent MLflow run, a child run per round
    client = MlflowClient(tracking_uri=uri)
    parent = result["run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["prefdiff.round_kind"] == "human"
    with isolated_mlflow(uri):
        children = round_runs(parent)
    assert children == result["children"] and sorted(children) == [1, 2]
    for r, run_id in children.items():
        child = client.get_run(run_id)
        assert child.info.status == "FINISHED" and child.data.tags[PARENT_RUN_TAG] == parent
        assert child.info.run_name == f"human-rounds-round-{r:03d}"
        assert child.data.metrics["human/labels"] == n_groups and "train/final_loss" in child.data.metrics
    curve = client.get_metric_history(parent, "rounds/human/labels")
    assert sorted((m.step, m.value) for m in curve) == [(1, n_groups), (2, n_groups)]


# --------------------------------------------------------------------------------------------------
# The label counter and the arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class _Index:  # what the label-log reader needs of a trajectory store (prefdiff.labeling.label_log.LabelLog.open)
    root: Path
    sha: str

    def index_sha256(self) -> str:
        return self.sha

    def groups(self) -> list[dict]:
        return [{"group_id": g, "prompt": "a 3", "seed": g, "image_ids": [2 * g, 2 * g + 1]} for g in range(4)]


def _pair(seq: int, annotator: str, group: int) -> dict:
    return {"kind": "label", "seq": seq, "time": "2026-12-02T11:00:00Z", "annotator": annotator,
            "dataset_sha256": "a" * 64, "group_id": group, "mode": "pair", "image_ids": [2 * group, 2 * group + 1],
            "choice": "first"}


def test_label_progress_counts_groups_with_enough_annotators(tmp_path):
    hp = HumanLabelParams(annotators_per_group=2)
    header = {"kind": "header", "schema": 1, "trajectories": "data/trajectories", "dataset_sha256": "a" * 64,
              "mode": "pair", "tags": hp.tags}
    records = [header, _pair(1, "alice", 0), _pair(2, "bob", 0), _pair(3, "alice", 1), _pair(4, "bob", 1),
               {"kind": "undo", "seq": 5, "time": "2026-12-02T11:01:00Z", "annotator": "bob", "undoes": 4},
               _pair(6, "alice", 2), _pair(7, "carol", 2)]
    log = tmp_path / "labels.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "label", "seq": 8, "ann')  # torn
    store = _Index(tmp_path, "a" * 64)
    progress = label_progress(log, store, hp)
    assert (progress.labeled, progress.total, progress.labels) == (2, 4, 5)  # groups 0 and 2; bob's 1 undone
    assert progress.annotators == ("alice", "bob", "carol") and not progress.complete
    assert label_progress(log, store, HumanLabelParams(annotators_per_group=1)).labeled == 3
    assert label_progress(tmp_path / "none.jsonl", store, hp).labels == 0  # nobody has labeled yet
    from prefdiff.labeling.label_log import LabelLogError

    with pytest.raises(LabelLogError, match=r"labels trajectory dataset a{12}… .* is b{12}… \(re-sampled\?\)"):
        label_progress(log, _Index(tmp_path, "b" * 64), hp)


def test_wait_arguments_are_checked():
    assert check_wait(None, 10, 1)[1] == "label"
    with pytest.raises(ValueError, match="have no 'label'"):
        check_wait(["train", "evaluate"], 10, 1)
    with pytest.raises(ValueError, match="timeout_seconds 0 must be >= 1"):
        check_wait(None, 0, 1)
    with pytest.raises(ValueError, match="poll_seconds 20 must be between 1 and timeout_seconds"):
        check_wait(None, 10, 20)
    args = parse_args(["resume", "0b6c5e1e-5c9f-4f0e-9a57-3f0d8d6a3c11", "--note", "done"])
    assert (args.command, args.flow_run_id, args.note) == ("resume", "0b6c5e1e-5c9f-4f0e-9a57-3f0d8d6a3c11", "done")
    args = parse_args(["--timeout-hours", "2", "--serve-labels"])
    assert (args.command, args.timeout_hours, args.serve_labels, args.poll_seconds, args.rounds) == (
        "start", 2.0, True, 10, 1)
    assert parse_args(["--rounds", "3"]).rounds == 3


def test_rounds_are_checked_before_anything_runs():
    from prefdiff.config import parse_params

    def params(**train):
        return parse_params(merged(yaml.safe_load((REPO / "params.yaml").read_text()), {"train": train}))

    check_rounds(3, ["sample", "label", "train"], params())
    check_rounds(1, ["sample", "label"], params())  # one round need not train
    with pytest.raises(ValueError, match=r"rounds = 0: allowed: an integer 1\.\.1000"):
        check_rounds(0, ["sample", "label", "train"], params())
    with pytest.raises(ValueError, match=r"every round needs the sample and train stages; .* lack \['train'\]"):
        check_rounds(2, ["sample", "label"], params())
    with pytest.raises(ValueError, match="train.finetune = 'full'; allowed: lora"):
        check_rounds(2, ["sample", "label", "train"], params(finetune="full"))
    with pytest.raises(ValueError, match="train.reference = 'previous_round' needs train.init_lora"):
        check_rounds(2, ["sample", "label", "train"], params(reference="previous_round"))
    assert kept_log_path(Path("data/labels/labels.jsonl"), "ab" * 32) == Path(
        "data/labels/labels-abababababababab.jsonl")


def test_cli_refuses_bad_wait_settings_in_one_line():
    out = subprocess.run([sys.executable, "-m", "flows.human", "--poll-seconds", "0"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: poll_seconds 0 must be between 1 and timeout_seconds (86400)"]


def test_resume_cli_needs_a_reachable_api_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run_id = "0b6c5e1e-5c9f-4f0e-9a57-3f0d8d6a3c11"
    out = subprocess.run([sys.executable, "-m", "flows.human", "resume", run_id], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: PREFECT_API_URL is not set;")
    closed = "http://127.0.0.1:9/api"  # the discard port: nothing listens
    out = subprocess.run([sys.executable, "-m", "flows.human", "resume", run_id], cwd=REPO,
                         env=env | {"PREFECT_API_URL": closed}, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: no Prefect API answers at {closed}: the server is down, or it "
                                               "was the temporary server of a human round that has ended"]


def test_human_flow_module_import_is_cheap():
    code = "import sys, flows.human; print(any(m in sys.modules for m in ('mlflow', 'torch', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Deployments: nightly automatic rounds, a human round on demand
# --------------------------------------------------------------------------------------------------


def test_served_deployments_nightly_and_human_on_demand(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment, build_human_deployment, parse_args

    monkeypatch.chdir(REPO)  # entrypoints are recorded relative to the working directory
    nightly_id = build_deployment(name="nightly-test").apply()
    human_id = build_human_deployment(name="on-demand-test").apply()
    with get_client(sync_client=True) as client:
        nightly, human = client.read_deployment(nightly_id), client.read_deployment(human_id)
        assert client.read_flow(human.flow_id).name == FLOW_NAME
    assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
    assert human.schedules == []
    assert human.entrypoint == "flows/human.py:human_round"
    assert human.parameters == {"serve_labels": True}
    for dep in (nightly, human):
        limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else dep.concurrency_limit
        assert limit == 1, dep.name
    args = parse_args(["--no-human"])
    assert args.no_human and args.human_name == "on-demand"


def test_prefect_yaml_deploys_both_to_the_process_pool(prefect_harness, tmp_path):
    """``prefect --no-prompt deploy --all`` for real (there is no dry run in 3.8.8) against the test API,
    from a copy of the checkout: both deployments, their schedules, parameters and concurrency."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    for item in ("prefect.yaml", "flows", "prefdiff", "params.yaml", "pyproject.toml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / item)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="prefdiff-local", type="process"))
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(tmp_path))
    prefect = Path(sys.executable).parent / "prefect"
    out = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("preference-round/nightly-round")
        human = client.read_deployment_by_name(f"{FLOW_NAME}/on-demand")
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert [d["name"] for d in raw["deployments"]] == ["nightly-round", "on-demand"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 3 * * *", "UTC")]
    assert human.schedules == [] and human.parameters == {"serve_labels": True}
    for dep in (nightly, human):
        assert dep.work_pool_name == "prefdiff-local"
        limit = dep.global_concurrency_limit.limit if dep.global_concurrency_limit else dep.concurrency_limit
        assert limit == 1, dep.name
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}]
