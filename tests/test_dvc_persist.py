"""A failed stage keeps its previous outputs: DVC deletes a stage's outputs before running it unless they are
``persist: true`` (dvc.yaml), and the stages replace them atomically. Real `dvc repro` of the project's
dvc.yaml in a temporary git repo."""

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES, git, make_workspace, venv_env

DVC = str(Path(sys.executable).parent / "dvc")


def _repro(ws: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, "repro", "--single-item", stage], cwd=ws, env=venv_env(), capture_output=True,
                          text=True, timeout=300)


def _snapshot(ws: Path, *paths: str) -> dict[str, bytes]:
    """Every file under ``paths`` (files or directories) with its bytes."""
    out = {}
    for rel in paths:
        root = ws / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out |= {p.relative_to(ws).as_posix(): p.read_bytes() for p in files}
    return out


def _set_params(ws: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params[section][key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_failed_train_evaluate_register_keep_the_tracked_metrics_plots_and_weights(tmp_path, mlflow_uri):
    """The git-tracked metrics/*.json, plots/*.csv and registry/decision.json (cache: false: `dvc checkout`
    cannot bring them back) and the trained weights survive a stage that fails; here it fails on bad params."""
    ws = make_workspace(tmp_path / "ws", TINY_OVERRIDES)
    previous = {  # a previous round's results, committed as a round commits them
        "metrics/train.json": '{"final_loss": 0.61}\n', "plots/train.csv": "step,loss\n1,0.69\n2,0.61\n",
        "metrics/eval.json": '{"win_rate": 0.75}\n', "plots/reward_curve.csv": "epoch,mean_reward\n0,0.1\n",
        "plots/win_rate.csv": "epoch,win_rate\n2,0.75\n", "plots/scorers.csv": "scorer,win_rate\nclip,0.75\n",
        "registry/decision.json": '{"version": 1}\n',
        # the stages' inputs only need to exist: each stage fails on its params before it reads them
        "models/trained/pytorch_lora_weights.safetensors": "weights", "data/trajectories/index.json": "{}",
        "data/preferences/index.json": "{}", "data/heldout/not_sampled.json": "{}",
    }
    for rel, text in previous.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    git(ws, "add", "metrics", "plots", "registry")
    git(ws, "commit", "-q", "-m", "previous round")
    _set_params(ws, "train", "epochs", 0)  # refused by every stage's first step (exit 2)
    before = _snapshot(ws, "metrics", "plots", "registry", "models/trained")
    for stage in ("train", "evaluate", "register"):
        proc = _repro(ws, stage)
        assert proc.returncode != 0 and "error: " in proc.stderr + proc.stdout, proc.stderr[-2000:]
        assert _snapshot(ws, "metrics", "plots", "registry", "models/trained") == before, stage
    assert git(ws, "status", "--porcelain", "metrics", "plots", "registry") == ""


@contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """No entry of ``directory`` can be created, renamed or removed (root ignores file modes: chattr +i)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root where `chattr +i` is refused: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_read_only_data_directory_loses_no_dataset(tmp_path, mlflow_uri):
    """data/ read-only: DVC removes data/trajectories before the sample stage runs (the dataset does not persist,
    so that `make compare`'s --temp experiments restore it from the run cache) and fails naming it; `dvc
    checkout` restores the dataset from the cache, byte for byte."""
    ws = make_workspace(tmp_path / "ws", {**TINY_OVERRIDES, "label": {"source": "pickapic"}})
    first = _repro(ws, "sample")  # pickapic: the stage writes only not_sampled.json (no model, seconds)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(ws, "data/trajectories")
    assert list(before) == ["data/trajectories/not_sampled.json"]
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "sampled")
    _set_params(ws, "sample", "seed", 7)  # the stage changed: DVC runs it again
    with _read_only(ws / "data"):
        proc = _repro(ws, "sample")
    assert proc.returncode != 0
    assert "Operation not permitted" in proc.stderr and "data/trajectories" in proc.stderr, proc.stderr[-2000:]
    git(ws, "checkout", "params.yaml")
    restored = subprocess.run([DVC, "checkout", "--force", "sample"], cwd=ws, capture_output=True, text=True, env=venv_env())
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert _snapshot(ws, "data/trajectories") == before


def test_every_git_tracked_output_persists():
    """Each cache: false output (git keeps it, DVC's cache does not) of every pipeline persists."""
    from conftest import REPO

    for dvc_yaml in [REPO / "dvc.yaml", *sorted(REPO.glob("pipelines/*/dvc.yaml"))]:
        for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
            for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
                path, flags = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                if flags.get("cache") is False:
                    assert flags.get("persist") is True, f"{dvc_yaml.relative_to(REPO)}: {name}: {path}"
