"""A real ``dvc repro`` whose sample, train and evaluate stages relaunch themselves as 2 processes ends where a
one-process ``dvc repro`` of the same pipeline does.

Two workspaces (conftest's ``make_workspace`` with ``TINY_OVERRIDES``: the digits model, 4 DDIM steps), both with
5 prompts, ``sample.batch_size`` 4 (2 groups a batch: 3 batches, the last partial), ``evaluate.batch_size`` 3 (2
prompts x 2 seeds: batches of 3 and 1) and test_ddp's AdamW settings (eps 1, lr 1, no weight decay), run with
OMP_NUM_THREADS=1 (the same kernels and thread count in every process of both runs). ``two`` sets
``sample.num_processes``, ``train.num_processes`` and ``evaluate.num_processes`` to 2 and runs ``dvc repro``: each of
the three stages relaunches itself under ``accelerate launch --multi_gpu --num_processes 2`` (CPU processes over
gloo; ``stages/_common.py`` ``relaunch``). ``one`` keeps 1 process: ``dvc repro train heldout``, then ``two``'s
``models/trained`` is put in place of its own (``dvc commit -f train``) and ``dvc repro evaluate`` evaluates the
same LoRA with one process. Checked:

- each of the three stages printed its relaunch line once, with 2 processes, and the others none; the processes'
  shares in numbers: sampling gathered 4 then 5 of 5 groups (batches 0 and 1 in round 1, batch 2 alone in round
  2; one process reports 2, 4, 5), each model's evaluation images were generated 3 + 1; only process 0 printed;
- the sampled dataset, the labeled pairs and the held-out pairs are the one process's byte for byte (each file's
  sha256 and dvc.lock's directory hashes);
- the trained LoRA and both epoch snapshots are the one process's within test_ddp's tolerance, |w2 - w1| <= 1e-4 x
  the largest weight change of the one-process run (the gradient of each micro-batch is summed in 2 shares and
  averaged by DDP, another float order; AdamW with eps 1 keeps a rounding difference at rounding size), and the
  training curve within 1e-5 but for the thresholded counts (as test_ddp);
- given the same LoRA, the evaluation (metrics/eval.json, the plots, samples.csv, the grids) is the one process's
  byte for byte, report.html too but for its params table's ``<stage>.num_processes`` rows of the three stages;
- ``dvc status`` of the two-process workspace is clean.

167 s and 182 s (pytest's time) in two runs on 2 cores shared with another session (``OMP_NUM_THREADS=1 pytest
tests/test_repro_processes.py``): two pipelines, each stage paying its imports, the launched ones three times.
Each launched stage rendezvouses on a free port ``launch_command`` picks.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, make_workspace, venv_env
from prefdiff.profile import merged
from test_ddp import RTOL, SHARED, THRESHOLDED

DVC = str(Path(sys.executable).parent / "dvc")
LAUNCHED = ("sample", "train", "evaluate")  # the stages that relaunch themselves with num_processes > 1
DATA = ("data/trajectories", "data/preferences", "data/heldout")
EVAL_FILES = ("metrics/eval.json", "plots/reward_curve.csv", "plots/win_rate.csv", "plots/scorers.csv",
              "eval/samples.csv", "eval/grid.png", "eval/digits.png", "eval/report.html")
PHASES = ("base", "epoch 1", "trained")  # the models evaluate samples: baseline, epoch 1's snapshot, the trained LoRA


def overrides(processes: int) -> dict:
    """TINY_OVERRIDES with 5 prompts (5 pairs: train micro-batches of 2, 2 and 1 rows, shares 1/1 and 1/0), sample
    batches of 2 groups and evaluate batches of 3 images (both with a partial last batch), test_ddp's optimizer."""
    return merged(TINY_OVERRIDES, {
        "sample": {"num_prompts": 5, "batch_size": 4, "num_processes": processes},
        "train": {**SHARED, "num_processes": processes},
        "evaluate": {"batch_size": 3, "num_processes": processes},
    })


def _env(ws: Path) -> dict[str, str]:
    env = venv_env({"MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"})
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "PREFDIFF_ACCELERATE_CONFIG",
                "LOCAL_RANK"):  # the default launch (--multi_gpu, one machine), not a config or an outer launcher
        env.pop(key, None)
    return env


def _dvc(ws: Path, *args: str) -> str:
    """``dvc <args>`` in ``ws``; its stdout: DVC's lines and the stages' prints (the progress bars and warnings go to
    stderr). A non-zero exit fails with the tail of both."""
    proc = subprocess.run([DVC, *args], cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def by_stage(log: str) -> dict[str, list[str]]:
    """Each stage's lines of a ``dvc repro`` log (DVC prints ``Running stage '<name>':`` before each)."""
    out: dict[str, list[str]] = {}
    stage = None
    for line in log.splitlines():
        found = re.match(r"Running stage '(\w+)'", line)
        if found:
            stage = found.group(1)
            out[stage] = []
        elif stage is not None:
            out[stage].append(line.strip())
    return out


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def lock_outs(ws: Path) -> dict[str, str]:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two, one, logs): the workspaces and their ``dvc repro`` logs by stage (``one``: both of its calls)."""
    root = tmp_path_factory.mktemp("repro-processes")
    two = make_workspace(root / "two", overrides(2))
    two_log = by_stage(_dvc(two, "repro"))
    one = make_workspace(root / "one", overrides(1))
    one_log = by_stage(_dvc(one, "repro", "train", "heldout"))
    shutil.copytree(one / "models/trained", root / "one-trained")  # its own LoRA, for the training comparison
    shutil.rmtree(one / "models/trained")
    shutil.copytree(two / "models/trained", one / "models/trained")
    _dvc(one, "commit", "-f", "train")  # the lock now names two's LoRA as train's output: evaluate reads it
    evaluated = by_stage(_dvc(one, "repro", "evaluate"))
    assert list(evaluated) == ["evaluate"], list(evaluated)  # upstream up to date: only evaluate ran
    return two, one, {"two": two_log, "one": one_log | evaluated, "one_trained": root / "one-trained"}


def test_sample_train_and_evaluate_relaunch_as_two_processes_and_share_the_work(runs):
    _, _, logs = runs
    two, one = logs["two"], logs["one"]
    assert list(two) == ["sample", "label", "train", "heldout", "evaluate", "register"]
    for stage, lines in two.items():
        relaunched = [line for line in lines if line.startswith(f"{stage}: ") and " processes: " in line]
        if stage in LAUNCHED:  # each launch on a free port of its own, not accelerate's fixed 29500
            assert len(relaunched) == 1 and re.fullmatch(
                f"{stage}: 2 processes: -m accelerate.commands.launch --num_processes 2 --multi_gpu --num_machines 1 "
                rf"--dynamo_backend no --mixed_precision no --main_process_port (\d+) -m stages\.{stage}",
                relaunched[0]), relaunched
        else:
            assert relaunched == [], stage
    for stage, lines in one.items():
        assert not any(" processes" in line for line in lines), (stage, lines)

    # sample: 5 groups in batches of 2; round 1 gathers batches 0 (process 0) and 1 (process 1), round 2 batch 2
    sampled = [re.sub(r" \(.*", "", line) for line in two["sample"] if line.startswith("sampled ")]
    assert sampled == ["sampled 4/5 groups", "sampled 5/5 groups"]
    assert [re.sub(r" \(.*", "", line) for line in one["sample"] if line.startswith("sampled ")] == [
        "sampled 2/5 groups", "sampled 4/5 groups", "sampled 5/5 groups"]
    assert sum(line.startswith("sampling 5 groups x 2 images") and line.endswith(" in 2 processes")
               for line in two["sample"]) == 1

    # train: 5 pairs, micro-batches of 2 -> 3 optimizer steps an epoch, 2 epochs; each step printed once
    # (only process 0 prints), as in one process
    steps = [line.split(" epoch")[0] for line in two["train"] if line.startswith("step ")]
    assert steps == [f"step {k}/6" for k in range(1, 7)]
    assert [line.split(" epoch")[0] for line in one["train"] if line.startswith("step ")] == steps
    assert sum(line.startswith("d3po: 5 pairs, 2 epochs x 3 optimizer steps") for line in two["train"]) == 1

    # evaluate: 2 prompts x 2 seeds in batches of 3: process 0 generates batch 0 (3 images), process 1 batch 1 (1)
    assert [line for line in two["evaluate"] if "generated by" in line] == [
        f"{phase}: generated by 2 processes: 3 + 1 images" for phase in PHASES]
    assert [line.split(" (")[0] for line in two["evaluate"] if re.match(r"(base|epoch 1|trained): 4 samples", line)] \
        == [line.split(" (")[0] for line in one["evaluate"] if re.match(r"(base|epoch 1|trained): 4 samples", line)]
    assert sum(line.startswith("evaluate: trained ") for line in two["evaluate"]) == 1


def test_the_datasets_are_the_one_process_datasets_byte_for_byte(runs):
    two, one, _ = runs
    for data in DATA:
        files = tree(two / data)
        assert files and files == tree(one / data), data
    assert len([f for f in tree(two / "data/trajectories") if f.endswith(".png")]) == 10  # 5 groups x 2 images
    assert {k: v for k, v in lock_outs(two).items() if k in DATA} == {k: v for k, v in lock_outs(one).items()
                                                                      if k in DATA}
    index = json.loads((two / "data/trajectories/index.json").read_text())
    assert "num_processes" not in json.dumps(index["params"])  # how it ran is not what it sampled


def test_two_processes_train_the_one_process_lora_within_the_ddp_tolerance(runs):
    two, _, logs = runs
    one_dir = logs["one_trained"]
    files = sorted(str(p.relative_to(one_dir)) for p in one_dir.rglob("*.safetensors"))
    assert files == sorted(str(p.relative_to(two / "models/trained")) for p in
                           (two / "models/trained").rglob("*.safetensors"))
    assert len(files) == 3  # the final LoRA and the snapshots of epochs 1 and 2
    final = load_file(str(one_dir / "pytorch_lora_weights.safetensors"))
    moved = max(float(v.abs().max()) for k, v in final.items() if "lora.up" in k)  # up weights start at 0
    assert moved > 1e-4  # the comparison is not between two untrained LoRAs
    for name in files:
        w1, w2 = load_file(str(one_dir / name)), load_file(str(two / "models/trained" / name))
        assert w1.keys() == w2.keys()
        worst = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
        assert worst <= RTOL * moved, (name, worst, moved)
    # the logged curve (metrics reduced over processes) within 1e-5, as test_ddp; not the thresholded counts
    curves = [list(csv_rows(ws / "plots/train.csv")) for ws in (two, runs[1])]
    assert [row["step"] for row in curves[0]] == [row["step"] for row in curves[1]] == [str(k) for k in range(1, 7)]
    for two_row, one_row in zip(*curves):
        for key, value in one_row.items():
            if key not in THRESHOLDED:
                assert float(two_row[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-5), key


def csv_rows(path: Path):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    for line in lines[1:]:
        yield dict(zip(header, line.split(",")))


def test_evaluate_of_the_same_lora_is_the_one_process_evaluation_byte_for_byte(runs):
    two, one, _ = runs
    assert tree(two / "models/trained") == tree(one / "models/trained")  # the same LoRA evaluated
    report = "eval/report.html"  # its params table shows the process counts it ran with, the one difference
    for name in EVAL_FILES:
        if name != report:
            assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert set(tree(two / "eval")) == set(tree(one / "eval"))
    html = [(ws / report).read_text() for ws in (one, two)]
    for stage in LAUNCHED:  # the report's params table lists the whole params.yaml
        row = f'<tr><td>{stage}.num_processes</td><td class="num">{{}}</td></tr>'
        assert html[0].count(row.format(1)) == 1 and html[1].count(row.format(2)) == 1, stage
        html[0] = html[0].replace(row.format(1), row.format(2))
    assert html[0] == html[1]
    metrics = json.loads((two / "metrics/eval.json").read_text())
    assert metrics["num_samples"] == 4 and "digit_accuracy" in metrics
    assert len((two / "plots/reward_curve.csv").read_text().splitlines()) == 1 + len(PHASES)


def test_dvc_status_of_the_two_process_workspace_is_clean(runs):
    two, _, _ = runs
    proc = subprocess.run([DVC, "status", "--json"], cwd=two, env=_env(two), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {}
