"""Processes share the prompt groups: 2 CPU processes (``accelerate launch``, gloo) write one process's dataset.

``tests/sample_worker.py`` samples two datasets once as one plain process and once as 2 launched processes, with
the same thread count (OMP_NUM_THREADS=1), so the comparison is of the same calls on the same inputs: the files
must agree byte for byte. "even": 8 groups in 4 batches (2 each process); "odd": 9 groups in 5 batches, the last
one partial (5 and 4 groups); small shards, so groups straddle shards.
"""

import hashlib
import json
from pathlib import Path

import pytest

from conftest import run_worker
from prefdiff.config import parse_params
from prefdiff.sampling.dataset import group_seed

MODEL = {"sampling": {"num_steps": 3}}
RUNS = {
    "even": MODEL | {"sample": {"prompt_set": "digits", "num_prompts": 4, "groups_per_prompt": 2,
                                "images_per_group": 2, "batch_size": 4, "shard_size": 3}},
    "odd": MODEL | {"sample": {"prompt_set": "digits", "num_prompts": 3, "groups_per_prompt": 3,
                               "images_per_group": 3, "batch_size": 7, "shard_size": 4}},
}
WORKER = str(Path(__file__).parent / "sample_worker.py")


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """{processes: (out dir, [per-process report])} for 1 process and 2 launched ones."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for processes in (1, 2):
        spec = root / f"spec-{processes}.json"
        spec.write_text(json.dumps({"out": str(root / str(processes)),
                                    "runs": [{"name": name, "overrides": o} for name, o in RUNS.items()]}))
        run_worker(WORKER, spec, processes=processes, stage="sample")
        reports = [json.loads((root / str(processes) / f"rank-{r}.json").read_text()) for r in range(processes)]
        out[processes] = (root / str(processes), reports)
    return out


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_write_the_one_process_dataset_byte_for_byte(sampled, name):
    one, two = tree(sampled[1][0] / name), tree(sampled[2][0] / name)
    sample = parse_params(RUNS[name]).sample
    groups = sample.num_prompts * sample.groups_per_prompt
    assert len([f for f in one if f.startswith("images/")]) == groups * sample.images_per_group
    assert len([f for f in one if f.startswith("shard-")]) > 1
    assert two == one
    index = json.loads((sampled[2][0] / name / "index.json").read_text())
    assert "num_processes" not in index["params"]["sample"]  # how it ran is not what it sampled
    assert not list(sampled[2][0].glob(f"{name}.tmp-*"))


@pytest.mark.parametrize(("name", "shares"), [("even", [4, 4]), ("odd", [5, 4])])
def test_each_process_samples_its_share_and_only_the_main_process_writes(sampled, name, shares):
    out, reports = sampled[2]
    assert [r[name]["processes"] for r in reports] == [2, 2]
    assert [len(r[name]["sampled"]) for r in reports] == shares
    sample = parse_params(RUNS[name]).sample
    seeds = [group_seed(sample.seed, i) for i in range(sample.num_prompts * sample.groups_per_prompt)]
    assert sorted(reports[0][name]["sampled"] + reports[1][name]["sampled"]) == seeds  # each group once
    assert reports[0][name]["wrote"] == [str(out / name)] and reports[1][name]["wrote"] == []
    one = sampled[1][1][0][name]
    assert one["processes"] == 1 and one["sampled"] == seeds and one["wrote"] == [str(sampled[1][0] / name)]
