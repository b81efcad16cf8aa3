"""dvc.yaml agrees with the code, and `dvc repro` runs the five stages in a temporary git repo."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from prefdiff.config import Params
from prefdiff.paths import Paths

from conftest import REPO, git, venv_env

DVC = str(Path(sys.executable).parent / "dvc")
STAGES = ["sample", "label", "train", "evaluate", "register"]


def _dvc(ws: Path, *args: str) -> str:
    proc = subprocess.run([DVC, *args], cwd=ws, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_dvc_yaml_matches_paths_params_and_code():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(spec) == STAGES
    paths = Paths(Path("."))
    declared = set()
    for stage in spec.values():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            declared.add(next(iter(out)) if isinstance(out, dict) else out)
    for stage in spec.values():
        for dep in stage["deps"]:  # code deps exist in the repo; data deps are upstream outputs
            assert dep in declared or (REPO / dep).exists(), dep
        for key in stage["params"]:  # a whole section, or section.key(.key), or the chosen train method's section
            model = Params
            for name in key.replace("${train.method}", "d3po").split("."):
                assert name in model.model_fields, key
                model = model.model_fields[name].annotation
    expected = {paths.trajectories, paths.preferences, paths.trained, paths.checkpoints, paths.eval_dir,
                paths.train_metrics, paths.eval_metrics, paths.train_plot, paths.reward_curve_plot,
                paths.winrate_plot, paths.scorers_plot, paths.decision}
    assert {Path(p) for p in declared} == expected
    for name, stage in spec.items():
        assert stage["cmd"] == f"python -m stages.{name}"


def test_repro_runs_five_stages_then_is_a_noop_and_exp_run_reruns_downstream(tiny_workspace):
    ws = tiny_workspace
    out = _dvc(ws, "repro")
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == STAGES
    for path in ("data/trajectories/index.json", "data/preferences/pairs.jsonl",
                 "models/trained/pytorch_lora_weights.safetensors", "eval/grid.png", "registry/decision.json"):
        assert (ws / path).is_file(), path
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    assert {"win_rate", "win_rate_low", "win_rate_high", "base_mean_reward", "trained_mean_reward"} <= set(metrics)
    judge = metrics["judge"]
    assert metrics["baseline"] == "base" and set(metrics["scorers"]) == {judge}
    assert metrics["scorers"][judge]["win_rate"] == metrics["win_rate"]
    assert {"implicit_acc_elbo", "implicit_acc_trajectory"} <= set(metrics["implicit"])
    assert (ws / "eval/report.html").is_file() and (ws / "plots/scorers.csv").is_file()
    assert json.loads((ws / "registry/decision.json").read_text())["version"] in ("1", 1)

    again = _dvc(ws, "repro")
    assert "Running stage" not in again
    assert all(f"'{s}' didn't change, skipping" in again for s in STAGES)

    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "round 1")
    exp = _dvc(ws, "exp", "run", "-S", "train.lr=0.03")
    assert [s for s in STAGES if f"Running stage '{s}'" in exp] == ["train", "evaluate", "register"]
    assert yaml.safe_load((ws / "params.yaml").read_text())["train"]["lr"] == 0.03
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.lr"] == 0.03  # train keys are listed one by one


def test_train_stage_depends_on_the_chosen_methods_keys_only(tiny_workspace):
    """After a D3PO train stage, a DDPO key leaves it up to date; a D3PO key or the method does not."""
    ws = tiny_workspace
    _dvc(ws, "repro", "train")

    def train_status_after(**keys: dict) -> str:
        params = yaml.safe_load((ws / "params.yaml").read_text())
        for section, values in keys.items():
            params["train"][section].update(values)
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return _dvc(ws, "status", "train")

    assert "up to date" in train_status_after(ddpo={"clip_range": 0.002, "adv_clip_max": 3.0})
    assert "up to date" in train_status_after(diffusion_dpo={"beta": 100.0})
    changed = train_status_after(d3po={"beta": 0.2})
    assert "modified:" in changed and "train.d3po" in changed
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]
    assert lock["train.d3po"] == {"beta": 0.1, "clip_eps": 0.1, "timestep_fraction": 1.0}
    assert not any(key.startswith(("train.ddpo", "train.diffusion_dpo", "train.sft")) for key in lock)
