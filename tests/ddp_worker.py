"""One process of ``tests/test_ddp.py``'s ``accelerate launch``: trains the runs named in a JSON file.

Argument: a JSON file {"data": dir, "out": dir, "runs": [{"name", "overrides", "stop_after_steps"}]}. Each run
trains with ``fit`` into <out>/<name>/ (the paths every process is given); this process then writes, under
<out>/rank-<r>/, its final weights (<name>.safetensors) and a JSON report: the rows each of its units trained
(padding units excluded) and the files it wrote through ``fit`` (checkpoints, snapshots, out_dir).
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from prefdiff import catalog
from prefdiff.config import parse_params
from prefdiff.models.processes import process_state
from prefdiff.training import fit as fit_module
from prefdiff.training.methods.d3po import D3PO
from prefdiff.training.methods.diffusion_dpo import DiffusionDPO
from prefdiff.training.trainable import TrainableUNet

ROWS: list[int] = []  # items trained by this process, one entry per (unit, row)
WROTE: list[str] = []  # what this process wrote through fit


def counted(loss):
    def wrapper(self, unit):
        if not unit.padding:
            ROWS.extend(unit.rows.tolist())
        return loss(self, unit)
    return wrapper


def recorded(name, real):
    def wrapper(path, *args, **kwargs):
        WROTE.append(f"{name} {path}")
        return real(path, *args, **kwargs)
    return wrapper


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    D3PO.loss, DiffusionDPO.loss = counted(D3PO.loss), counted(DiffusionDPO.loss)
    fit_module.atomic_dir = recorded("atomic_dir", fit_module.atomic_dir)
    fit_module.save_checkpoint = recorded("save_checkpoint", fit_module.save_checkpoint)
    data, out = Path(spec["data"]), Path(spec["out"])
    report = []
    for run in spec["runs"]:
        params = parse_params(run["overrides"])
        rank = process_state(params).process_index
        ROWS.clear()
        WROTE.clear()
        model = TrainableUNet(params, need_reference_copy=catalog.resolve(catalog.TRAIN_METHODS[params.train.method])
                              .needs_reference_copy, progress=lambda _: None)
        summary = fit_module.fit(params, trajectories_dir=data / "traj", preferences_dir=data / "prefs",
                                 out_dir=out / run["name"] / "trained", checkpoint_dir=out / run["name"] / "ckpt",
                                 progress=lambda _: None, stop_after_steps=run.get("stop_after_steps"), model=model)
        mine = out / f"rank-{rank}"
        mine.mkdir(parents=True, exist_ok=True)
        save_file(model.weights(), str(mine / f"{run['name']}.safetensors"))
        report.append({"name": run["name"], "rows": list(ROWS), "wrote": list(WROTE), "items": summary.items,
                       "resumed_from_step": summary.resumed_from_step,
                               "processes": model.accelerator.num_processes,
                               "curve": summary.curve})
        (mine / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
