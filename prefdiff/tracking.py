"""MLflow conventions of the pipeline: where runs live, how stages share one run, lineage tags.

One Prefect flow run = one MLflow run. The flow creates the run and hands its id to every DVC stage
subprocess through ``MLFLOW_RUN_ID``; ``stage_run`` resumes it there, so every stage logs into the same
run. Run outside the flow (``dvc repro`` by hand), a stage opens its own run named after the stage.

The default tracking URI is an *absolute* SQLite file in the repo root: MLflow's own default is
relative to the current directory, which would give every DVC stage, Prefect worker and notebook its
own ``mlflow.db``.

A tracking *server* may be down or slow. prefdiff's own calls then use short HTTP timeouts and few
retries (``HTTP_DEFAULTS``, unless the user set those variables), a stage probes the server first and,
if it does not answer, runs anyway: it logs into a local pending store (``PENDING_DIR``, one line says
so and names the URI), and the next stage run or round that reaches the server re-logs it there
(``relog_pending``). Runs left RUNNING by a process that died (kill -9) are marked KILLED by the next
start on the same host (``close_dead_runs``).

mlflow is imported inside the functions: importing it costs ~3.5 s and flows import this module.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefdiff.data.atomic import sha256_file

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
RUN_ID_ENV = "MLFLOW_RUN_ID"
DEFAULT_EXPERIMENT = "prefdiff"
STAGE_TAG_PREFIX = "prefdiff.stage."
LINEAGE_ARTIFACT_DIR = "lineage"
ABSENT = "absent"  # value of a *_sha256 lineage entry when the file does not exist

# MLflow's defaults (120 s timeout, 7 retries with backoff factor 2) make one call to a dead server hang
# for ~250 s; a pipeline stage should know within seconds. Set only where the user has not set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PROBE_TIMEOUT_S = 5.0
PENDING_DIR = "mlflow-pending"  # under the repo root: what stages logged while the server was unreachable
TAG_PID = "prefdiff.pid"  # the process that holds a run open, and its host (close_dead_runs)
TAG_HOST = "prefdiff.host"
TAG_CLOSED = "prefdiff.closed"
TAG_TARGET_RUN = "prefdiff.pending.target_run"  # on a pending run: the server run it belongs to ("" = new)
TAG_TARGET_EXPERIMENT = "prefdiff.pending.experiment"
TAG_RELOGGED = "prefdiff.pending.relogged_to"

# MLflow tag keys may only hold alphanumerics, "_", "-", ".", " ", ":" and "/" (and at most 250 chars)
_TAG_KEY_BAD = re.compile(r"[^\w.\- :/]")
_MAX_TAG_KEY = 250


def _root_of(root: Any) -> Path:
    """Accept a repo root (``Path``/``str``) or a ``prefdiff.paths.Paths`` (which has ``.root``).

    Checked by type: ``pathlib.Path`` itself has a ``.root`` attribute ("/")."""
    if not isinstance(root, (str, os.PathLike)):
        root = root.root
    return Path(root).resolve()


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{_root_of(root) / 'mlflow.db'}"


def tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (non-empty), else ``sqlite:///<abs root>/mlflow.db``."""
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    return env or default_tracking_uri(root)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server did not answer; the message names its URI."""


def use_http_defaults() -> None:
    """Short timeouts and few retries for prefdiff's MLflow HTTP calls (``HTTP_DEFAULTS``), unless set."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def connect(root: Path) -> str:
    """Point MLflow at ``tracking_uri(root)`` with prefdiff's HTTP defaults; returns the URI."""
    import mlflow

    use_http_defaults()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    return uri


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the tracking store at ``uri`` answers (a local store always does), else why not, in a few words."""
    if not _is_server_uri(uri) or not uri.lower().startswith(("http://", "https://")):
        return None
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as e:
        return short_reason(e)
    return None if response.ok else f"HTTP {response.status_code} from /health"


def require_server(root: Path, attempts: int = 3, delay_s: float = 2.0) -> str:
    """The tracking URI, once its server answers; tried ``attempts`` times (``delay_s``, doubling), then
    ``TrackingUnavailable`` naming the URI."""
    import time

    uri = connect(root)
    for attempt in range(1, attempts + 1):
        reason = probe(uri)
        if reason is None:
            return uri
        if attempt < attempts:
            print(f"MLflow at {uri} unreachable ({reason}); retry {attempt}/{attempts - 1} in {delay_s:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay_s)
            delay_s *= 2
    raise TrackingUnavailable(f"MLflow at {uri} is unreachable ({reason}); tried {attempts} times")


_UNREACHABLE = ("max retries exceeded", "connection refused", "connection reset", "connection aborted",
                "failed to establish a new connection", "read timed out", "connect timeout", "timed out",
                "remote end closed connection", "name or service not known")


def is_unreachable(exc: BaseException | None) -> bool:
    """True if ``exc`` (or its cause chain) says the tracking server could not be reached or did not answer."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError, TrackingUnavailable)):
            return True
        if type(exc).__module__.split(".")[0] in {"requests", "urllib3"} and any(
                word in type(exc).__name__ for word in ("Connection", "Timeout", "MaxRetry", "Protocol")):
            return True
        if any(m in str(exc).lower() for m in _UNREACHABLE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def short_reason(exc: BaseException) -> str:
    """A few words of why a server call failed (not requests' 300-character repr)."""
    text = str(exc)
    for marker in ("Connection refused", "Read timed out", "timed out", "Name or service not known",
                   "Connection reset", "Remote end closed connection"):
        if marker.lower() in text.lower():
            return marker.lower()
    return f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"


def artifact_root(root: Path) -> Path:
    return _root_of(root) / "mlartifacts"


def _is_server_uri(uri: str) -> bool:
    # An HTTP tracking server owns artifact storage (--artifacts-destination); a local store does not,
    # and left alone MLflow would put artifacts in ./mlruns of whatever the current directory is.
    return uri.split(":", 1)[0].lower() in {"http", "https", "databricks", "databricks-uc", "uc"}


def ensure_experiment(name: str, root: Path) -> str:
    """Set the tracking URI, create experiment ``name`` if missing, make it active; return its id.

    A new experiment gets ``artifact_location = <root>/mlartifacts`` (as a file URI) whenever the
    tracking store is local (SQLite by default, or a local DB/file URI from the environment), so
    artifacts never land in a CWD-relative ``./mlruns``. With an HTTP server the server decides.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = connect(root)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if not _is_server_uri(uri):
            art = artifact_root(root)
            art.mkdir(parents=True, exist_ok=True)
            location = art.as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another stage process created it between our lookup and create: use theirs.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} (id {exp.experiment_id}) at {uri} is deleted; "
                "restore it (`mlflow experiments restore`) or pick another register.experiment"
            )
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def stage_run(stage: str, root: Path, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[Any]:
    """Run the body of DVC stage ``stage`` inside an MLflow run; yields the active ``mlflow.ActiveRun``.

    - ``$MLFLOW_RUN_ID`` set: resume that run (the Prefect flow's run). Ending it on exit is fine: the
      next stage (or the flow) re-opens it with ``start_run(run_id=...)``.
    - else: start a new run named ``stage`` in ``experiment``.
    - a run already active in this process (a stage called in-process by the flow) is reused and
      left open: it belongs to the caller, who ends it.
    - the tracking server does not answer: one line says so, and the body logs into the local pending
      store instead (``pending_stage_run``), re-logged by the next start that reaches the server.
    On exit the run gets tag ``prefdiff.stage.<stage>`` = ``done`` (``failed`` if the body raised;
    the run is then ended with status FAILED unless it belongs to the caller). Before starting, runs of
    dead processes are closed and pending runs re-logged (``recover``).
    """
    import mlflow

    uri = connect(root)
    tag = STAGE_TAG_PREFIX + stage
    wanted = os.environ.get(RUN_ID_ENV, "").strip() or None
    active = mlflow.active_run()
    reason = None if active is not None else probe(uri)
    if reason is not None:
        print(f"warning: MLflow at {uri} is unreachable ({reason}); stage {stage} runs without it and keeps what "
              f"it logs in {pending_dir(root)} (the next stage or round that reaches the server logs it there)",
              file=sys.stderr, flush=True)
        with pending_stage_run(stage, root, experiment, target_run=wanted, server_uri=uri) as run:
            yield run
        return
    # start_run(run_id=...) refuses a run whose experiment is not the active one, so a resumed run's own
    # experiment is activated (normally ``experiment`` anyway: the flow created the run there).
    exp_id = (ensure_experiment(experiment, root) if wanted is None
              else mlflow.MlflowClient().get_run(wanted).info.experiment_id)
    if active is None:
        recover(root, exp_id, keep_run=wanted)
    mlflow.set_experiment(experiment_id=exp_id)
    owned = True
    if active is not None and (wanted is None or active.info.run_id == wanted):
        run, owned = active, False
    elif active is not None:
        # The env names another run than the one open here: log into the named one, nested, so the
        # caller's run stays active when we are done.
        run = mlflow.start_run(run_id=wanted, nested=True)
    elif wanted is not None:
        run = mlflow.start_run(run_id=wanted)
    else:
        run = mlflow.start_run(run_name=stage)
    run_id = run.info.run_id
    client = mlflow.MlflowClient()
    client.set_tag(run_id, tag, "running")
    if owned:
        mark_holder(client, run_id)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        client.set_tag(run_id, tag, "done" if status == "FINISHED" else "failed")
        if owned:
            mlflow.end_run(status=status)
            # end_run() unsets $MLFLOW_RUN_ID; put it back so a later stage_run in this process
            # resumes the same parent run instead of starting a stray one.
            if wanted is not None:
                os.environ[RUN_ID_ENV] = wanted


# --------------------------------------------------------------------------------------------------
# Runs of dead processes; what was logged while the server was down
# --------------------------------------------------------------------------------------------------


def mark_holder(client: Any, run_id: str) -> None:
    """Tag ``run_id`` with this process and host: while it is open, ``close_dead_runs`` can tell if its holder died."""
    client.set_tag(run_id, TAG_PID, str(os.getpid()))
    client.set_tag(run_id, TAG_HOST, socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def close_dead_runs(client: Any, experiment_ids: list[str], keep_run: str | None = None) -> list[str]:
    """Mark KILLED every RUNNING run of ``experiment_ids`` whose holder (``mark_holder``) is a process of this
    host that no longer exists (a stage or round killed with -9 never ends its run); returns their ids.
    Runs held on other hosts, by live processes, or by no recorded process are left alone."""
    host = socket.gethostname()
    runs = client.search_runs(experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = "
                              f"'{host}'", max_results=1000)
    closed = []
    for run in runs:
        pid = run.data.tags.get(TAG_PID, "")
        if run.info.run_id == keep_run or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, TAG_CLOSED, f"process {pid} on {host} died while the run was open; "
                                                    "marked KILLED by the next start")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def pending_dir(root: Path) -> Path:
    return _root_of(root) / PENDING_DIR


def _pending_uri(root: Path) -> str:
    return f"sqlite:///{pending_dir(root) / 'mlflow.db'}"


@contextmanager
def pending_stage_run(stage: str, root: Path, experiment: str, target_run: str | None,
                      server_uri: str) -> Iterator[Any]:
    """The stage's run in the local pending store (``PENDING_DIR``) while the server at ``server_uri`` is down.
    The body's fluent MLflow calls (and ``tracking_uri``) go there; ``$MLFLOW_RUN_ID`` is hidden meanwhile
    (it names a server run). Tagged with the server run it belongs to (``target_run``; none: a new one)."""
    import mlflow

    pending = pending_dir(root)
    (pending / "artifacts").mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in (TRACKING_URI_ENV, RUN_ID_ENV)}
    os.environ[TRACKING_URI_ENV] = _pending_uri(root)
    os.environ.pop(RUN_ID_ENV, None)
    try:
        mlflow.set_tracking_uri(_pending_uri(root))
        # MLflow announces a new SQLite store's tables on stderr: the stage has said its one line already
        store_log = logging.getLogger("mlflow.store.db.utils")
        level = store_log.level
        store_log.setLevel(logging.WARNING)
        try:
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name(experiment)
        finally:
            store_log.setLevel(level)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            experiment, artifact_location=(pending / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=exp_id)
        run = mlflow.start_run(run_name=stage, tags={TAG_TARGET_RUN: target_run or "",
                                                     TAG_TARGET_EXPERIMENT: experiment})
        mark_holder(client, run.info.run_id)
        client.set_tag(run.info.run_id, STAGE_TAG_PREFIX + stage, "running")
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            client.set_tag(run.info.run_id, STAGE_TAG_PREFIX + stage, "done" if status == "FINISHED" else "failed")
            mlflow.end_run(status=status)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mlflow.set_tracking_uri(server_uri)


_BATCH = 100  # MLflow's per-request limit on params and tags (metrics: 1000)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def relog_pending(root: Path) -> list[str]:
    """Log what stages kept in the pending store while the server was down into the tracking server now at
    ``tracking_uri(root)``: each finished pending run's params (those the target lacks), metric histories,
    tags and artifacts, into the server run it names (else a new run in its experiment); then the store is
    removed. Pending runs still open by a live process wait for the next call. Returns the server run ids."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    pending = pending_dir(root)
    if not (pending / "mlflow.db").is_file():
        return []
    server_uri = tracking_uri(root)
    local = mlflow.MlflowClient(tracking_uri=_pending_uri(root))
    server = mlflow.MlflowClient(tracking_uri=server_uri)
    experiments = [e.experiment_id for e in local.search_experiments()]
    runs = sorted(local.search_runs(experiments, max_results=10_000), key=lambda r: r.info.start_time or 0)
    mapping: dict[str, str] = {}
    done, waiting = [], 0
    for run in runs:
        tags = run.data.tags
        if tags.get(TAG_RELOGGED):
            mapping[run.info.run_id] = tags[TAG_RELOGGED]
            continue
        pid = tags.get(TAG_PID, "")
        if run.info.status == "RUNNING" and pid.isdigit() and _alive(int(pid)):
            waiting += 1
            continue
        target = tags.get(TAG_TARGET_RUN) or None
        if target is not None and not _run_exists(server, target):
            target = None  # its round's run is not on this server (another URI now): keep the data in a new run
        user_tags = {k: v for k, v in tags.items() if not k.startswith(("prefdiff.pending.", "mlflow."))
                     and k not in (TAG_PID, TAG_HOST)}
        parent = tags.get("mlflow.parentRunId")
        if parent:
            user_tags["mlflow.parentRunId"] = mapping.get(parent, parent)
        created = target is None
        if created:
            exp = server.get_experiment_by_name(tags.get(TAG_TARGET_EXPERIMENT, DEFAULT_EXPERIMENT))
            exp_id = exp.experiment_id if exp else ensure_experiment(tags.get(TAG_TARGET_EXPERIMENT,
                                                                              DEFAULT_EXPERIMENT), root)
            target = server.create_run(exp_id, run_name=run.info.run_name).info.run_id
        have = server.get_run(target).data.params
        params = [Param(k, v) for k, v in sorted(run.data.params.items()) if k not in have]
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in sorted(run.data.metrics)
                   for m in local.get_metric_history(run.info.run_id, key)]
        run_tags = [RunTag(k, v) for k, v in sorted(user_tags.items())]
        for batch in _chunks(params, _BATCH):
            server.log_batch(target, params=batch)
        for batch in _chunks(run_tags, _BATCH):
            server.log_batch(target, tags=batch)
        for batch in _chunks(metrics, 1000):
            server.log_batch(target, metrics=batch)
        with tempfile.TemporaryDirectory(prefix="prefdiff-relog-") as tmp:
            if local.list_artifacts(run.info.run_id):
                server.log_artifacts(target, local.download_artifacts(run.info.run_id, "", tmp))
        if created:
            server.set_terminated(target, status="KILLED" if run.info.status == "RUNNING" else run.info.status)
        local.set_tag(run.info.run_id, TAG_RELOGGED, target)
        mapping[run.info.run_id] = target
        done.append(target)
    if not waiting:
        shutil.rmtree(pending, ignore_errors=True)
    return done


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as e:
        if is_unreachable(e):
            raise
        return False
    return True


def recover(root: Path, experiment_id: str, keep_run: str | None = None) -> None:
    """Before a stage or round starts (tracking URI set, server reachable): close the runs of dead
    processes in ``experiment_id`` (``close_dead_runs``) and re-log the pending store (``relog_pending``);
    one line for each that did something. May change the active experiment: set it afterwards."""
    import mlflow

    closed = close_dead_runs(mlflow.MlflowClient(), [experiment_id], keep_run=keep_run)
    if closed:
        print(f"MLflow: marked {len(closed)} run(s) of dead processes KILLED: {', '.join(closed)}", flush=True)
    try:
        relogged = relog_pending(root)
    except Exception as e:  # noqa: BLE001 - the stage must not fail for it; the store stays for the next try
        print(f"warning: could not re-log {pending_dir(root)} into {tracking_uri(root)} ({short_reason(e)}); "
              "it is kept for the next start", file=sys.stderr, flush=True)
        return
    if relogged:
        print(f"MLflow: logged {len(relogged)} run(s) kept in {pending_dir(root)} while the server was unreachable "
              f"into {tracking_uri(root)}: {', '.join(dict.fromkeys(relogged))}", flush=True)


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_sha(root: Path) -> str:
    """``git rev-parse HEAD`` of ``root``; ``-dirty`` appended when tracked files have uncommitted
    changes (untracked files are ignored); ``unknown`` outside git or without a commit."""
    root = _root_of(root)
    head = _git(root, "rev-parse", "HEAD")
    if head is None or not head.strip():
        return "unknown"
    sha = head.strip()
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if status is not None and status.strip():
        sha += "-dirty"
    return sha


def _sha256_or_absent(path: Path) -> str:
    return sha256_file(path) if path.is_file() else ABSENT


def dvc_lock_hashes(root: Path) -> dict[str, str]:
    """Out hashes recorded in ``dvc.lock``: ``{"<stage>.<out path>": md5}``; ``{}`` without dvc.lock.

    ``dvc.lock`` (schema 2.0) is ``stages: {<name>: {outs: [{path, hash: md5, md5, size, ...}]}}``;
    directory outs have an md5 ending in ``.dir``. Outs without an md5 (cloud etags) are skipped.
    """
    import yaml

    lock = _root_of(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{lock}: not valid YAML ({e})") from e
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        return {}
    hashes: dict[str, str] = {}
    for stage_name, stage in stages.items():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("path") and out.get("md5"):
                hashes[f"{stage_name}.{out['path']}"] = str(out["md5"])
    return hashes


def _tag_key(key: str) -> str:
    # foreach stages are named "stage@key", which MLflow rejects in tag keys
    return _TAG_KEY_BAD.sub("_", key)[:_MAX_TAG_KEY]


def lineage(root: Path) -> dict[str, str]:
    """What produced the current workspace: git SHA, sha256 of dvc.lock and params.yaml, and every
    DVC out hash as ``"dvc.<stage>.<path>": md5``. All values are strings (MLflow tag values)."""
    root = _root_of(root)
    out = {
        "git_sha": git_sha(root),
        "dvc_lock_sha256": _sha256_or_absent(root / "dvc.lock"),
        "params_sha256": _sha256_or_absent(root / "params.yaml"),
    }
    for key, md5 in sorted(dvc_lock_hashes(root).items()):
        out[_tag_key(f"dvc.{key}")] = md5
    return out


def log_lineage(root: Path, run_id: str | None = None) -> dict[str, str]:
    """Tag the run (``run_id``, else the active run) with ``lineage(root)`` and log ``dvc.lock`` and
    ``params.yaml`` (those that exist) as artifacts under ``lineage/``. Returns the tags.

    Call after ``ensure_experiment``/``stage_run`` so the tracking URI points at the right store.
    """
    import mlflow

    root = _root_of(root)
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_lineage: no active MLflow run and no run_id given")
        run_id = active.info.run_id
    client = mlflow.MlflowClient()
    tags = lineage(root)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for name in ("dvc.lock", "params.yaml"):
        path = root / name
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=LINEAGE_ARTIFACT_DIR)
    return tags


PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under the run it names
ROUND_TAG = "prefdiff.round"
ROUND_CURVE_PREFIX = "rounds/"


def round_runs(parent_run_id: str) -> dict[int, str]:
    """{round: child run id} of the rounds already logged under ``parent_run_id`` (``log_round_run``)."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
                                  max_results=50_000)
    return {int(run.data.tags[ROUND_TAG]): run.info.run_id for run in children if ROUND_TAG in run.data.tags}


def round_run_tags(parent_run_id: str, round_index: int) -> dict[str, str]:
    """The tags that make a run round ``round_index`` of ``parent_run_id`` (nested in the UI; ``round_runs``)."""
    return {PARENT_RUN_TAG: parent_run_id, ROUND_TAG: str(int(round_index))}


def log_round_point(parent_run_id: str, round_index: int, row: dict[str, Any]) -> dict[str, float]:
    """The round's point of the parent's per-round curves: ``rounds/<metric>`` at step = the round, for every
    finite number of ``row`` (but ``round``). Returns those numbers by their own names."""
    import math
    import time

    import mlflow
    from mlflow.entities import Metric

    numeric = {k: float(v) for k, v in row.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "round"}
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(parent_run_id, metrics=[Metric(f"{ROUND_CURVE_PREFIX}{k}", v, now, round_index)
                                                            for k, v in sorted(numeric.items())])
    return numeric


def log_round_run(parent_run_id: str, row: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """One round of many as an MLflow child run of ``parent_run_id`` (nested in the UI by ``mlflow.parentRunId``,
    tagged ``prefdiff.round``): the round's numeric metrics; and the round's point of the parent's per-round
    curves (``log_round_point``). Returns the child run's id.

    The tracking URI must already point at the parent's store (``ensure_experiment``/``stage_run`` set it)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    round_index = int(row["round"])
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=f"round-{round_index:03d}",
                            tags={**round_run_tags(parent_run_id, round_index), **(tags or {})})
    numeric = log_round_point(parent_run_id, round_index, row)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(numeric.items())])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
