"""Processes share the evaluation's image generation: 2 CPU processes (``accelerate launch``, gloo) write the one
process's evaluation.

``tests/eval_worker.py`` runs ``evaluate_trained`` once as one plain process and once as 2 launched processes, with
the same thread count (OMP_NUM_THREADS=1), so the comparison is of the same calls on the same inputs: every file
(metrics/eval.json, the plots, samples.csv, the grids) must agree byte for byte, and report.html too but for the
row of its params table that shows ``evaluate.num_processes``. 3 digit prompts x 3 seeds = 9 images in batches
of 2: 5 batches per phase, the last one partial (process 0 runs 3 of them, 5 images; process 1 runs 2, 4 images),
in 3 phases (the base, an epoch snapshot and the trained model, both full UNets).
"""

import hashlib
import json
from pathlib import Path

import pytest

from conftest import run_worker

WORKER = str(Path(__file__).parent / "eval_worker.py")
PHASES = 3  # the baseline, epoch 1's snapshot, the trained model
SEEDS = list(range(1000, 1009))  # evaluate.seed 1000: prompt i, image j -> 1000 + 3i + j


def params(tmp: Path, processes: int) -> dict:
    return {
        "model": {"source": "builtin:tiny-sd", "device": "cpu"},
        "sampling": {"num_steps": 2},
        "train": {"epochs": 2},
        "label": {"source": "judge", "judge": "jpeg_compressibility", "judge_args": {}},
        "evaluate": {"prompt_set": "digits", "num_prompts": 3, "seeds_per_prompt": 3, "batch_size": 2,
                     "scorers": ["stroke_bold"],
                     "scorer_args": {"digit_alignment": {"classifier": str(tmp / "classifier.safetensors")}},
                     "grid_columns": 2, "reward_curve": True, "implicit_accuracy": False, "bootstrap_samples": 100,
                     "report": True, "num_processes": processes},
    }


def trained_model(tmp: Path) -> Path:
    """A fully fine-tuned tiny UNet stand-in and an epoch-1 snapshot (the base weights plus two noises: samples
    differ from the base's; a full UNet loads in milliseconds), and a random digit classifier."""
    import torch
    from safetensors.torch import save_file

    from prefdiff.models.finetuned import FULL_UNET_DIR
    from prefdiff.models.tiny import build_tiny_pipeline
    from prefdiff.scorers.digits import DigitClassifier

    torch.manual_seed(3)
    save_file(DigitClassifier(hidden=16).state_dict(), str(tmp / "classifier.safetensors"))
    trained = tmp / "trained"
    for seed, out in ((0, trained), (1, trained / "snapshots" / "epoch-0001")):
        unet = build_tiny_pipeline().unet
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        unet.save_pretrained(out / FULL_UNET_DIR)
    return trained


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """{processes: (workspace, [per-process report])} for 1 process and 2 launched ones."""
    tmp = tmp_path_factory.mktemp("evalshards")
    trained = trained_model(tmp)
    out = {}
    for processes in (1, 2):
        ws, report = tmp / f"ws-{processes}", tmp / f"report-{processes}"
        report.mkdir()
        spec = tmp / f"spec-{processes}.json"
        spec.write_text(json.dumps({"params": params(tmp, processes), "trained": str(trained), "workspace": str(ws),
                                    "report": str(report)}))
        run_worker(WORKER, spec, processes=processes, stage="evaluate")
        out[processes] = (ws, [json.loads((report / f"rank-{r}.json").read_text()) for r in range(processes)])
    return out


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_two_processes_write_the_one_process_evaluation_byte_for_byte(evaluated):
    one, two = tree(evaluated[1][0]), tree(evaluated[2][0])
    assert {"metrics/eval.json", "plots/reward_curve.csv", "plots/win_rate.csv", "plots/scorers.csv",
            "eval/samples.csv", "eval/grid.png", "eval/digits.png", "eval/report.html"} <= set(one)
    report = "eval/report.html"  # its params table shows the process count it ran with, the one difference
    assert {k: v for k, v in two.items() if k != report} == {k: v for k, v in one.items() if k != report}
    row = '<tr><td>evaluate.num_processes</td><td class="num">{}</td></tr>'
    html = [(evaluated[n][0] / report).read_text() for n in (1, 2)]
    assert html[0].count(row.format(1)) == 1 and html[0].replace(row.format(1), row.format(2)) == html[1]
    metrics = json.loads((evaluated[2][0] / "metrics/eval.json").read_text())
    assert metrics["num_samples"] == len(SEEDS) and "digit_accuracy" in metrics
    assert "num_processes" not in json.dumps(metrics["protocol"])  # how it ran is not what it measured
    assert len((evaluated[2][0] / "plots/reward_curve.csv").read_text().splitlines()) == 1 + PHASES
    samples = (evaluated[2][0] / "eval/samples.csv").read_text()
    assert len(set(samples.splitlines()[1:])) == len(SEEDS)  # the trained images are not the base's: rows differ


def test_each_process_generates_its_share_and_only_the_main_process_writes(evaluated):
    _, (main, other) = evaluated[2]
    assert (main["processes"], other["processes"]) == (2, 2)
    # every phase: batches 0, 2, 4 on process 0 and 1, 3 on process 1, each of the batch's seeds once
    batches = [SEEDS[i:i + 2] for i in range(0, len(SEEDS), 2)]
    assert main["generated"] == [batches[0], batches[2], batches[4]] * PHASES
    assert other["generated"] == [batches[1], batches[3]] * PHASES
    assert [line for line in main["progress"] if "generated by" in line] == [
        f"{label}: generated by 2 processes: 5 + 4 images" for label in ("base", "epoch 1", "trained")]
    assert main["returned"] and not other["returned"]
    assert other["wrote"] == [] and other["progress"] == []
    one = evaluated[1][1][0]
    assert one["processes"] == 1 and one["generated"] == batches * PHASES and one["returned"]
    assert sorted(main["wrote"]) == sorted(one["wrote"]) and "eval.json" in one["wrote"]
    assert not any("generated by" in line for line in one["progress"])
