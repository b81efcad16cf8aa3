"""One process of ``tests/test_rounds_shards.py``'s runs: ``run_rounds`` on the workspaces a JSON file names.

Argument: a JSON file {"runs": [{"params": {...}, "workspace": dir}], "report": dir}. Every process runs each run
in turn (the same workspace paths everywhere); this process then writes <report>/rank-<r>.json: per run, the seeds
of every ``sample_groups`` call it made itself with the call's group size (2: the round's groups, 1: the
evaluation's images), the workspace files it created, replaced or removed (Python's audit events), its progress
lines, what it printed, and whether it returned the result.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

from prefdiff.config import parse_params
from prefdiff.models.processes import process_state
from prefdiff.rounds.loop import run_rounds
from prefdiff.sampling import sampler

SAMPLED: list[list] = []  # [group size, seeds] of each sample_groups call of this process
WROTE: list[str] = []  # workspace paths this process opened for writing, renamed, made or removed
WORKSPACE: list[str] = []  # the run's workspace, as audited
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def counted(sample_groups):
    def wrapper(pipe, prompts, seeds, size, *args, **kwargs):
        SAMPLED.append([size, list(seeds)])
        yield from sample_groups(pipe, prompts, seeds, size, *args, **kwargs)
    return wrapper


def audit(event: str, args: tuple) -> None:
    """Record what touches the workspace: files opened to write (``open``: a mode string or os.open flags),
    renames and replacements (atomic writes), directories made, files and trees removed."""
    if not WORKSPACE:
        return
    if event == "open" and isinstance(args[0], str | os.PathLike):
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        paths = [args[0]] if writes else []
    elif event == "os.rename":  # os.replace too: the destination is what an atomic write writes
        paths = [args[1]]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        paths = [args[0]]
    else:
        return
    WROTE.extend(str(p) for p in paths if str(p).startswith(WORKSPACE[0]))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sampler.sample_groups = counted(sampler.sample_groups)
    sys.addaudithook(audit)
    report = []
    for run in spec["runs"]:
        params = parse_params(run["params"])
        SAMPLED.clear()
        WROTE.clear()
        WORKSPACE[:] = [str(Path(run["workspace"]).resolve())]
        lines: list[str] = []
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = run_rounds(params, Path(run["workspace"]), progress=lines.append)
        WORKSPACE.clear()
        report.append({"sampled": list(SAMPLED), "wrote": list(WROTE), "progress": lines,
                       "printed": printed.getvalue(), "returned": result is not None,
                       "processes": process_state(params).num_processes})
    rank = process_state(params).process_index
    (Path(spec["report"]) / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
