"""One process of ``tests/test_sample_shards.py``'s ``accelerate launch``: samples the datasets a JSON file names.

Argument: a JSON file {"out": dir, "runs": [{"name", "overrides"}]}. Each run samples with ``sample_dataset`` into
<out>/<name>/ (the path every process is given); this process then writes <out>/rank-<r>.json: per run, the
seeds of the groups it sampled itself and the datasets it opened a writer for.
"""

import json
import sys
from pathlib import Path

from prefdiff.config import parse_params
from prefdiff.data import trajectories
from prefdiff.models.processes import process_state
from prefdiff.sampling import dataset, sampler

SAMPLED: list[int] = []  # seeds of the groups this process sampled
WROTE: list[str] = []  # the datasets this process opened a TrajectoryWriter for


def counted(sample_groups):
    def wrapper(pipe, prompts, seeds, *args, **kwargs):
        for group in sample_groups(pipe, prompts, seeds, *args, **kwargs):
            SAMPLED.append(group.seed)
            yield group
    return wrapper


class RecordedWriter(trajectories.TrajectoryWriter):
    def __init__(self, out_dir, **kwargs):
        WROTE.append(str(out_dir))
        super().__init__(out_dir, **kwargs)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sampler.sample_groups = counted(sampler.sample_groups)
    trajectories.TrajectoryWriter = RecordedWriter
    out = Path(spec["out"])
    report = {}
    for run in spec["runs"]:
        params = parse_params(run["overrides"])
        SAMPLED.clear()
        WROTE.clear()
        dataset.sample_dataset(params, out / run["name"], progress=lambda _: None)
        report[run["name"]] = {"sampled": list(SAMPLED), "wrote": list(WROTE),
                               "processes": process_state(params).num_processes}
    rank = process_state(params).process_index
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
