"""The label stage importing Pick-a-Pic parquet pairs, then the train stage on them (real stage processes)."""

import json
import subprocess
import sys

from conftest import make_workspace, venv_env

from tests.pickapic_fixture import default_rows, write_synthetic_pickapic


def _stage(ws, name):
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=ws, env=venv_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_label_stage_imports_parquet_and_diffusion_dpo_trains_on_it(tmp_path, mlflow_uri):
    ws = make_workspace(tmp_path / "ws", {
        "label": {"source": "pickapic", "pickapic": {"path": "data/imports", "resolution": 64, "hflip": "per_image"}},
        "train": {"method": "diffusion_dpo", "epochs": 1, "batch_size": 2, "lr": 0.001},
    })
    write_synthetic_pickapic(ws / "data/imports/part-0.parquet", default_rows())
    out = _stage(ws, "label")
    assert "label: 4 pairs, 0 ties" in out  # the tie row is dropped at import, not stored
    index = json.loads((ws / "data/preferences/index.json").read_text())
    assert index["source"]["kind"] == "images" and index["num_pairs"] == 4 and index["source"]["ties_dropped"] == 1
    _stage(ws, "train")
    metrics = json.loads((ws / "metrics/train.json").read_text())
    assert metrics["method"] == "diffusion_dpo" and metrics["items"] == 4
    assert (ws / "models/trained/pytorch_lora_weights.safetensors").is_file()


def test_d3po_on_imported_pairs_fails_with_a_clear_message(tmp_path, mlflow_uri):
    ws = make_workspace(tmp_path / "ws", {"label": {"source": "pickapic"}, "train": {"method": "d3po"}})
    write_synthetic_pickapic(ws / "data/imports/part-0.parquet", default_rows())
    _stage(ws, "label")
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=ws, env=venv_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "use train.method diffusion_dpo, sft or reward_weighted" in proc.stdout + proc.stderr
