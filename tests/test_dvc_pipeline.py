"""dvc.yaml agrees with the code; `dvc repro` runs the six stages in a temporary git repo; the champion is a
DVC-visible input of evaluate; a Pick-a-Pic-importing config samples no chains."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from prefdiff.config import Params
from prefdiff.paths import Paths

from conftest import REPO, dvc, git, venv_env

DVC = str(Path(sys.executable).parent / "dvc")
STAGES = ["sample", "label", "train", "heldout", "evaluate", "register"]



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
            assert dep in declared or (REPO / dep).exists(), dep  # registry/baseline.json ships (base)
        for key in stage["params"]:  # a whole section, or section.key(.key), or the chosen train method's section
            model = Params
            for name in key.replace("${train.method}", "d3po").split("."):
                assert name in model.model_fields, key
                model = model.model_fields[name].annotation
    expected = {paths.trajectories, paths.preferences, paths.trained, paths.checkpoints, paths.heldout, paths.eval_dir,
                paths.train_metrics, paths.eval_metrics, paths.train_plot, paths.reward_curve_plot,
                paths.winrate_plot, paths.scorers_plot, paths.decision}
    assert {Path(p) for p in declared} == expected
    for name, stage in spec.items():
        assert stage["cmd"] == f"python -m stages.{name}"
    # evaluate sees the champion only through the file the flow resolves, never the registry itself
    assert str(paths.baseline) in spec["evaluate"]["deps"] and "prefdiff/registry.py" not in spec["evaluate"]["deps"]
    assert str(paths.heldout) in spec["evaluate"]["deps"]
    assert "import prefdiff.registry" not in (REPO / "evaluation/evaluate.py").read_text()
    assert "from prefdiff.registry" not in (REPO / "evaluation/evaluate.py").read_text()


def test_repro_runs_six_stages_then_is_a_noop_and_exp_run_reruns_downstream(tiny_workspace):
    ws = tiny_workspace
    out = dvc(ws, "repro")
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == STAGES
    for path in ("data/trajectories/index.json", "data/preferences/pairs.jsonl",
                 "models/trained/pytorch_lora_weights.safetensors", "eval/grid.png", "registry/decision.json"):
        assert (ws / path).is_file(), path
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    assert {"win_rate", "win_rate_low", "win_rate_high", "base_mean_reward", "trained_mean_reward"} <= set(metrics)
    judge = metrics["judge"]
    extra = yaml.safe_load((ws / "params.yaml").read_text())["evaluate"]["scorers"]
    assert metrics["baseline"] == "base" and set(metrics["scorers"]) == {judge, *extra}
    primary = metrics["scorers"][judge]
    assert primary["win_rate"] == metrics["win_rate"]
    # the headline interval is the prompt-clustered bootstrap; Wilson beside it
    assert (metrics["win_rate_low"], metrics["win_rate_high"]) == (primary["win_rate_boot_low"],
                                                                   primary["win_rate_boot_high"])
    assert (metrics["win_rate_wilson_low"], metrics["win_rate_wilson_high"]) == (primary["win_rate_wilson_low"],
                                                                                 primary["win_rate_wilson_high"])
    assert metrics["num_prompts"] == 2 and len(metrics["protocol_fingerprint"]) == 64
    assert metrics["protocol"]["judge"]["name"] == judge and metrics["protocol"]["seeds"]["per_prompt"] == 2
    curve = (ws / "plots/win_rate.csv").read_text().splitlines()
    assert curve[0] == "epoch,win_rate,win_rate_low,win_rate_high,win_rate_wilson_low,win_rate_wilson_high"
    assert (ws / "data/heldout/preferences/index.json").is_file()  # the heldout stage's pairs
    assert {"implicit_acc_elbo", "implicit_acc_trajectory"} <= set(metrics["implicit"])
    assert (ws / "eval/report.html").is_file() and (ws / "plots/scorers.csv").is_file()
    decision = json.loads((ws / "registry/decision.json").read_text())
    assert decision["version"] in ("1", 1) and decision["model_name"] == "prefdiff-d3po"
    assert decision["protocol"] == metrics["protocol_fingerprint"]

    again = dvc(ws, "repro")
    assert "Running stage" not in again
    assert all(f"'{s}' didn't change, skipping" in again for s in STAGES)

    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "round 1")
    exp = dvc(ws, "exp", "run", "-S", "train.lr=0.03")
    assert [s for s in STAGES if f"Running stage '{s}'" in exp] == ["train", "evaluate", "register"]
    assert yaml.safe_load((ws / "params.yaml").read_text())["train"]["lr"] == 0.03
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.lr"] == 0.03  # train keys are listed one by one


def _status(ws: Path) -> dict:
    proc = subprocess.run([DVC, "status", "--json"], cwd=ws, env=venv_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_new_champion_makes_evaluate_out_of_date(tiny_workspace):
    """evaluate.baseline: champion: the flow resolves the champion into registry/baseline.json; when the
    champion moves, `dvc status` shows evaluate changed (and nothing upstream of it)."""
    import mlflow

    from prefdiff.registry import resolve_baseline
    from prefdiff.tracking import tracking_uri

    ws = tiny_workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"].update(baseline="champion", implicit_accuracy=False, reward_curve=False)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    name = "prefdiff-d3po"
    assert resolve_baseline(ws, "champion", name)[0].kind == "base"  # none registered yet: the base stands in
    out = dvc(ws, "repro")
    assert "Running stage 'evaluate'" in out and _status(ws) == {}
    assert json.loads((ws / "metrics/eval.json").read_text())["baseline"] == "base"

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(ws))
    (v1,) = client.search_model_versions(f"name = '{name}'")
    client.set_registered_model_alias(name, "champion", v1.version)  # whatever the gate said: v1 is champion now
    ref, changed = resolve_baseline(ws, "champion", name)
    assert changed and (ref.kind, ref.version) == ("champion", int(v1.version))
    status = _status(ws)
    assert set(status) == {"evaluate"}, status
    assert {"changed deps": {"registry/baseline.json": "modified"}} in status["evaluate"]

    out = dvc(ws, "repro", "evaluate")
    assert "Running stage 'evaluate'" in out
    evaluated = json.loads((ws / "metrics/eval.json").read_text())
    assert evaluated["baseline"] == f"champion v{v1.version}" and evaluated["baseline_version"] == int(v1.version)
    assert resolve_baseline(ws, "champion", name) == (ref, False) and "evaluate" not in _status(ws)


def test_pickapic_source_samples_no_chains(tmp_path, mlflow_uri):
    """label.source: pickapic: `dvc repro label` runs sample, which draws nothing, and label imports."""
    from conftest import make_workspace

    from prefdiff.data import DatasetError
    from prefdiff.data.trajectories import TrajectoryStore
    from tests.pickapic_fixture import default_rows, write_synthetic_pickapic

    ws = make_workspace(tmp_path / "ws", {"label": {"source": "pickapic"}, "sampling": {"num_steps": 4},
                                               "train": {"d3po": {"timestep_window": None}}})
    write_synthetic_pickapic(ws / "data/imports/part-0.parquet", default_rows())
    out = dvc(ws, "repro", "label")
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == ["sample", "label"]
    assert "sample: no trajectories sampled (label.source is 'pickapic'" in out
    assert sorted(p.name for p in (ws / "data/trajectories").iterdir()) == ["not_sampled.json"]
    try:
        TrajectoryStore.open(ws / "data/trajectories")
    except DatasetError as err:
        assert "holds no trajectories on purpose (label.source is 'pickapic'" in str(err)
    else:
        raise AssertionError("an unsampled store must not open")
    assert "label: 4 pairs" in out


def test_train_stage_depends_on_the_chosen_methods_keys_only(tiny_workspace):
    """After a D3PO train stage, a DDPO key leaves it up to date; a D3PO key or the method does not."""
    ws = tiny_workspace
    dvc(ws, "repro", "train")

    def train_status_after(**keys: dict) -> str:
        params = yaml.safe_load((ws / "params.yaml").read_text())
        for section, values in keys.items():
            params["train"][section].update(values)
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return dvc(ws, "status", "train")

    assert "up to date" in train_status_after(ddpo={"clip_range": 0.002, "adv_clip_max": 3.0})
    assert "up to date" in train_status_after(diffusion_dpo={"beta": 100.0})
    changed = train_status_after(d3po={"beta": 0.2})
    assert "modified:" in changed and "train.d3po" in changed
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]
    assert lock["train.d3po"] == {"beta": 0.1, "clip_eps": 0.1, "timestep_fraction": 1.0, "timestep_window": 2}
    assert not any(key.startswith(("train.ddpo", "train.diffusion_dpo", "train.sft")) for key in lock)
