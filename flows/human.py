"""A human-in-the-loop round: sample, wait for people's labels, then label -> train -> heldout -> evaluate -> register.

    sample -> [paused: people label in the labeling page] -> label -> train -> heldout -> evaluate -> register

The round is ``flows.round.run_round`` with a wait before the label stage. The wait is Prefect's
``pause_flow_run`` with a typed input (``LabelingDone``): the process stays alive (so the labeling server it
may have started and the watcher below keep running) and the run shows as Paused in the Prefect UI, whose
Resume form asks for ``done`` / ``note``. ``suspend_flow_run`` is not used: it needs a deployment and, on
resume, re-runs the flow from the top in a new process.

It continues when

- the operator resumes it with done: the Prefect UI, or ``python -m flows.human resume <flow-run-id>``
  (Prefect 3.8 has no ``prefect flow-run resume`` command); or
- every prompt group has been labeled by ``label.human.annotators_per_group`` annotators: a watcher thread
  reads the label log (``label.human.log``, the shared label-log contract in the README) every
  ``poll_seconds`` and resumes the run itself with ``prefect.flow_runs.resume_flow_run``.

Once resumed with done, the flow snapshots the log into DVC (``dvc add``; the label stage depends on
``data/labels``) and runs the label stage, which reads the same log with the same reader as the watcher
(``prefdiff.labeling.label_log.LabelLog``).

With ``rounds`` > 1 the flow runs that many rounds under one MLflow parent run, each round a child run;
before round r > 1 (``start_next_round``) it keeps round r-1's label log under its dataset's name (``dvc
move``), copies round r-1's trained LoRA into ``models/policy`` and sets ``sample.lora`` and
``train.init_lora`` to it, so round r samples from (and trains on from) round r-1's policy.

The wait has a timeout (``timeout_seconds``): then the run fails with one line naming the label log. The
flow never writes the log (the labeling server appends to it), so no label is lost: a later human round
samples nothing new (DVC skips the unchanged sample stage) and its watcher counts the labels already there.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput

from flows.round import (
    _dvc_executable,
    _flow_run_info,
    _logger,
    _mark_failed,
    check_stages,
    open_parent_run,
    refused,
    retry_on_io_error,
    run_flow_cli,
    run_round,
    stream_command,
)
from prefdiff.config import load_params
from prefdiff.paths import REPO_ROOT, Paths

if TYPE_CHECKING:
    from prefdiff.config import HumanLabelParams
    from prefdiff.data.trajectories import TrajectoryStore

FLOW_NAME = "human-round"
DEFAULT_TIMEOUT_SECONDS = 24 * 3600
DEFAULT_POLL_SECONDS = 10
SERVER_MODULE = "prefdiff.labeling.server"
SERVER_START_SECONDS = 60.0
RESUME_FORM_HELP = ("done = true when the labeling is finished: the round goes on with label -> train -> heldout -> "
                    "evaluate -> register (done = false stops the round; the labels stay in the label log)")


class LabelingDone(RunInput):
    """What resumes a paused human round: the Prefect UI's Resume form, ``python -m flows.human resume``, or
    the watcher once every group is labeled."""

    done: bool
    note: str = ""


class LabelingTimeout(RuntimeError):
    """Nobody resumed the round before its timeout."""


class LabelingStopped(RuntimeError):
    """The operator resumed the round with done = false."""


# --------------------------------------------------------------------------------------------------
# The label log: how many prompt groups are labeled (read with the label stage's own reader)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelProgress:
    labeled: int  # groups with effective labels from at least `needed` annotators
    total: int  # groups in the trajectory dataset
    needed: int  # label.human.annotators_per_group
    labels: int  # effective label records (not undone)
    annotators: tuple[str, ...]
    log: str

    @property
    def complete(self) -> bool:
        return self.labeled >= self.total

    def describe(self) -> str:
        who = f" by {', '.join(self.annotators)}" if self.annotators else ""
        return (f"{self.labeled}/{self.total} groups labeled by {self.needed} annotator(s) each "
                f"({self.labels} labels{who}) in {self.log}")


def label_progress(log: Path, store: TrajectoryStore, hp: HumanLabelParams) -> LabelProgress:
    """The groups of ``store`` whose effective labels in ``log`` come from at least
    ``hp.annotators_per_group`` annotators (an annotator labels a group at most once). A missing log is no
    labels yet; any other unusable log (another dataset, mode or tags, a corrupt line) raises the reader's
    ``prefdiff.labeling.label_log.LabelLogError``, exactly as the label stage would."""
    from prefdiff.labeling.label_log import LabelLog

    total, needed = len(store.groups()), hp.annotators_per_group
    if not log.is_file():
        return LabelProgress(0, total, needed, 0, (), str(log))
    label_log = LabelLog.open(log, store, annotators_per_group=needed)
    label_log.check_settings(hp.mode, hp.tags)
    labels = label_log.effective_labels()
    return LabelProgress(label_log.groups_complete(), total, needed, len(labels),
                         tuple(sorted({la.annotator for la in labels})), str(log))


def label_counter(root: Path, hp: HumanLabelParams) -> Callable[[], LabelProgress]:
    """A no-argument function returning the current LabelProgress of ``root``'s trajectory dataset."""
    from prefdiff.data.trajectories import TrajectoryStore

    store = TrajectoryStore.open(Paths(root).trajectories, verify=False)  # ids and the index hash suffice
    log = label_log_path(root, hp)
    return lambda: label_progress(log, store, hp)


def label_log_path(root: Path, hp: HumanLabelParams) -> Path:
    return Path(hp.log) if Path(hp.log).is_absolute() else root / hp.log


# --------------------------------------------------------------------------------------------------
# The labeling server (started by the flow with serve_labels=True) and the watcher
# --------------------------------------------------------------------------------------------------


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # a wildcard bind answers on loopback


def is_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((_probe_host(host), port), timeout=1.0):
            return True
    except OSError:
        return False


def labeling_url(hp: HumanLabelParams) -> str:
    return f"http://{_probe_host(hp.host)}:{hp.port}/"


class LabelServer:
    """``python -m prefdiff.labeling.server`` in the workspace, its output in the flow's log; stopped with
    its whole process group."""

    def __init__(self, root: Path, hp: HumanLabelParams) -> None:
        self.root, self.hp = root, hp
        self.proc: subprocess.Popen[str] | None = None
        self.tail: deque[str] = deque(maxlen=20)

    def start(self) -> None:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", SERVER_MODULE, "--workspace", str(self.root)]  # the rest from label.human
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     bufsize=1, errors="replace", start_new_session=True)
        pump = threading.Thread(target=contextvars.copy_context().run, args=(self._pump,), daemon=True,
                                name="label-server-output")
        pump.start()
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not is_listening(self.hp.host, self.hp.port):
            if self.proc.poll() is not None:
                pump.join(timeout=5)
                raise RuntimeError(f"the labeling server (python -m {SERVER_MODULE}) exited with code "
                                   f"{self.proc.returncode} before listening on {labeling_url(self.hp)}; its last "
                                   "lines:\n" + "\n".join(self.tail))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the labeling server did not listen on {labeling_url(self.hp)} within "
                                   f"{SERVER_START_SECONDS:.0f} s; stopped it")
            time.sleep(0.5)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = _logger()
        for raw in self.proc.stdout:
            line = raw.rstrip()
            if line:
                self.tail.append(line)
                log.info(f"label-server: {line}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its fsync'd log is complete after every acknowledgement
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class LabelWatcher:
    """A thread that re-counts the labels every ``poll_seconds`` and resumes the paused run, with done, once
    every group is labeled. Runs in a copy of the flow's context (Prefect settings, run logger)."""

    def __init__(self, flow_run_id: UUID, count: Callable[[], LabelProgress], poll_seconds: float) -> None:
        self.flow_run_id, self.count, self.poll_seconds = flow_run_id, count, poll_seconds
        self.resumed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._watch,), daemon=True,
                                        name="label-watcher")

    def __enter__(self) -> LabelWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_seconds + 30)

    def _watch(self) -> None:
        from prefect.exceptions import FlowPauseTimeout, NotPausedError
        from prefect.flow_runs import resume_flow_run

        from prefdiff.labeling.label_log import LabelLogError

        log = _logger()
        last: LabelProgress | None = None
        last_problem = ""
        while not self._stop.wait(self.poll_seconds):
            try:
                progress = self.count()
            except (LabelLogError, OSError) as err:
                if str(err) != last_problem:  # once per distinct problem, not every poll
                    log.warning(f"label watcher: {err}")
                    last_problem = str(err)
                continue
            last_problem = ""
            if progress != last:
                log.info(f"labels: {progress.describe()}")
                last = progress
            if not progress.complete:
                continue
            try:
                resume_flow_run(self.flow_run_id, run_input=LabelingDone(
                    done=True, note=f"automatic: {progress.describe()}").model_dump())
            except NotPausedError:
                continue  # not paused yet, or the operator resumed it first (then the flow stops this thread)
            except FlowPauseTimeout:
                return
            except RuntimeError as err:  # e.g. the input schema is saved just after the Paused state: next poll
                log.info(f"label watcher: resume not accepted yet ({err}); retrying")
                continue
            self.resumed = True
            log.info("label watcher: every group is labeled; resumed the run")
            return


# --------------------------------------------------------------------------------------------------
# The wait
# --------------------------------------------------------------------------------------------------


def _api_url() -> str:
    """The Prefect API this run talks to (the ephemeral server's own URL when PREFECT_API_URL is unset)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def resume_command(flow_run_id: str) -> str:
    return f"PREFECT_API_URL={_api_url()} python -m flows.human resume {flow_run_id}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.0f} s"


@task(name="record-labeling", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_error,
      cache_policy=NO_CACHE)
def record_labeling(repo: str, run_id: str, progress: dict[str, Any], resumed_by: str, note: str,
                    wait_seconds: float) -> None:
    """The wait's outcome into the round's MLflow run: ``human/*`` metrics and who resumed it."""
    import mlflow

    from prefdiff.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(Path(repo)))
    client.log_metric(run_id, "human/groups_labeled", progress["labeled"])
    client.log_metric(run_id, "human/groups_total", progress["total"])
    client.log_metric(run_id, "human/labels", progress["labels"])
    client.log_metric(run_id, "human/wait_seconds", wait_seconds)
    client.set_tag(run_id, "prefdiff.round_kind", "human")
    client.set_tag(run_id, "human.resumed_by", resumed_by)
    if note:
        client.set_tag(run_id, "human.note", note[:4000])


def _dvc(repo: str, *args: str) -> None:
    """``dvc <args>`` in ``repo``, its output in the flow's log; RuntimeError with its last lines if it fails."""
    cmd = [_dvc_executable(), *args]
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    code, lines = stream_command(cmd, repo, env)
    if code != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` exited with {code}: " + " | ".join(lines[-5:]))


@task(name="dvc-add-labels", cache_policy=NO_CACHE)
def snapshot_label_log(repo: str, log: str) -> None:
    """``dvc add`` the label log: the labels this round trains on go into DVC's cache (and ``<log>.dvc``,
    for git), so a later round or a crash cannot lose them. The log stays a plain, appendable file (DVC's
    default copy/reflink cache; README)."""
    _dvc(repo, "add", os.path.relpath(log, repo))


def wait_for_labels(root: Path, run_id: str, hp: HumanLabelParams, *, timeout_seconds: int, poll_seconds: int,
                    serve_labels: bool) -> dict[str, Any]:
    """Pause the flow run until it is resumed with done (operator) or every group is labeled (watcher);
    start the labeling server for the wait when ``serve_labels``. Returns what resumed it and the progress.
    Raises LabelingTimeout (timeout) or LabelingStopped (done = false), both naming the kept label log."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    log = _logger()
    flow_run_id, _ = _flow_run_info()
    count = label_counter(root, hp)
    progress = count()  # a log for other samples is refused here, before anyone waits
    url = labeling_url(hp)
    server = LabelServer(root, hp) if serve_labels and not is_listening(hp.host, hp.port) else None
    if server is not None:
        server.start()
        where = "started by this flow"
    elif is_listening(hp.host, hp.port):
        where = "already up"
    else:
        where = "not up: start it with `make label-server`"
    log.info(f"labeling page: {url}  ({where})")
    log.info(f"labels: {progress.describe()}")
    log.info(f"waiting up to {_hours(timeout_seconds)} for labels; the run resumes by itself when every group is "
             f"labeled, or resume it with done from the Prefect UI or with:  {resume_command(flow_run_id)}")
    began = time.monotonic()
    try:
        with LabelWatcher(UUID(flow_run_id), count, poll_seconds) as watcher:
            answer = pause_flow_run(wait_for_input=LabelingDone.with_initial_data(RESUME_FORM_HELP, done=True),
                                    timeout=timeout_seconds, poll_interval=poll_seconds)
    except FlowPauseTimeout as err:
        from prefdiff.labeling.label_log import LabelLogError

        try:
            where = count().describe()
        except LabelLogError as bad:  # appended to by hand meanwhile: still say where the labels are
            where = str(bad)
        raise LabelingTimeout(f"nobody resumed the round within {_hours(timeout_seconds)}; {where}; the labels are "
                              "kept there: start a new human round (python -m flows.human) to go on from them") from err
    finally:
        if server is not None:
            server.stop()
    progress = count()
    resumed_by = "automatic" if watcher.resumed else "operator"
    log.info(f"resumed ({resumed_by}, done={answer.done}{f', note: {answer.note}' if answer.note else ''}); "
             f"labels: {progress.describe()}")
    if not answer.done:
        raise LabelingStopped(f"resumed with done = false: the round stops before the label stage; "
                              f"{progress.describe()}; start a new human round to go on from them")
    if not progress.complete:
        log.warning(f"resumed with {progress.total - progress.labeled} group(s) short of "
                    f"{hp.annotators_per_group} annotator(s): the label stage uses the labels there are")
    log_path = label_log_path(root, hp)
    if log_path.is_file():
        snapshot_label_log(str(root), str(log_path))
    record_labeling(str(root), run_id, {"labeled": progress.labeled, "total": progress.total,
                                        "labels": progress.labels}, resumed_by, answer.note,
                    round(time.monotonic() - began, 1))
    return {"resumed_by": resumed_by, "note": answer.note, "labeled": progress.labeled, "total": progress.total}


# --------------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------------


POLICY_DIR = "models/policy"  # a dependency of the sample stage (dvc.yaml): the LoRA round r > 1 samples from
POLICY_KEPT = frozenset({"README.md", ".gitignore"})  # git's files there; the rest is the copied LoRA
# Round r > 1 samples from round r-1's policy and trains on from it (D3PO Algorithm 1, as the one-process
# rounds loop, whose LoRA carries over); train.reference stays as params say: base, or previous_round = the
# policy the round starts from (D3PO Sec. 5.2).
NEXT_ROUND_PARAMS = {"sample.lora": POLICY_DIR, "train.init_lora": POLICY_DIR}
MAX_ROUNDS = 1000


def check_rounds(rounds: int, todo: list[str], params: Any) -> None:
    """``rounds`` and what many rounds need: every round samples and trains (round r samples from round r-1's
    trained LoRA), LoRA fine-tuning, and a train stage that can start round 1 (``stages.train.refusal``)."""
    from stages.train import refusal

    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds = {rounds!r}: allowed: an integer 1..{MAX_ROUNDS}")
    if rounds > 1:
        missing = [s for s in ("sample", "train") if s not in todo]
        if missing:
            raise ValueError(f"rounds = {rounds}: round r samples from round r-1's trained LoRA, so every round "
                             f"needs the sample and train stages; stages {todo} lack {missing}")
        if params.train.finetune != "lora":
            raise ValueError(f"rounds = {rounds}: round r samples from round r-1's LoRA (sample.lora); "
                             f"train.finetune = {params.train.finetune!r}; allowed: lora")
    if "train" in todo and (why := refusal(params)) is not None:
        raise ValueError(why)


def kept_log_path(log: Path, dataset_sha256: str) -> Path:
    """Where a round's label log is kept once the next round samples: named by the trajectory dataset its
    header names (unique per round's samples, also across flow runs), beside the live log."""
    return log.with_name(f"{log.stem}-{dataset_sha256[:16]}{log.suffix}")


@task(name="next-human-round", cache_policy=NO_CACHE)
def start_next_round(repo: str, round_index: int, label_log: str) -> dict[str, str | None]:
    """Before round ``round_index`` > 1: keep round r-1's label log ``label_log`` (``dvc move`` to
    ``kept_log_path``: file and ``.dvc`` together, so the next round's server starts a new log for its new
    samples), copy round r-1's trained LoRA (``models/trained``) into ``models/policy`` and set
    ``NEXT_ROUND_PARAMS`` in params.yaml.
    Returns ``{"kept_log", "policy"}`` (paths relative to ``repo``)."""
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.models.lora import LORA_WEIGHT_NAME

    from flows.rounds import write_params

    root, paths = Path(repo), Paths(Path(repo))
    previous = round_index - 1
    if not (paths.trained / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"round {previous} left no LoRA in {paths.trained} ({LORA_WEIGHT_NAME}): round "
                                f"{round_index} samples from it")
    log, kept = Path(label_log), None
    if log.is_file():
        sha = TrajectoryStore.open(paths.trajectories, verify=False).index_sha256()
        kept = kept_log_path(log, sha)
        if kept.exists():
            raise FileExistsError(f"{kept} exists: round {previous}'s labels ({log}) would replace the labels kept "
                                  "there; move one of them aside")
        if not Path(f"{log}.dvc").is_file():
            _dvc(repo, "add", os.path.relpath(log, repo))
        _dvc(repo, "move", os.path.relpath(log, repo), os.path.relpath(kept, repo))
    policy = root / POLICY_DIR
    policy.mkdir(parents=True, exist_ok=True)
    for old in policy.iterdir():
        if old.is_dir():
            shutil.rmtree(old)
        elif old.name not in POLICY_KEPT:
            old.unlink()
    for item in paths.trained.iterdir():  # the final LoRA; its epoch snapshots (subdirectories) stay behind
        if item.is_file():
            shutil.copy2(item, policy / item.name)
    write_params(repo, NEXT_ROUND_PARAMS)
    kept_rel = os.path.relpath(kept, repo) if kept else None
    _logger().info(f"round {round_index}: samples from round {previous}'s LoRA (copied to {POLICY_DIR}); round "
                   f"{previous}'s labels kept in {kept_rel or '(no label log)'}")
    return {"kept_log": kept_rel, "policy": POLICY_DIR}


@task(name="log-human-round", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_error,
      cache_policy=NO_CACHE)
def log_round_curve(repo: str, parent_run_id: str, round_index: int, child_run_id: str) -> None:
    """The round's metrics (its child run's) as the parent's per-round curves (``rounds/<metric>``)."""
    import mlflow

    from prefdiff.tracking import log_round_point, tracking_uri

    mlflow.set_tracking_uri(tracking_uri(Path(repo)))
    log_round_point(parent_run_id, round_index, mlflow.MlflowClient().get_run(child_run_id).data.metrics)


def check_wait(stages: list[str] | None, timeout_seconds: int, poll_seconds: int) -> list[str]:
    """The stages of a human round (it pauses before "label", so that must be one) and the wait's settings."""
    todo = check_stages(stages)
    if "label" not in todo:
        raise ValueError(f"a human round waits for labels before the label stage; stages {todo} have no 'label'")
    if timeout_seconds < 1:
        raise ValueError(f"timeout_seconds {timeout_seconds} must be >= 1 (how long to wait for labels)")
    if not 1 <= poll_seconds <= timeout_seconds:
        raise ValueError(f"poll_seconds {poll_seconds} must be between 1 and timeout_seconds ({timeout_seconds})")
    return todo


@flow(name=FLOW_NAME, log_prints=True,
      description="Sample, wait for people's labels (paused; resumes on done or when every group is labeled), "
                  "then label -> train -> heldout -> evaluate -> register, tracked in MLflow; `rounds` such "
                  "rounds, each sampling from the previous round's LoRA.")
def human_round(repo: str | None = None, timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
                poll_seconds: int = DEFAULT_POLL_SECONDS, serve_labels: bool = False,
                stages: list[str] | None = None, run_name: str | None = None, rounds: int = 1) -> dict:
    """``rounds`` human-feedback rounds in ``repo`` (default: this repo): the DVC stages of ``stages`` (default
    all six) as in ``preference_round``, with a wait for labels before "label" (see the module docstring).

    One round returns preference_round's result plus ``"labeling"``: who resumed it, the note, groups
    labeled/total. More rounds open a parent MLflow run, each round a child run under it (``round_run_tags``)
    whose metrics also go on the parent's ``rounds/<metric>`` curves; before round r > 1 ``start_next_round``
    keeps round r-1's label log and makes its trained LoRA the policy. They return ``{"run_id": the parent,
    "children": {round: run id}, "rounds": [each round's result, with "labeling" and "next"]}``."""
    root = Path(repo).resolve() if repo else REPO_ROOT
    params = load_params(Paths(root).params)  # fail fast, naming the key
    todo = check_wait(stages, timeout_seconds, poll_seconds)
    check_rounds(rounds, todo, params)
    hp = params.label.human
    if params.label.source != "human":
        _logger().warning(f"label.source is {params.label.source!r}: the label stage will not read people's labels "
                          "(set label.source: human)")

    def one_round(name: str | None, run_tags: dict[str, str] | None = None) -> dict:
        labeling: dict[str, Any] = {}

        def before_stage(stage: str, repo_s: str, run_id: str) -> None:
            if stage == "label":
                labeling.update(wait_for_labels(Path(repo_s), run_id, hp, timeout_seconds=timeout_seconds,
                                                poll_seconds=poll_seconds, serve_labels=serve_labels))

        result = run_round(str(root), todo, name, run_name_prefix=FLOW_NAME, before_stage=before_stage,
                           run_tags=run_tags)
        result["labeling"] = labeling
        return result

    if rounds == 1:
        return one_round(run_name)

    from prefdiff.tracking import round_run_tags

    if run_name is None:
        _, flow_run_name = _flow_run_info()
        run_name = f"{FLOW_NAME}-{flow_run_name}" if flow_run_name else FLOW_NAME
    parent = open_parent_run(str(root), params.register.experiment, run_name,
                             {"prefdiff.round_kind": "human", "prefdiff.rounds": str(rounds)})
    done: list[dict] = []
    try:
        for r in range(1, rounds + 1):
            _logger().info(f"human round {r}/{rounds} (MLflow parent run {parent})")
            nxt = start_next_round(str(root), r, str(label_log_path(root, hp))) if r > 1 else None
            result = one_round(f"{run_name}-round-{r:03d}", round_run_tags(parent, r))
            result["next"] = nxt
            log_round_curve(str(root), parent, r, result["run_id"])
            done.append(result)
    except BaseException as err:
        _mark_failed(str(root), parent, None, err, [])
        raise
    return {"run_id": parent, "children": {r: res["run_id"] for r, res in enumerate(done, 1)}, "rounds": done}


# --------------------------------------------------------------------------------------------------
# CLI: start a round; resume one
# --------------------------------------------------------------------------------------------------


def _label_log_of(parameters: dict[str, Any]) -> str:
    """The label log of the run's workspace (for messages); the params key when it cannot be read."""
    try:
        root = Path(parameters.get("repo") or REPO_ROOT)
        return str(label_log_path(root, load_params(Paths(root).params).label.human))
    except Exception:  # noqa: BLE001 - only a message depends on it
        return "the label log (label.human.log)"


def resume(flow_run_id: str, note: str = "") -> tuple[int, str]:
    """Resume a paused human round with done; (exit code, one line) for every other situation: already
    resumed, timed out or stopped (labels kept), not paused yet, unknown run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    import httpx
    from prefect.settings import PREFECT_API_URL

    try:
        run_uuid = UUID(flow_run_id)
    except ValueError:
        return 2, f"error: {flow_run_id!r} is not a flow run id (a UUID, as the human round logs it)"
    api = PREFECT_API_URL.value()
    if not api:  # a temporary server of our own would not know the run
        return 2, ("error: PREFECT_API_URL is not set; set it to the API the human round logged (its line "
                   "'... PREFECT_API_URL=<url> python -m flows.human resume <id>')")
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_uuid)
            history = sorted(client.read_flow_run_states(run_uuid), key=lambda s: s.timestamp)
        except ObjectNotFound:
            return 2, (f"error: no flow run {run_uuid} on the Prefect API at {api}; is PREFECT_API_URL the one "
                       "it logged?")
        except httpx.ConnectError:
            return 2, (f"error: no Prefect API answers at {api}: the server is down, or it was the temporary server "
                       "of a human round that has ended")
    log = _label_log_of(run.parameters)
    again = "start a new human round (python -m flows.human) to go on from them"
    timed_out = (f"timed out: flow run {run_uuid} ({run.name}) was not resumed in time; the labels are kept in "
                 f"{log}; {again}")
    state = run.state
    if state is not None and state.is_paused():
        try:
            resume_flow_run(run_uuid, run_input=LabelingDone(done=True, note=note).model_dump())
        except FlowPauseTimeout:
            return 1, timed_out
        except NotPausedError:
            return 1, f"already resumed: flow run {run_uuid} ({run.name}) is no longer paused"
        except RuntimeError as err:
            return 1, f"error: flow run {run_uuid} did not accept the resume: {err}"
        return 0, f"resumed flow run {run_uuid} ({run.name}) with done: it goes on with the label stage"
    paused_at = [i for i, s in enumerate(history) if s.type == StateType.PAUSED]
    now = state.name if state is not None else "without a state"
    if not paused_at:
        return 1, (f"flow run {run_uuid} ({run.name}) has not paused for labels (it is {now}); resume it once it "
                   "is Paused")
    last_pause = history[paused_at[-1]]
    if any(s.type == StateType.RUNNING for s in history[paused_at[-1] + 1:]):
        return 1, f"already resumed: flow run {run_uuid} ({run.name}) is {now}"
    deadline = last_pause.state_details.pause_timeout
    if state is not None and deadline is not None and state.timestamp >= deadline:
        return 1, timed_out
    return 1, f"flow run {run_uuid} ({run.name}) ended {now} while waiting for labels; they are kept in {log}; {again}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["resume"]:
        p = argparse.ArgumentParser(prog="python -m flows.human resume",
                                    description="Resume a paused human round with done.")
        p.add_argument("flow_run_id", help="the id the human round logged")
        p.add_argument("--note", default="", help="a note recorded with the round (MLflow tag human.note)")
        args = p.parse_args(argv[1:])
        args.command = "resume"
        return args
    p = argparse.ArgumentParser(prog="python -m flows.human",
                                description="Run a human-in-the-loop round (`python -m flows.human resume <id>` "
                                            "resumes a paused one).")
    p.add_argument("--repo", default=None, help="the workspace (default: this checkout)")
    p.add_argument("--timeout-hours", type=float, default=DEFAULT_TIMEOUT_SECONDS / 3600,
                   help="how long to wait for labels (default 24)")
    p.add_argument("--poll-seconds", type=int, default=DEFAULT_POLL_SECONDS,
                   help=f"how often to re-count labels (default {DEFAULT_POLL_SECONDS})")
    p.add_argument("--serve-labels", action="store_true",
                   help="start the labeling server for the wait (else run `make label-server` yourself)")
    p.add_argument("--rounds", type=int, default=1,
                   help="human rounds in this run, round r sampling from round r-1's trained LoRA (default 1)")
    args = p.parse_args(argv)
    args.command = "start"
    return args


def main(argv: list[str] | None = None) -> int:
    from prefdiff.config import ParamsError

    args = parse_args(argv)
    if args.command == "resume":
        code, message = resume(args.flow_run_id, args.note)
        print(message, file=sys.stderr if code else sys.stdout)
        return code
    timeout_seconds = round(args.timeout_hours * 3600)
    try:
        root = Path(args.repo).resolve() if args.repo else REPO_ROOT
        params = load_params(Paths(root).params)  # before the ephemeral Prefect server starts (~10 s)
        check_rounds(args.rounds, check_wait(None, timeout_seconds, args.poll_seconds), params)
    except (ParamsError, ValueError) as err:
        return refused(err)
    return run_flow_cli("human_round", lambda: human_round(
        repo=args.repo, timeout_seconds=timeout_seconds, poll_seconds=args.poll_seconds,
        serve_labels=args.serve_labels, rounds=args.rounds))


if __name__ == "__main__":
    sys.exit(main())
