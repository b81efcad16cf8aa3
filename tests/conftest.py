"""Shared fixtures: isolated MLflow / Prefect / HF settings and throw-away DVC workspaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from prefdiff.profile import merged

REPO = Path(__file__).resolve().parents[1]
# What a workspace needs to run the pipeline: the code, the pipeline definition and the DVC config.
WORKSPACE_ITEMS = ("prefdiff", "stages", "evaluation", "flows", "data/imports", "data/labels/README.md",
                   "data/labels/.gitignore", "registry/baseline.json", "models/policy", "dvc.yaml",
                   "params.yaml", "pyproject.toml")

# Small enough that the five stages take seconds each on 2 CPU cores (imports dominate).
TINY_OVERRIDES = {
    "sample": {"num_prompts": 4, "images_per_group": 2, "groups_per_prompt": 1, "batch_size": 8},
    "sampling": {"num_steps": 4},
    "train": {"epochs": 2, "batch_size": 2, "checkpoint_every": 1, "d3po": {"timestep_window": 2}},
    "evaluate": {"num_prompts": 2, "seeds_per_prompt": 2, "batch_size": 4, "grid_columns": 4, "implicit_groups_per_prompt": 1},
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def pytest_report_header(config) -> str:
    # Float results may differ in the last bits between thread counts (reduction blocking); the suite must
    # pass with any (OMP_NUM_THREADS=1 make test, OMP_NUM_THREADS=2 make test), so every log says which ran.
    import torch

    return f"torch intra-op threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_workspace(root: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC repo holding the pipeline's code and params (with ``overrides`` applied), committed."""
    root.mkdir(parents=True, exist_ok=True)
    for item in WORKSPACE_ITEMS:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / item)
    params = merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "config", "user.email", "ci@prefdiff.invalid")
    git(root, "config", "user.name", "prefdiff ci")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "config", "core.analytics", "false"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "workspace")
    return root


def dvc(ws: Path, *args: str) -> str:
    """``dvc <args>`` in ``ws`` with this venv's dvc; its stdout + stderr. A non-zero exit fails the test with
    the output's tail."""
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=ws, env=venv_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH (so `python -m stages.x` finds deps)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_worker(worker: str, spec: Path, *, processes: int = 1, stage: str = "", timeout: int = 600) -> None:
    """The test worker script ``worker`` on ``spec``: as this one plain process, or as ``processes`` processes
    launched by the command ``stage``'s ``relaunch`` runs (``launch_command``: over gloo on the CPU, on a free
    port) with the worker in place of the stage's module. One thread per process (OMP_NUM_THREADS=1: one process
    and launched ones run the same kernels), this checkout importable; a non-zero exit fails the test with the
    output's tail."""
    command = [sys.executable]
    if processes > 1:
        from stages._common import launch_command

        command = launch_command(stage, processes, environ={})  # on a free port
        assert command[-2:] == ["-m", f"stages.{stage}"] and command[command.index("--num_processes") + 1] == str(processes)
        command = command[:-2]
    proc = subprocess.run(command + [worker, str(spec)], env=venv_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return uri


@pytest.fixture
def tiny_workspace(tmp_path, mlflow_uri) -> Path:
    return make_workspace(tmp_path / "ws", TINY_OVERRIDES)


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throw-away Prefect API (SQLite) for the whole session, with its own PREFECT_HOME."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    mp = pytest.MonkeyPatch()
    # the env for the server subprocess, the settings for this process (prefect is imported already)
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
            with prefect_test_harness(server_startup_timeout=180):
                yield
    finally:
        mp.undo()


@contextmanager
def isolated_mlflow(uri: str):
    """MLFLOW_TRACKING_URI = ``uri`` for the block; afterwards the MLflow env vars and the fluent
    globals that the flow sets in this process (tracking URI, active experiment) are put back, so
    later test modules do not inherit this module's store."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    for key in MLFLOW_ENV:
        os.environ.pop(key, None)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        fluent._active_experiment_id = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
