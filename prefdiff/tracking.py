"""MLflow conventions of the pipeline: where runs live, how stages share one run, lineage tags.

One Prefect flow run = one MLflow run. The flow creates the run and hands its id to every DVC stage
subprocess through ``MLFLOW_RUN_ID``; ``stage_run`` resumes it there, so every stage logs into the same
run. Run outside the flow (``dvc repro`` by hand), a stage opens its own run named after the stage.

The default tracking URI is an *absolute* SQLite file in the repo root: MLflow's own default is
relative to the current directory, which would give every DVC stage, Prefect worker and notebook its
own ``mlflow.db``.

mlflow is imported inside the functions: importing it costs ~3.5 s and flows import this module.
"""

from __future__ import annotations

import os
import re
import subprocess
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

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
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
    On exit the run gets tag ``prefdiff.stage.<stage>`` = ``done`` (``failed`` if the body raised;
    the run is then ended with status FAILED unless it belongs to the caller).
    """
    import mlflow

    tag = STAGE_TAG_PREFIX + stage
    wanted = os.environ.get(RUN_ID_ENV, "").strip() or None
    if wanted is None:
        ensure_experiment(experiment, root)
    else:
        # start_run(run_id=...) refuses a run whose experiment is not the active one, so activate the
        # run's own experiment (normally ``experiment`` anyway: the flow created the run there).
        mlflow.set_tracking_uri(tracking_uri(root))
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(wanted).info.experiment_id)
    active = mlflow.active_run()
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
