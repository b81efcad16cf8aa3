"""Processes share every micro-batch: 2 CPU processes (``accelerate launch``, gloo) end where one process does.

One launch of ``tests/ddp_worker.py`` trains three runs in each of 2 processes; the test trains the same runs
in this process and compares. Tolerance: float sums run in another order with 2 processes (each process sums
its share's gradient, then DDP averages the two), so the weights agree to rounding, not bitwise:
|w2 - w1| <= 1e-4 x the largest weight change of the one-process run (AdamW with eps 1, whose update is about
lr x gradient, so a rounding difference is not amplified; a wrong scaling or a missing share moves the update
by far more). D3PO's reference pass is the exception: each process computes whole batches of the one-process
pass, so the table every process gathers is the one-process table bit for bit (one intra-op thread here, set
by the ``one_process`` fixture whatever OMP_NUM_THREADS says, and in the launched processes: the same kernels).
"""

import json
import subprocess
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from safetensors.torch import load_file

from conftest import venv_env
from prefdiff.config import parse_params
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.lora import LORA_WEIGHT_NAME
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.scorers import get_scorer
from prefdiff.training.fit import fit, shares, steps_per_epoch
from prefdiff.training.methods import d3po
from stages._common import free_port, launch_command

DATA = {"sample": {"num_prompts": 2, "images_per_group": 3, "batch_size": 6}, "sampling": {"num_steps": 4}}
# adam_eps 1 makes AdamW's update ~ lr x gradient: with a small eps it is lr x sign(g) for tiny components, and a
# float-order difference of 1e-7 in a gradient of 1e-9 would flip a full lr-sized step (measured: 9e-5 of 4e-2)
SHARED = {"lr": 1.0, "adam_eps": 1.0, "checkpoint_every": 1, "weight_decay": 0.0}
# (name, train overrides, stop after steps): D3PO with 2 rows per micro-batch (1 per process), the same run
# interrupted after one step (its resume is the next entry), Diffusion-DPO with micro-batches of 5 and 1 rows:
# shares of 3/2 and 1/0 (the second process pads the 1-row step's all-reducing backward with a weight-0 row).
D3PO = {"method": "d3po", "epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 2}
DPO = {"method": "diffusion_dpo", "epochs": 1, "batch_size": 5, "gradient_accumulation_steps": 1}
RUNS = [("d3po", D3PO, None), ("resumed", D3PO, 1), ("resumed", D3PO, None), ("dpo", DPO, None)]
REPO = Path(__file__).resolve().parents[1]  # the worker imports this checkout's prefdiff
NAMES = [name for name, _, _ in RUNS]
RTOL = 1e-4  # of the largest update
# (image, step) pairs per reference batch: 6 images x 4 steps in 4 batches, batches 0, 2 in process 0 and 1, 3 in
# process 1 (the default 64 would make one batch, all in process 0)
REFERENCE_BATCH = 6
THRESHOLDED = {"implicit_acc", "clip_frac"}  # counts of float comparisons: see the curve check


def overrides(train: dict, processes: int) -> dict:
    return DATA | {"train": SHARED | train | {"num_processes": processes}}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(data dir, launch dir, per-process reports): the runs trained by 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    sample_dataset(parse_params(DATA), root / "traj", progress=lambda _: None)
    label_trajectories(TrajectoryStore.open(root / "traj"), get_scorer("jpeg_compressibility"), root / "prefs",
                       progress=lambda _: None)
    spec = {"data": str(root), "out": str(root / "launched"), "reference_batch": REFERENCE_BATCH,
            "runs": [{"name": name, "overrides": overrides(train, 2), "stop_after_steps": stop}
                     for name, train, stop in RUNS]}
    (root / "spec.json").write_text(json.dumps(spec))
    command = launch_command("train", 2, environ={})
    assert command[-2:] == ["-m", "stages.train"] and "--num_processes" in command
    command = command[:-2] + ["--main_process_port", str(free_port()), str(Path(__file__).parent / "ddp_worker.py"),
                              str(root / "spec.json")]
    proc = subprocess.run(command, env=venv_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads((root / "launched" / f"rank-{r}" / "report.json").read_text()) for r in range(2)]
    return root, root / "launched", reports


def single(root: Path, out: Path, train: dict, stop=None):
    with patch.object(d3po, "REFERENCE_BATCH", REFERENCE_BATCH):  # the launched processes' reference batches
        return fit(parse_params(overrides(train, 1)), trajectories_dir=root / "traj", preferences_dir=root / "prefs",
                   out_dir=out / "trained", checkpoint_dir=out / "ckpt", progress=lambda _: None,
                   stop_after_steps=stop)


@pytest.fixture(scope="module")
def one_process(launched, tmp_path_factory):
    """name -> (summary, dir) of the runs trained by this one process."""
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # the launched processes' thread count (OMP_NUM_THREADS=1): their kernels, their bits
    try:
        for name, train in (("d3po", D3PO), ("dpo", DPO)):
            out = tmp_path_factory.mktemp(f"one-{name}")
            runs[name] = single(launched[0], out, train), out
    finally:
        torch.set_num_threads(threads)
    return runs


def assert_close(two: dict, one: dict, update: float) -> None:
    assert two.keys() == one.keys()
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert worst <= RTOL * update, (worst, update)


@pytest.mark.parametrize(("name", "train"), [("d3po", D3PO), ("dpo", DPO)])
def test_two_processes_train_the_one_process_update(launched, one_process, name, train):
    _, out, reports = launched
    one, one_dir = one_process[name]
    weights = [load_file(str(out / f"rank-{r}" / f"{name}.safetensors")) for r in range(2)]
    for key in weights[0]:  # DDP keeps the processes' weights identical
        assert torch.equal(weights[0][key], weights[1][key]), key
    trained = load_file(str(one_dir / "trained" / LORA_WEIGHT_NAME))
    moved = max(float(v.abs().max()) for k, v in trained.items() if "lora.up" in k)  # up weights start at 0
    assert moved > 1e-4  # the comparison below is not between two untrained LoRAs
    assert_close(load_file(str(out / name / "trained" / LORA_WEIGHT_NAME)), trained, moved)
    # the logged curve (metrics reduced over processes) is the one process's; abs 1e-5: D3PO's mean_log_ratio
    # (~4e-6 here) is a difference of log-probs of magnitude ~1e2, whose float32 rounding is ~1e-5. Not compared:
    # the thresholded counts (implicit_acc: the share of margins > 0; clip_frac: of ratios outside the clip), which
    # flip on margins of float-rounding size: at the first step policy = reference, every margin is 0 in the one
    # process and +-1e-9 in a share computed in a smaller batch (measured: 0 against 0.4375)
    curve = reports[0][NAMES.index(name)]["curve"]
    assert [row["step"] for row in curve] == [row["step"] for row in one.curve]
    for two_row, one_row in zip(curve, one.curve):
        for key, value in one_row.items():
            if key not in THRESHOLDED:
                assert two_row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_each_process_trains_its_share_of_every_micro_batch(launched):
    _, _, reports = launched
    for name, train, _ in (RUNS[0], RUNS[3]):
        report = [r[NAMES.index(name)] for r in reports]
        items = report[0]["items"]
        tp = parse_params(overrides(train, 2)).train
        units = 4 if name == "d3po" else 1  # D3PO: every item at all 4 timesteps (timestep_fraction 1)
        batches, _ = steps_per_epoch(items, tp)
        sizes = [min(tp.batch_size, items - b * tp.batch_size) for b in range(batches)]
        expected = [sum(len(shares(n, 2)[r]) for n in sizes) * units * tp.epochs for r in range(2)]
        assert [len(r["rows"]) for r in report] == expected
        assert sorted(report[0]["rows"] + report[1]["rows"]) == sorted(list(range(items)) * units * tp.epochs)
        if name == "d3po":  # 2 rows per micro-batch: exactly half of the items each
            assert expected[0] == expected[1] == items * units * tp.epochs // 2


def test_each_process_computes_half_of_the_reference_pass_and_holds_the_one_process_table(launched, one_process):
    """D3PO's reference log-probs: process r computes reference batches r, r + 2, ... of the one-process pass, and
    every process ends with the whole table, equal bit for bit to the one that one process computes."""
    _, out, reports = launched
    computed = [r[NAMES.index("d3po")]["reference"] for r in reports]
    one_table = load_file(str(one_process["d3po"][1] / "ckpt" / "state" / "state.safetensors"))["precomputed.ref_logp"]
    images, steps = one_table.shape
    pairs = [[i, j] for i in range(images) for j in range(steps)]
    batches = [pairs[k : k + REFERENCE_BATCH] for k in range(0, len(pairs), REFERENCE_BATCH)]
    assert len(batches) == 4
    for rank in range(2):
        assert computed[rank] == [p for batch in batches[rank::2] for p in batch]  # half each, whole batches
        table = load_file(str(out / f"rank-{rank}" / "d3po-precomputed.safetensors"))["ref_logp"]
        assert torch.equal(table, one_table), float((table - one_table).abs().max())
    # the resumed run read the table from the checkpoint: no process recomputed any of it
    assert [r[NAMES.index("resumed") + 1]["reference"] for r in reports] == [[], []]


def test_only_the_main_process_writes(launched):
    _, out, reports = launched
    for run in range(len(RUNS)):
        assert reports[0][run]["wrote"] and not reports[1][run]["wrote"]
    assert (out / "d3po" / "trained" / "snapshots" / "epoch-0002").is_dir()


def test_a_run_interrupted_under_two_processes_resumes_to_the_uninterrupted_weights(launched):
    _, out, reports = launched
    assert [r[NAMES.index("resumed") + 1]["resumed_from_step"] for r in reports] == [1, 1]  # every process loaded it
    final = load_file(str(out / "resumed" / "trained" / LORA_WEIGHT_NAME))
    uninterrupted = load_file(str(out / "d3po" / "trained" / LORA_WEIGHT_NAME))
    for key in final:  # the same processes and calls in the same order: the same bits
        assert torch.equal(final[key], uninterrupted[key]), key
