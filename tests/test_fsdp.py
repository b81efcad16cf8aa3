"""A full UNet fine-tune sharded by FSDP2 (``deploy/accelerate/fsdp_full.yaml``): 2 CPU processes end where one does.

``tests/fsdp_worker.py`` runs ``test_ddp``'s runs with ``train.finetune: full`` under ``accelerate launch
--config_file deploy/accelerate/fsdp_full.yaml`` (the shipped file, only the process count and port overridden);
the worker relabels the CPU process group so that accelerate applies its FSDP2 path on the CPU (accelerate
enables FSDP only for GPU groups; see the worker's docstring). Tolerance as in ``test_ddp``: the reduce-scatter
sums the processes' gradients in another order than one process does, so |w_fsdp - w_one| <= RTOL x the largest
weight change of the one-process run (AdamW with eps 1: an update ~ lr x gradient, rounding is not amplified; a
missing share, a wrong scale or a checkpoint restored into the wrong shards moves weights by far more), plus one
float32 ulp of the weight per optimizer step: unlike a LoRA's up weights (0 at the start) a full UNet's weights
are ~1 while an update is small, and an update that differs in its last bits can round w + update to the
neighbouring float (measured: 1.2e-7 = 1 ulp at 1 after 4 steps with train.lr 0.01).
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import venv_env
from prefdiff.config import parse_params
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.finetuned import FULL_UNET_DIR
from prefdiff.models.loading import load_pipeline
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.scorers import get_scorer
from prefdiff.training import sharding
from prefdiff.training.fit import fit
from prefdiff.training.methods import d3po
from stages._common import free_port
from test_ddp import D3PO, DATA, DPO, REPO, SHARED, THRESHOLDED

CONFIG = REPO / "deploy" / "accelerate" / "fsdp_full.yaml"
FULL = {"finetune": "full"}
RUNS = [("d3po", D3PO, None), ("resumed", D3PO, 1), ("resumed", D3PO, None), ("dpo", DPO, None)]
NAMES = [name for name, _, _ in RUNS]
RTOL = 1e-4  # of the largest update
UNET_FILE = "diffusion_pytorch_model.safetensors"


def overrides(train: dict, processes: int) -> dict:
    return DATA | {"train": SHARED | FULL | train | {"num_processes": processes}}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    sample_dataset(parse_params(DATA), root / "traj", progress=lambda _: None)
    label_trajectories(TrajectoryStore.open(root / "traj"), get_scorer("jpeg_compressibility"), root / "prefs",
                       progress=lambda _: None)
    spec = {"data": str(root), "out": str(root / "launched"), "reference_batch": d3po.REFERENCE_BATCH,  # as the one-process fit
            "runs": [{"name": name, "overrides": overrides(train, 2), "stop_after_steps": stop}
                     for name, train, stop in RUNS]}
    (root / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(CONFIG), "--num_processes", "2", "--main_process_port", str(free_port()),
               str(Path(__file__).parent / "fsdp_worker.py"), str(root / "spec.json")]
    proc = subprocess.run(command, env=venv_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads((root / "launched" / f"rank-{r}" / "report.json").read_text()) for r in range(2)]
    configs = [json.loads((root / "launched" / f"rank-{r}" / "fsdp.json").read_text()) for r in range(2)]
    return root, root / "launched", reports, configs


def test_the_config_shards_the_unet_and_not_the_reference(launched):
    *_, configs = launched
    for config in configs:
        assert config["distributed_type"] == str(DistributedType.FSDP) and config["sharded"]
        assert config["fsdp_version"] == 2 and config["reshard_after_forward"] is False
        assert config["wrap"] == ["BasicTransformerBlock", "ResnetBlock2D"]
        assert not config["reference_sharded"]  # the DPO run's frozen copy is whole in every process
    assert [c["full_numel"] for c in configs] == [configs[0]["full_numel"]] * 2
    # each process holds about half of every weight (dim-0 shards; odd sizes split one row unevenly)
    assert sum(c["local_numel"] for c in configs) == configs[0]["full_numel"]
    assert all(c["local_numel"] < 0.6 * c["full_numel"] for c in configs)


@pytest.mark.parametrize(("name", "train"), [("d3po", D3PO), ("dpo", DPO)])
def test_fsdp_trains_the_one_process_update(launched, tmp_path, name, train):
    root, out, reports, _ = launched
    one = fit(parse_params(overrides(train, 1)), trajectories_dir=root / "traj", preferences_dir=root / "prefs",
              out_dir=tmp_path / "trained", checkpoint_dir=tmp_path / "ckpt", progress=lambda _: None)
    trained = load_file(str(tmp_path / "trained" / FULL_UNET_DIR / UNET_FILE))
    base = load_pipeline("builtin:tiny-sd", dtype="float32", device="cpu").unet.state_dict()
    moved = max(float((trained[k] - base[k]).abs().max()) for k in trained)
    assert moved > 1e-4  # the runs trained
    sharded = load_file(str(out / name / "trained" / FULL_UNET_DIR / UNET_FILE))  # gathered, written by rank 0
    assert sharded.keys() == trained.keys()
    ulps = len(one.curve) * torch.finfo(torch.float32).eps
    for key in trained:
        worst, largest = float((sharded[key] - trained[key]).abs().max()), float(trained[key].abs().max())
        assert worst <= RTOL * moved + ulps * largest, (key, worst, moved, largest)
    for r in range(2):  # every process's gathered weights are the written ones
        assert all(torch.equal(v, sharded[k]) for k, v in load_file(str(out / f"rank-{r}" / f"{name}.safetensors"))
                   .items())
    curve = reports[0][NAMES.index(name)]["curve"]
    assert [row["step"] for row in curve] == [row["step"] for row in one.curve]
    for two_row, one_row in zip(curve, one.curve):  # as test_ddp: the gradient norm is clip_grad_norm_'s over shards
        for key, value in one_row.items():
            if key not in THRESHOLDED:
                assert two_row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_only_the_main_process_writes_and_a_sharded_run_resumes(launched):
    _, out, reports, _ = launched
    for run in range(len(RUNS)):
        assert reports[0][run]["wrote"] and not reports[1][run]["wrote"]
    assert [r[NAMES.index("resumed") + 1]["resumed_from_step"] for r in reports] == [1, 1]
    final = load_file(str(out / "resumed" / "trained" / FULL_UNET_DIR / UNET_FILE))
    uninterrupted = load_file(str(out / "d3po" / "trained" / FULL_UNET_DIR / UNET_FILE))
    for key in final:  # the checkpoint restored into the same shards: the same calls, the same bits
        assert torch.equal(final[key], uninterrupted[key]), key


@pytest.mark.parametrize(("distributed", "version", "finetune", "optimizer", "named"), [
    (DistributedType.MULTI_CPU, 2, "full", "adamw", "model.device cpu"),
    (DistributedType.FSDP, 1, "full", "adamw", "fsdp_version: 2"),
    (DistributedType.FSDP, 2, "lora", "adamw", "train.finetune lora"),
    (DistributedType.FSDP, 2, "full", "adafactor", "train.optimizer adafactor"),
    (DistributedType.FSDP, 2, "full", "adamw", None),
])
def test_what_fsdp_cannot_train_is_refused(monkeypatch, distributed, version, finetune, optimizer, named):
    accelerator = SimpleNamespace(distributed_type=distributed,
                                  state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    monkeypatch.setenv(sharding.FSDP_ENV, "true")
    why = sharding.fsdp_refusal(accelerator, finetune, optimizer)
    assert why is None if named is None else named in why
    monkeypatch.delenv(sharding.FSDP_ENV)
    assert sharding.fsdp_refusal(accelerator, finetune, optimizer) is None  # no FSDP config: nothing to refuse
