"""One process of ``tests/test_eval_shards.py``'s ``accelerate launch``: ``evaluate_trained`` on the spec's workspace.

Argument: a JSON file {"params": {...}, "trained": dir, "workspace": dir, "report": dir}. Every process evaluates
``trained`` into ``workspace`` (the same paths everywhere); this process then writes <report>/rank-<r>.json: the
seeds it generated itself (per ``generate`` call), the files it wrote, its progress lines and whether it returned
the metrics.
"""

import json
import sys
from pathlib import Path

from evaluation import evaluate, grid
from prefdiff.config import parse_params
from prefdiff.data import atomic
from prefdiff.models.processes import process_state
from prefdiff.paths import Paths
from prefdiff.sampling import sampler

GENERATED: list[list[int]] = []  # the seeds of each generate call of this process
WROTE: list[str] = []  # the names of the files this process wrote (every output goes through atomic_write_bytes)


def counted(generate):
    def wrapper(pipe, prompts, seeds, *args, **kwargs):
        GENERATED.append(list(seeds))
        return generate(pipe, prompts, seeds, *args, **kwargs)
    return wrapper


def recorded(write):
    def wrapper(path, data):
        WROTE.append(Path(path).name)
        return write(path, data)
    return wrapper


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sampler.generate = counted(sampler.generate)
    atomic.atomic_write_bytes = grid.atomic_write_bytes = recorded(atomic.atomic_write_bytes)
    params = parse_params(spec["params"])
    lines: list[str] = []
    result = evaluate.evaluate_trained(params, Path(spec["trained"]), Paths(Path(spec["workspace"])),
                                       progress=lines.append)
    state = process_state(params)
    report = {"processes": state.num_processes, "generated": GENERATED, "wrote": WROTE, "progress": lines,
              "returned": result is not None}
    (Path(spec["report"]) / f"rank-{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
