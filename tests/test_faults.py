"""kill -9 at several points of every stage: the next run ends where an uninterrupted run does.

Two workspaces with the same tiny params (conftest's ``TINY_OVERRIDES``: the digits model, 4 prompts, 4 DDIM
steps). ``straight`` runs ``dvc repro`` once. In ``killed``, each stage in pipeline order is started with ``dvc
repro --single-item <stage>`` and killed with SIGKILL (``dvc`` and the stage process, the whole process group:
what the OOM killer or a lost node does) as soon as it prints each line of ``KILL_POINTS[stage]`` in turn, then run
to its end. The kill points are where a stage has loaded its model and is about to compute, where it has
computed and is writing, and (train) between optimizer steps after checkpoints. Afterwards:

- every cached output (``dvc.lock``'s content hash of the datasets, the trained weights, the evaluation's files)
  equals the uninterrupted run's: byte-identical outputs, as every random draw is a pure function of the seeds and
  training resumes from its checkpoint; the metrics files equal it too, apart from the run's own record of how
  it ran (``seconds``, ``resumed_from_step``, ``update_norm`` of the resumed call, the register decision's
  ``reused``);
- no temp sibling (``.tmp-<pid>`` / ``.old-<pid>``) of a killed writer is left anywhere;
- no MLflow run is left RUNNING (a killed stage's run is marked KILLED by the next stage that starts), and the
  registry holds exactly one version, as in the uninterrupted run.

~4 minutes on 2 cores (12 killed starts, each paying the stage's imports).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES, make_workspace, venv_env

DVC = str(Path(sys.executable).parent / "dvc")
STAGES = ("sample", "label", "train", "heldout", "evaluate", "register")
# Lines each stage prints (stdout, in order) at which it is killed; the next start of the stage is killed at the
# next one, so each point is reached by a fresh process.
KILL_POINTS: dict[str, tuple[str, ...]] = {
    "sample": ("sampling ", "sampled 4/4 groups"),  # model loaded / every image drawn, not yet written
    "label": ("scored 8/8 images", "label: 4 pairs"),  # scored / written, MLflow run and dvc.lock not yet closed
    "train": ("reference log-probs for", "step 1/4", "step 3/4"),  # precompute / after checkpoints 1 and 3
    "heldout": ("sampling 2 groups", "scored 4/4 images"),
    "evaluate": ("epoch 1: ", "implicit accuracy on"),  # base scored / trained scored, metrics not yet written
    "register": ("register: registered",),  # version and alias set, decision.json not yet final
}
# What a metrics file records about how its run went rather than what it computed (``update_norm``: the weights'
# change in this call, from the checkpoint it resumed from).
RUN_RECORD_KEYS = {"metrics/train.json": {"seconds", "resumed_from_step", "update_norm"},
                   "registry/decision.json": {"reused"}}
TEMP_SIBLING = re.compile(r"\.(tmp|old)-\d+")


def _env(ws: Path) -> dict[str, str]:
    return venv_env({"MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "PYTHONUNBUFFERED": "1"})


def _repro(ws: Path, *args: str) -> str:
    proc = subprocess.run([DVC, "repro", *args], cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _kill_at(ws: Path, stage: str, marker: str) -> list[str]:
    """Start the stage; SIGKILL its process group when a stdout line starts with ``marker``. Its lines up to then."""
    proc = subprocess.Popen([DVC, "repro", "--single-item", stage], cwd=ws, env=_env(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(marker):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lines and lines[-1].startswith(marker), f"{stage} ended before printing {marker!r}:\n" + "\n".join(lines)
    return lines


def _outs(ws: Path) -> dict[str, str]:
    """Every stage output's content hash in ``dvc.lock``."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {f"{stage}:{out['path']}": out.get("md5", "") for stage in STAGES for out in lock[stage]["outs"]}


def _metrics(ws: Path, relative: str) -> dict:
    data = json.loads((ws / relative).read_text())
    return {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS.get(relative, set())}


def _runs_by_status(ws: Path) -> dict[str, int]:
    with sqlite3.connect(ws / "mlflow.db") as con:
        return dict(con.execute("select status, count(*) from runs group by status").fetchall())


def _versions(ws: Path) -> int:
    with sqlite3.connect(ws / "mlflow.db") as con:
        return con.execute("select count(*) from model_versions").fetchone()[0]


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> tuple[Path, Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("faults")
    straight, killed = (make_workspace(root / name, TINY_OVERRIDES) for name in ("straight", "killed"))
    for ws in (straight, killed):
        (ws / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    _repro(straight)
    seen: dict[str, list[str]] = {}
    for stage in STAGES:
        for marker in KILL_POINTS[stage]:
            seen[f"{stage}@{marker}"] = _kill_at(killed, stage, marker)
        _repro(killed, "--single-item", stage)
    return straight, killed, seen


def test_every_stage_killed_at_several_points_ends_with_the_uninterrupted_outputs(workspaces):
    straight, killed, seen = workspaces
    assert len(seen) == sum(len(points) for points in KILL_POINTS.values()) == 12
    # the files that record how their run went are compared below, without those records
    expected, got = ({k: v for k, v in _outs(ws).items() if k.split(":", 1)[1] not in RUN_RECORD_KEYS}
                     for ws in (straight, killed))
    assert got == expected, {k: (expected.get(k), got.get(k)) for k in expected.keys() | got.keys()
                             if expected.get(k) != got.get(k)}
    for relative in ("metrics/train.json", "metrics/eval.json", "registry/decision.json"):
        assert _metrics(killed, relative) == _metrics(straight, relative), relative
    for relative in ("plots/train.csv", "plots/reward_curve.csv", "plots/win_rate.csv", "plots/scorers.csv"):
        assert (killed / relative).read_bytes() == (straight / relative).read_bytes(), relative
    # training resumed from a checkpoint after the kills between its steps
    assert json.loads((killed / "metrics/train.json").read_text())["resumed_from_step"] > 0


def test_no_temp_sibling_of_a_killed_writer_is_left(workspaces):
    _, killed, _ = workspaces
    debris = [str(p.relative_to(killed)) for p in killed.rglob("*") if TEMP_SIBLING.search(p.name)
              and ".dvc" not in p.relative_to(killed).parts]
    assert debris == []


def test_killed_stage_runs_are_closed_and_the_registry_has_one_version(workspaces):
    straight, killed, _ = workspaces
    statuses = _runs_by_status(killed)
    assert "RUNNING" not in statuses, statuses
    assert statuses.get("KILLED", 0) >= 1 and statuses["FINISHED"] == _runs_by_status(straight)["FINISHED"]
    assert _versions(killed) == _versions(straight) == 1
