"""One preference round as a Prefect flow: each DVC stage is one task, all tracked in ONE MLflow run.

    sample -> label -> train -> heldout -> evaluate -> register   (dvc.yaml; each `python -m stages.<name>`)

Who owns what: DVC owns the DAG and decides whether a stage must re-run, Prefect owns running it (logs,
retries of I/O, schedules, concurrency), MLflow owns what came out.

- ``open_parent_run`` creates the round's MLflow run and ends it at once; every stage subprocess gets
  its id as ``MLFLOW_RUN_ID`` and resumes it (``prefdiff.tracking.stage_run``), so stages log into it.
- ``resolve_baseline`` runs before the evaluate stage: it writes the registry's current champion (for
  ``evaluate.baseline: champion``) into ``registry/baseline.json`` and its weights into ``models/baseline``,
  files the evaluate stage depends on, so DVC re-runs evaluate exactly when the champion moved.
- ``run_stage`` runs ``dvc repro --single-item <stage>`` and streams its output line by line into the
  Prefect log. Compute is not retried and never cached by Prefect: DVC's own skip logic is the cache.
- ``log_round`` logs what a skipped stage could not: DVC skips unchanged stages and a skipped stage
  logs nothing, so final metrics are read back from DVC's metrics files, plus lineage (git SHA,
  dvc.lock and params.yaml hashes, DVC out hashes) and the plots, grid and registry decision.

Run it with ``make run`` (Prefect's ephemeral server; PREFECT_HOME=.prefect) or ``python -m flows.round``.
mlflow is imported inside the tasks only: importing this module must stay cheap (tests, deployments).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from prefdiff.config import load_params
from prefdiff.paths import REPO_ROOT, Paths

STAGES: tuple[str, ...] = ("sample", "label", "train", "heldout", "evaluate", "register")
TAIL_LINES = 40
# Per-step training curves the train stage logs as train/<k> at every step; their values in
# metrics/train.json are final-epoch means, logged as train/final_<k> (the stage's own names) so
# they never add a stray point to a loss curve.
TRAIN_CURVE_KEYS = frozenset({"loss", "implicit_acc", "clip_frac", "mean_log_ratio", "model_mse", "ref_mse", "margin",
                              "approx_kl", "winner_weight"})
FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
STAGE_TAG_PREFIX = "prefdiff.stage."  # = prefdiff.tracking.STAGE_TAG_PREFIX (not imported: keep this cheap)

_fallback_logger = logging.getLogger("prefdiff.flows.round")


def _logger() -> Any:
    """The Prefect run logger inside a flow/task run; a plain logger when called as ``task.fn(...)``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_logger


# --------------------------------------------------------------------------------------------------
# Retries: I/O only
# --------------------------------------------------------------------------------------------------

# Deterministic OSErrors: retrying a missing file or a permission problem cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_MESSAGES = (
    "database is locked",
    "database table is locked",
    "unable to open database file",
    "disk i/o error",
    "connection refused",
    "connection reset",
    "connection aborted",
    "temporarily unavailable",
    "timed out",
    "timeout",
    "too many requests",
    "service unavailable",
    "bad gateway",
)


def is_transient_io_error(exc: BaseException | None) -> bool:
    """True for errors worth retrying: I/O (OSError incl. ConnectionError/TimeoutError, requests'
    errors), SQLite/SQLAlchemy ``OperationalError`` and MLflow errors whose message says the store was
    locked or unreachable, anywhere in the ``__cause__``/``__context__`` chain. False for programming
    and data errors (TypeError, KeyError, ValueError, ParamsError, a missing file...)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS):
            return True
        name, module = type(exc).__name__, type(exc).__module__
        message = str(exc).lower()
        if name == "OperationalError" and module.split(".")[0] in {"sqlite3", "sqlalchemy"}:
            return True
        if name == "MlflowException" and any(m in message for m in _TRANSIENT_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for Prefect (``(task, task_run, state) -> bool``): retry I/O errors only.

    Must stay a plain function: Prefect 3.8 treats any other callable as "never retry"."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - the result could not be read: do not retry blindly
            return False
    retry = isinstance(exc, BaseException) and is_transient_io_error(exc)
    _logger().info(f"{task.name}: {type(exc).__name__} is {'an I/O error: retrying' if retry else 'not retried'}")
    return retry


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def _flow_run_info() -> tuple[str | None, str | None]:
    from prefect.runtime import flow_run

    try:
        return (str(flow_run.id) if flow_run.id else None), flow_run.name
    except Exception:  # noqa: BLE001 - outside a flow run
        return None, None


@task(name="open-parent-run", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_error,
      cache_policy=NO_CACHE)
def open_parent_run(repo: str, experiment: str, run_name: str | None = None,
                    tags: dict[str, str] | None = None) -> str:
    """Create the round's MLflow run in ``experiment`` (at ``tracking_uri(repo)``), tag it with the
    Prefect flow run and ``tags`` (e.g. ``prefdiff.tracking.round_run_tags``: a round of a many-round flow),
    end it (the stages resume it through ``MLFLOW_RUN_ID``); return its id. First: a server that does not
    answer is named in one line (``TrackingUnavailable``, within seconds); runs of dead processes are closed
    and what stages logged while the server was down is re-logged (``prefdiff.tracking.recover``)."""
    import mlflow

    from prefdiff.tracking import RUN_ID_ENV, ensure_experiment, recover, require_server, tracking_uri

    log = _logger()
    stray = os.environ.pop(RUN_ID_ENV, None)
    if stray:
        # start_run() would silently resume that run instead of creating the round's own one.
        log.warning(f"ignoring {RUN_ID_ENV}={stray} from the environment: a round always opens a new run")
    require_server(Path(repo), attempts=1)  # this task's own retries try again
    exp_id = ensure_experiment(experiment, Path(repo))
    recover(Path(repo), exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    flow_run_id, flow_run_name = _flow_run_info()
    tags = {"prefdiff.repo": str(Path(repo).resolve()), **(tags or {})}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    if flow_run_name:
        tags[FLOW_RUN_NAME_TAG] = flow_run_name
    nested = mlflow.active_run() is not None  # called from inside someone's run: do not end theirs
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags, nested=nested)
    mlflow.end_run()
    log.info(f"MLflow run {run.info.run_id} ({run.info.run_name}) in experiment {experiment!r} at {tracking_uri(Path(repo))}")
    return run.info.run_id


@task(name="resolve-baseline", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_error,
      cache_policy=NO_CACHE)
def resolve_baseline(repo: str) -> dict[str, Any]:
    """``registry/baseline.json`` (+ ``models/baseline``) from the registry, for the evaluate stage to
    depend on: the base model, or the current champion of the registered model (``evaluate.baseline``)."""
    from prefdiff.registry import resolve_baseline as resolve

    params = load_params(Paths(Path(repo)).params)
    name = params.register.registered_name(params.train.method)
    ref, changed = resolve(Path(repo), params.evaluate.baseline, name)
    what = f"{ref.label} of {name}" if ref.model_name else ref.label
    _logger().info(f"baseline: {what}{f' ({ref.note})' if ref.note else ''}; registry/baseline.json "
                   f"{'changed' if changed else 'unchanged'}")
    return {"baseline": ref.label, "changed": changed}


def _dvc_executable() -> str:
    """The ``dvc`` installed next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("dvc")
    if found is None:
        raise FileNotFoundError(f"dvc not found next to {sys.executable} nor on PATH")
    return found


def stage_env(repo: str, run_id: str) -> dict[str, str]:
    """os.environ + this interpreter's bin dir first on PATH (so ``python -m stages.x`` is this venv's
    python) + the parent run id and tracking URI, so the stage logs into the round's run."""
    from prefdiff.tracking import RUN_ID_ENV, TRACKING_URI_ENV, tracking_uri

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[RUN_ID_ENV] = run_id
    env[TRACKING_URI_ENV] = tracking_uri(Path(repo))
    env["PYTHONUNBUFFERED"] = "1"  # stage output arrives line by line, not when a buffer fills
    return env


def stream_command(cmd: list[str], repo: str, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``cmd`` in ``repo``, log each non-empty output line (stdout and stderr) as it arrives;
    returns (exit code, those lines). Interrupted (cancel, Ctrl-C), the command and every process it
    started are stopped too: DVC does not pass a SIGTERM on to the stage it runs, so the command gets a
    process group of its own and the whole group is signalled."""
    log = _logger()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, errors="replace",
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                lines.append(line)
                log.info(line)
        return proc.wait(), lines
    finally:
        if proc.poll() is None:  # interrupted: do not leave the command running
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@task(name="dvc-repro", task_run_name="dvc-repro-{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, repo: str, run_id: str) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` in ``repo``, each output line logged as it arrives.

    Returns ``{"stage", "ran": bool, "seconds"}`` (``ran`` False: DVC found nothing changed and skipped
    it, or restored its outputs from the run cache). Raises RuntimeError naming the stage with the last
    lines of output on a non-zero exit. Not retried: a failed stage is compute, not I/O.
    """
    log = _logger()
    cmd = [_dvc_executable(), "repro", "--single-item", stage]
    log.info(f"$ {' '.join(cmd[1:])}  (in {repo})")
    began = time.time()
    code, lines = stream_command(cmd, repo, stage_env(repo, run_id))
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    seconds = round(time.time() - began, 1)
    if code != 0:
        tail = lines[-TAIL_LINES:]
        raise RuntimeError(
            f"stage {stage!r} failed: `dvc repro --single-item {stage}` exited with {code} after {seconds} s; "
            f"last {len(tail)} lines:\n" + "\n".join(tail)
        )
    log.info(f"stage {stage}: {'ran' if ran else 'skipped (unchanged)'} in {seconds} s")
    return {"stage": stage, "ran": ran, "seconds": seconds}


def _tag_skipped(client: Any, run_id: str, stage_results: list[dict[str, Any]] | None) -> None:
    """``prefdiff.stage.<name> = skipped`` for the stages DVC skipped (a stage that ran tagged itself)."""
    for result in stage_results or []:
        if not result.get("ran"):
            client.set_tag(run_id, STAGE_TAG_PREFIX + result["stage"], "skipped")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def file_metrics(paths: Paths) -> dict[str, float]:
    """Final metrics from DVC's metrics files, as MLflow metric names: ``train/<k>`` (``train/final_<k>``
    for the per-step curve keys) from metrics/train.json, ``eval/<k>`` from metrics/eval.json, and
    ``register/version`` / ``register/champion`` from registry/decision.json. Numeric values only."""
    out: dict[str, float] = {}
    for key, value in _numeric(_read_json(paths.train_metrics)).items():
        out[f"train/final_{key}" if key in TRAIN_CURVE_KEYS else f"train/{key}"] = value
    from evaluation.evaluate import flat_metrics

    out |= flat_metrics(_read_json(paths.eval_metrics), "eval/")  # the names the evaluate stage logs
    decision = _read_json(paths.decision)
    if "version" in decision:
        out["register/version"] = float(decision["version"])
        out["register/champion"] = float(decision.get("alias") == "champion")
    return out


@task(name="log-round", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_error,
      cache_policy=NO_CACHE)
def log_round(repo: str, run_id: str, stage_results: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Log the round's outcome into the parent run, from files, whatever DVC skipped.

    Lineage tags + dvc.lock/params.yaml (``prefdiff.tracking.log_lineage``); the metrics of
    ``file_metrics`` that the run does not hold yet (a stage that ran logged its own; a skipped one
    logged nothing); plots/*.csv under ``plots/``, eval/grid.png under ``eval/``,
    registry/decision.json under ``registry/``; tag ``prefdiff.stage.<name> = skipped`` for skipped
    stages. Returns ``{"run_id", "eval", "decision"}``.
    """
    import mlflow
    from mlflow.entities import Metric

    from prefdiff.tracking import log_lineage, tracking_uri

    log = _logger()
    root = Path(repo)
    paths = Paths(root)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)

    lineage = log_lineage(root, run_id=run_id)
    have = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    missing = {k: v for k, v in file_metrics(paths).items() if k not in have}
    if missing:
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(missing.items())])

    artifacts: list[tuple[Path, str]] = [(p, "plots") for p in sorted((root / "plots").glob("*.csv"))]
    artifacts += [(paths.eval_dir / "grid.png", "eval"), (paths.decision, "registry")]
    logged = []
    for path, artifact_dir in artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=artifact_dir)
            logged.append(f"{artifact_dir}/{path.name}")

    _tag_skipped(client, run_id, stage_results)
    decision = _read_json(paths.decision)
    for key in ("model_name", "version", "alias"):
        if key in decision:
            client.set_tag(run_id, f"registry.{key}", str(decision[key]))
    log.info(f"logged into run {run_id}: {len(lineage)} lineage tags, {len(missing)} metrics from files "
             f"(the rest the stages logged), artifacts {', '.join(logged) or 'none'}")
    return {"run_id": run_id, "eval": _read_json(paths.eval_metrics), "decision": decision}


PUSH_ATTEMPTS, PUSH_DELAY_S = 3, 2.0


@task(name="dvc-push", cache_policy=NO_CACHE)
def push_data(repo: str, run_id: str) -> dict[str, Any]:
    """``dvc push`` of the round's cached outputs (trajectories, preferences, weights, ...) to the workspace's
    default DVC remote, so a fresh clone that pulls runs ``dvc repro`` as a no-op. No default remote: nothing
    to do. A push that fails is tried ``PUSH_ATTEMPTS`` times (``PUSH_DELAY_S``, doubling: a remote on a network
    share or S3 may be briefly away), then a warning, not a failed round: every output is complete in the
    local cache, and ``dvc push`` later sends it. Returns ``{"remote", "pushed", "detail"}``."""
    log = _logger()
    env = stage_env(repo, run_id)
    query = subprocess.run([_dvc_executable(), "remote", "default"], cwd=repo, env=env, capture_output=True, text=True)
    remote = query.stdout.strip() if query.returncode == 0 else None
    if not remote:
        return {"remote": None, "pushed": False, "detail": "no default DVC remote (dvc remote add -d NAME URL)"}
    delay = PUSH_DELAY_S
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        code, lines = stream_command([_dvc_executable(), "push"], repo, env)
        if code == 0:
            return {"remote": remote, "pushed": True, "detail": (lines or ["pushed"])[-1]}
        if attempt < PUSH_ATTEMPTS:
            log.info(f"dvc push to remote {remote!r} failed (exit {code}); retry {attempt}/{PUSH_ATTEMPTS - 1} in "
                     f"{delay:g} s")
            time.sleep(delay)
            delay *= 2
    detail = " ".join((lines or [f"exit {code}"])[-1].split())
    log.warning(f"dvc push to remote {remote!r} failed {PUSH_ATTEMPTS} times ({detail}); the round's outputs are "
                f"complete in the local DVC cache: run `dvc push` when the remote is reachable")
    return {"remote": remote, "pushed": False, "detail": detail}


# --------------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------------


def check_stages(stages: list[str] | None) -> list[str]:
    """Stage names to run, in pipeline order; unknown, repeated or out-of-order names are refused."""
    if stages is None:
        return list(STAGES)
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline's stages are {list(STAGES)}")
    if len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
        raise ValueError(f"stages {stages} must be distinct and in pipeline order {list(STAGES)}")
    if not stages:
        raise ValueError("no stages to run")
    return stages


def ui_hint(uri: str) -> str:
    """How to open the MLflow UI on ``uri``."""
    from prefdiff.tracking import default_tracking_uri

    if uri == default_tracking_uri(REPO_ROOT):
        return "make mlflow-ui   (then open http://127.0.0.1:5000)"
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def summarize(result: dict[str, Any], uri: str, experiment: str) -> str:
    """A few human lines: win-rate with its prompt-clustered bootstrap interval (Wilson beside it),
    trained vs baseline reward, the registry decision and its reason, the UI hint."""
    ev, dec = result.get("eval") or {}, result.get("decision") or {}
    lines = [f"Round done: MLflow run {result.get('run_id')} (experiment {experiment!r})"]
    stages = result.get("stages")
    if stages:
        lines.append("  stages      : " + ", ".join(f"{s} {'ran' if r else 'skipped'}" for s, r in stages.items()))
    if {"win_rate", "win_rate_low", "win_rate_high"} <= ev.keys():
        wilson = (f"; Wilson {ev['win_rate_wilson_low']:.3f} - {ev['win_rate_wilson_high']:.3f}"
                  if {"win_rate_wilson_low", "win_rate_wilson_high"} <= ev.keys() else "")
        lines.append(f"  win-rate    : {ev['win_rate']:.3f}  (95% prompt-clustered bootstrap "
                     f"{ev['win_rate_low']:.3f} - {ev['win_rate_high']:.3f} over {ev.get('num_prompts')} prompts"
                     f"{wilson}; W {ev.get('wins')} / "
                     f"L {ev.get('losses')} / T {ev.get('ties')} over {ev.get('num_samples')} paired samples)")
    if {"trained_mean_reward", "base_mean_reward"} <= ev.keys():
        lines.append(f"  reward      : trained {ev['trained_mean_reward']:.4f} vs {ev.get('baseline', 'base')} "
                     f"{ev['base_mean_reward']:.4f} ({ev.get('judge', 'judge')}; gain "
                     f"{ev['trained_mean_reward'] - ev['base_mean_reward']:+.4f})")
    push = result.get("push")
    if push and push.get("remote"):
        lines.append(f"  DVC remote  : {'pushed to' if push['pushed'] else 'NOT pushed to'} {push['remote']!r}"
                     + ("" if push["pushed"] else f" ({push['detail']}; run `dvc push` when it is reachable)"))
    if dec:
        how = "already registered, kept" if dec.get("reused") else "registered"
        lines.append(f"  registry    : {dec.get('model_name')} v{dec.get('version')} -> {dec.get('alias')} ({how}): "
                     f"{dec.get('reason')}")
    lines.append(f"  MLflow UI   : {ui_hint(uri)}")
    return "\n".join(lines)


def _mark_failed(repo: str, run_id: str, stage: str | None, err: BaseException,
                 stage_results: list[dict[str, Any]]) -> None:
    """Best effort: the parent run ends FAILED and names the stage (never masks the real error)."""
    try:
        import mlflow

        from prefdiff.tracking import tracking_uri

        client = mlflow.MlflowClient(tracking_uri=tracking_uri(Path(repo)))
        _tag_skipped(client, run_id, stage_results)
        if stage:
            client.set_tag(run_id, "prefdiff.failed_stage", stage)
            # the stage process tags itself "failed" only if it got as far as opening the run
            client.set_tag(run_id, STAGE_TAG_PREFIX + stage, "failed")
        client.set_tag(run_id, "prefdiff.error", f"{type(err).__name__}: {err}"[:4000])
        client.set_terminated(run_id, status="FAILED")
    except Exception as exc:  # noqa: BLE001
        _logger().warning(f"could not mark MLflow run {run_id} as failed: {exc}")


# Called before a stage runs, inside the flow run, with (stage, repo, MLflow parent run id); the human round
# waits there for people's labels before "label". What it raises fails the round without blaming a stage.
BeforeStage = Callable[[str, str, str], None]


def run_round(repo: str | None, stages: list[str] | None, run_name: str | None, *, run_name_prefix: str = "round",
              before_stage: BeforeStage | None = None, run_tags: dict[str, str] | None = None,
              push: bool = True) -> dict:
    """The body of a round flow (call it inside a flow run): validate params, open the MLflow parent run,
    run the DVC stages ``stages`` (default all six) in ``repo`` (default this repo) as tasks, the baseline
    resolved before evaluate and ``before_stage`` called before each stage; then log metrics, lineage and
    artifacts from files, ``dvc push`` to the default DVC remote when there is one and ``push`` (``push_data``), and
    print the summary. ``run_tags`` go on the round's MLflow run (``open_parent_run``).
    Any error ends the MLflow run FAILED (naming the stage when one failed) and is re-raised.
    Returns ``{"run_id", "eval", "decision", "stages": {name: ran?}, "push": push_data's result}``."""
    root = Path(repo).resolve() if repo else REPO_ROOT
    repo_s = str(root)
    params = load_params(Paths(root).params)  # fail fast, naming the key, before anything heavy
    todo = check_stages(stages)
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root} has no dvc.yaml: not a prefdiff workspace")

    if run_name is None:
        _, flow_run_name = _flow_run_info()
        run_name = f"{run_name_prefix}-{flow_run_name}" if flow_run_name else None
    run_id = open_parent_run(repo_s, params.register.experiment, run_name, run_tags)

    results: list[dict[str, Any]] = []
    current: str | None = None
    try:
        for stage in todo:
            if before_stage is not None:
                before_stage(stage, repo_s, run_id)
            current = stage
            if stage == "evaluate":
                resolve_baseline(repo_s)
            results.append(run_stage(stage, repo_s, run_id))
            current = None
        result = log_round(repo_s, run_id, results)
    except BaseException as err:
        _mark_failed(repo_s, run_id, current, err, results)
        raise
    result["stages"] = {r["stage"]: r["ran"] for r in results}
    if push:
        result["push"] = push_data(repo_s, run_id)

    from prefdiff.tracking import tracking_uri

    print(summarize(result, tracking_uri(root), params.register.experiment))
    return result


@flow(name="preference-round", log_prints=True,
      description="One round: sample -> label -> train -> heldout -> evaluate -> register (DVC stages), "
                  "tracked in MLflow.")
def preference_round(repo: str | None = None, stages: list[str] | None = None, run_name: str | None = None,
                     push: bool = True) -> dict:
    """Run the pipeline's DVC stages (default: all six, in order) in ``repo`` (default: this repo),
    each as a task, all logging into one new MLflow run (the baseline resolved before evaluate); then log
    the final metrics, lineage and artifacts from files, and push the outputs to the default DVC remote if one
    is configured and ``push``.
    Returns ``{"run_id", "eval", "decision", "stages": {name: ran?}, "push": {"remote", "pushed", "detail"}}``."""
    return run_round(repo, stages, run_name, push=push)


def parse_args(argv: list[str] | None = None, prog: str = "python -m flows.round") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Run one preference round: " + " -> ".join(STAGES)
                                + " (DVC stages as Prefect tasks, tracked in one MLflow run).")
    p.add_argument("--repo", default=None, help="the DVC workspace (default: this checkout)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=None, metavar="STAGE",
                   help=f"run only these stages, in pipeline order (default: all of {', '.join(STAGES)})")
    p.add_argument("--run-name", default=None, help="the MLflow run's name (default: round-<flow run name>)")
    p.add_argument("--no-push", action="store_true",
                   help="do not `dvc push` the round's outputs to the default DVC remote (pushed when one is set)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m flows.round") -> int:
    from prefdiff.config import ParamsError

    args = parse_args(argv, prog)
    try:
        check_stages(args.stages)
        load_params(Paths(Path(args.repo).resolve() if args.repo else REPO_ROOT).params)  # before Prefect starts
    except (ParamsError, ValueError) as err:
        return refused(err)
    return run_flow_cli("d3po_round", lambda: preference_round(repo=args.repo, stages=args.stages,
                                                               run_name=args.run_name, push=not args.no_push))


def refused(err: Exception) -> int:
    """A flow CLI's bad input: one ``error:`` line per problem (``ParamsError.problems``), exit status 2."""
    for problem in getattr(err, "problems", None) or [" ".join(str(err).split())]:
        print(f"error: {problem}", file=sys.stderr)
    return 2


PREFECT_PROBE_TIMEOUT_S = 5.0  # a Prefect API that has not answered /health by then counts as down


def _why_no_answer(err: BaseException) -> str:
    """A few words for an httpx error talking to the Prefect API."""
    import httpx

    text = str(err)
    if isinstance(err, httpx.TimeoutException):  # the probe's own timeout, or the client's mid-run
        return "timed out"
    if isinstance(err, httpx.ConnectError):
        return "connection refused" if "refused" in text.lower() else f"cannot connect: {text}"
    return f"{type(err).__name__}: {text}"


def prefect_api_problem(attempts: int = 3, delay_s: float = 2.0) -> str | None:
    """None when flows can start: ``PREFECT_API_URL`` unset (each run starts a temporary local server) or
    its ``/health`` answers within ``PREFECT_PROBE_TIMEOUT_S``, tried ``attempts`` times (``delay_s``,
    doubling); else one line naming the URL and the fix. Without this, Prefect's client retries an API that
    is down for minutes before its own traceback."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    reason = ""
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.get(f"{url.rstrip('/')}/health", timeout=PREFECT_PROBE_TIMEOUT_S)
            if response.status_code == 200:
                return None
            reason = f"HTTP {response.status_code} from /health"
        except httpx.HTTPError as err:
            reason = _why_no_answer(err)
        if attempt < attempts:
            print(f"Prefect API at {url} unreachable ({reason}); retry {attempt}/{attempts - 1} in {delay_s:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay_s)
            delay_s *= 2
    return (f"Prefect API at {url} (PREFECT_API_URL) is unreachable ({reason}); tried {attempts} times; nothing "
            f"was started: start it (`prefect server start`) or unset PREFECT_API_URL to run on a temporary local "
            f"server, then run the same command again")


def lost_prefect_api(err: BaseException) -> str | None:
    """One line when ``err`` (or its cause chain) is the Prefect API not answering mid-run, else None. Prefect 3
    sends task states as events, which it drops while the API is away, so the stages go on; the flow's own final
    state is a request, which its client retries (about a minute per try), then raises."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    seen: set[int] = set()
    while url and err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, httpx.TransportError):  # connect, read, timeout; httpx is Prefect's (MLflow: requests)
            return (f"the Prefect API at {url} (PREFECT_API_URL) stopped answering during the run "
                    f"({_why_no_answer(err)}); the stages that finished are committed in dvc.lock and logged in "
                    "MLflow: when the API is back, run the same command (DVC skips those stages)")
        err = err.__cause__ or err.__context__
    return None


def run_flow_cli(name: str, run: Callable[[], object]) -> int:
    """A flow started from its CLI: 0; 1 and one line naming the failure (Prefect has logged the traceback); or,
    before anything starts, 1 and one line when the Prefect API the flow would report to is down."""
    problem = prefect_api_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        run()
    except Exception as err:  # noqa: BLE001 - Prefect has logged the traceback already
        lost = lost_prefect_api(err)
        if lost is not None:
            print(f"\nerror: {name}: {lost}", file=sys.stderr)
            return 1
        print(f"\n{name} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
