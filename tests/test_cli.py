"""The `prefdiff` console command and `prefdiff doctor`, run for real (subprocesses with a timeout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefdiff.profile import merged

from conftest import REPO

# The installed `prefdiff` script (`make install`); a venv installed before pyproject declared it runs the same
# function (checked against pyproject below) as a module.
_SCRIPT = Path(sys.executable).parent / "prefdiff"
PREFDIFF = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "prefdiff.cli"]
COMMANDS = ("run", "compare", "label-server", "profile", "doctor")


def _env(tmp_path: Path) -> dict[str, str]:
    """This checkout first on the path; Prefect and MLflow pointed into ``tmp_path``, so any run shows up there."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_console_script_lists_and_dispatches_every_command(tmp_path):
    import tomllib

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["prefdiff"] == "prefdiff.cli:main"
    top = _run([*PREFDIFF, "--help"], tmp_path)
    assert top.returncode == 0
    for command in COMMANDS:
        assert f"prefdiff {command}" in top.stdout
    unknown = _run([*PREFDIFF, "serve"], tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: unknown command 'serve'")
    expected = {"run": "--stages", "compare": "--methods", "label-server": "--annotators-per-group",
                "profile": "--params", "doctor": "--params"}
    for command, option in expected.items():
        done = _run([*PREFDIFF, command, "--help"], tmp_path)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert "usage:" in done.stdout and option in done.stdout, (command, done.stdout)
    assert "usage: prefdiff run" in _run([*PREFDIFF, "run", "--help"], tmp_path).stdout


def _assert_nothing_started(tmp_path: Path) -> None:
    """No Prefect server (its database under PREFECT_HOME; importing prefect makes only the empty directory)
    and no MLflow store."""
    assert [p.name for p in (tmp_path / "prefect-home").rglob("*")] == []
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("module", ["flows.round", "flows.rounds", "flows.compare", "flows.human", "flows.deploy"])
def test_flow_module_help_prints_usage_and_starts_nothing(tmp_path, module):
    """`python -m flows.round --help` used to ignore its arguments and start a whole round."""
    done = _run([sys.executable, "-m", module, "--help"], tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m " + module.split(" ")[0]), done.stdout[:300]
    assert "Running stage" not in done.stdout + done.stderr
    _assert_nothing_started(tmp_path)


def test_round_cli_refuses_bad_stages_in_one_line(tmp_path):
    done = _run([sys.executable, "-m", "flows.round", "--stages", "train", "sample"], tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: stages ['train', 'sample'] must be distinct and in pipeline order "
        "['sample', 'label', 'train', 'heldout', 'evaluate', 'register']"]
    _assert_nothing_started(tmp_path)


# -- doctor -----------------------------------------------------------------------------------------------------------

def _lines(out: str) -> dict[str, str]:
    """{check name: its line} from doctor's output."""
    return {line.split()[1]: line for line in out.splitlines() if line.split()[:1] in (["ok"], ["problem"], ["skip"])}


def _workspace(tmp_path: Path, overrides: dict) -> Path:
    params = merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_doctor_passes_on_the_repository_params(tmp_path):
    done = _run([*PREFDIFF, "doctor", "--params", str(REPO / "params.yaml")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _lines(done.stdout)
    assert list(lines) == ["params", "weights", "device", "memory", "disk"]
    assert all(line.startswith("ok ") for line in lines.values()), done.stdout
    assert "digits': 40 prompts" in lines["params"] and "latents 4x8x8" in lines["weights"]
    # 40 prompts x 24 groups x 2 images of 21 fp32 latents [4, 8, 8] + 20 log-probs + a 64x64 RGB PNG bound, x2
    assert "needs at least 130.1 MB for data/trajectories (1920 images" in lines["disk"]
    assert done.stdout.rstrip().endswith("all checks passed")


def test_doctor_estimate_is_the_trajectory_store_layout():
    from prefdiff.config import load_params
    from prefdiff.doctor import ModelShape, estimate

    params = load_params(REPO / "params.yaml")
    shape = ModelShape(parameters=1_000_000, unet_parameters=800_000, latent_shape=(4, 64, 64), where="sd15-like")
    needs = estimate(params, shape, num_prompts=40)
    t = params.sampling.num_steps
    images = 40 * params.sample.groups_per_prompt * params.sample.images_per_group
    per_image = (t + 1) * 4 * 64 * 64 * 4 + t * 4 + 3 * 512 * 512
    assert needs.images == images and needs.trajectory_bytes == images * per_image
    assert needs.disk_bytes == 2 * needs.trajectory_bytes
    chains = params.sample.batch_size * 2 * (t + 1) * 4 * 64 * 64 * 4
    assert needs.memory_bytes == 1_000_000 * 4 + chains
    full = load_params(REPO / "params.yaml").model_copy(
        update={"train": params.train.model_copy(update={"finetune": "full"})})
    assert estimate(full, shape, 40).memory_bytes == 1_000_000 * 4 + max(chains, 800_000 * (4 + 4 + 8))
    imported = params.model_copy(update={"label": params.label.model_copy(update={"source": "pickapic"})})
    assert estimate(imported, shape, 40).disk_bytes == 0  # imported pairs: the sample stage samples nothing


def _digits_copy(tmp_path: Path) -> Path:
    from prefdiff.models.digits import DIGITS_DIR

    model = tmp_path / "model"
    shutil.copytree(DIGITS_DIR, model)
    return model


def test_doctor_names_missing_and_truncated_weights(tmp_path, capsys):
    from prefdiff.doctor import main

    model = _digits_copy(tmp_path)
    params = _workspace(tmp_path, {"model": {"source": "model"}})  # relative to the workspace
    assert main(["--params", str(params)]) == 0
    assert f"{model} (text_encoder, unet, vae)" in _lines(capsys.readouterr().out)["weights"]

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["--params", str(params)]) == 1
    out = capsys.readouterr().out
    lines = _lines(out)
    assert lines["weights"].startswith("problem  weights  model.source = model:")
    assert f"{weights}: tensors end at byte" in lines["weights"] and "truncated" in lines["weights"]
    assert "fix: " in lines["weights"]
    assert lines["memory"].startswith("skip") and lines["disk"].startswith("skip")
    assert out.rstrip().endswith("1 problem(s): weights")

    weights.unlink()
    assert main(["--params", str(params)]) == 1
    assert "has no weights file" in _lines(capsys.readouterr().out)["weights"]


def test_doctor_names_a_hub_id_missing_from_the_cache(tmp_path, capsys, monkeypatch):
    from prefdiff.doctor import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    params = _workspace(tmp_path, {"model": {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5"}})
    assert main(["--params", str(params)]) == 1
    line = _lines(capsys.readouterr().out)["weights"]
    assert line.startswith("problem") and "not in the local Hugging Face cache" in line and "hf download" in line


def test_doctor_names_a_device_this_machine_lacks(tmp_path, capsys):
    import torch

    from prefdiff.doctor import main

    params = _workspace(tmp_path, {"model": {"device": "cuda:7"}})
    assert main(["--params", str(params)]) == 1
    lines = _lines(capsys.readouterr().out)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = "no CUDA device" if count == 0 else f"has {count} CUDA device(s)"
    assert lines["device"].startswith("problem  device   model.device = cuda:7 but") and expected in lines["device"]
    assert lines["memory"].startswith("skip") and lines["disk"].startswith("ok")


def test_doctor_refuses_a_run_that_cannot_fit_memory_or_disk(tmp_path, capsys):
    """An SD-shaped config at 32k x 32k pixels: chains of one batch and the store exceed any machine."""
    from prefdiff.doctor import main

    model = _digits_copy(tmp_path)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(config | {"sample_size": 4096}))
    params = _workspace(tmp_path, {"model": {"source": str(model), "device": "cpu"},
                                   "sample": {"batch_size": 4096, "groups_per_prompt": 1000}})
    assert main(["--params", str(params)]) == 1
    out = capsys.readouterr().out
    lines = _lines(out)
    assert lines["memory"].startswith("problem") and "RAM available" in lines["memory"]
    assert "lower sample.batch_size" in lines["memory"]
    assert lines["disk"].startswith("problem") and "80000 images x 21 latents of 4x4096x4096" in lines["disk"]
    assert out.rstrip().endswith("2 problem(s): memory, disk")


def test_doctor_bad_params_is_one_error_line(tmp_path):
    params = _workspace(tmp_path, {"sample": {"images_per_group": 99}})
    done = _run([*PREFDIFF, "doctor", "--params", str(params)], tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "sample.images_per_group" in done.stderr
    assert "Traceback" not in done.stderr


def test_make_mlflow_ui_takes_host_and_port():
    def command(*args: str) -> str:
        # --no-print-directory: under `make test` this make is a sub-make, which would end with "Leaving directory"
        out = subprocess.run(["make", "--no-print-directory", "-n", "mlflow-ui", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    assert command().endswith("mlflow ui --backend-store-uri sqlite:///" + str(REPO) + "/mlflow.db "
                              "--host 127.0.0.1 --port 5000")
    assert command("PORT=5123", "HOST=0.0.0.0").endswith("--host 0.0.0.0 --port 5123")
