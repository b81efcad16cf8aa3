"""One process of ``tests/test_ddp.py``'s ``accelerate launch``: trains the runs named in a JSON file.

Argument: a JSON file {"data": dir, "out": dir, "reference_batch": n, "runs": [{"name", "overrides",
"stop_after_steps"}]}. Each run trains with ``fit`` into <out>/<name>/ (the paths every process is given), D3PO's
reference pass in batches of ``reference_batch`` (image, step) pairs; this process then writes, under
<out>/rank-<r>/, its final weights (<name>.safetensors), the reference table it holds after D3PO's precompute
(<name>-precomputed.safetensors, when the run computed one) and a JSON report: the rows each of its units trained
(padding units excluded), the (image, step) pairs of the reference pass it computed itself and the files it
wrote through ``fit`` (checkpoints, snapshots, out_dir).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from prefdiff import catalog
from prefdiff.config import parse_params
from prefdiff.models.processes import process_state
from prefdiff.training import fit as fit_module
from prefdiff.training import trajectory
from prefdiff.training.methods import d3po
from prefdiff.training.methods.d3po import D3PO
from prefdiff.training.methods.diffusion_dpo import DiffusionDPO
from prefdiff.training.trainable import TrainableUNet

ROWS: list[int] = []  # items trained by this process, one entry per (unit, row)
WROTE: list[str] = []  # what this process wrote through fit
REFERENCE: list[list[int]] = []  # (image, step) pairs of the reference pass computed by this process
PRECOMPUTED: dict = {}  # the table D3PO's precompute returned in this process


def counted(loss):
    def wrapper(self, unit):
        if not unit.padding:
            ROWS.extend(unit.rows.tolist())
        return loss(self, unit)
    return wrapper


def reference_counted(step_log_probs):
    """The reference pass is the no-grad ``step_log_probs`` calls (the policy's run with gradients)."""
    def wrapper(unet, scheduler, chain, timesteps, embeds, uncond, rows, step_index, **kwargs):
        if not torch.is_grad_enabled():
            REFERENCE.extend([int(i), int(j)] for i, j in zip(rows, step_index))
        return step_log_probs(unet, scheduler, chain, timesteps, embeds, uncond, rows, step_index, **kwargs)
    return wrapper


def kept(precompute):
    def wrapper(self):
        PRECOMPUTED.update(precompute(self))
        return PRECOMPUTED
    return wrapper


def recorded(name, real):
    def wrapper(path, *args, **kwargs):
        WROTE.append(f"{name} {path}")
        return real(path, *args, **kwargs)
    return wrapper


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    D3PO.loss, DiffusionDPO.loss = counted(D3PO.loss), counted(DiffusionDPO.loss)
    D3PO.precompute = kept(D3PO.precompute)
    trajectory.step_log_probs = reference_counted(trajectory.step_log_probs)
    d3po.REFERENCE_BATCH = spec["reference_batch"]
    fit_module.atomic_dir = recorded("atomic_dir", fit_module.atomic_dir)
    fit_module.save_checkpoint = recorded("save_checkpoint", fit_module.save_checkpoint)
    data, out = Path(spec["data"]), Path(spec["out"])
    report = []
    for run in spec["runs"]:
        params = parse_params(run["overrides"])
        rank = process_state(params).process_index
        ROWS.clear()
        WROTE.clear()
        REFERENCE.clear()
        PRECOMPUTED.clear()
        model = TrainableUNet(params, need_reference_copy=catalog.resolve(catalog.TRAIN_METHODS[params.train.method])
                              .needs_reference_copy, progress=lambda _: None)
        summary = fit_module.fit(params, trajectories_dir=data / "traj", preferences_dir=data / "prefs",
                                 out_dir=out / run["name"] / "trained", checkpoint_dir=out / run["name"] / "ckpt",
                                 progress=lambda _: None, stop_after_steps=run.get("stop_after_steps"), model=model)
        mine = out / f"rank-{rank}"
        mine.mkdir(parents=True, exist_ok=True)
        save_file(model.weights(), str(mine / f"{run['name']}.safetensors"))
        if PRECOMPUTED:
            save_file(PRECOMPUTED, str(mine / f"{run['name']}-precomputed.safetensors"))
        report.append({"name": run["name"], "rows": list(ROWS), "wrote": list(WROTE), "reference": list(REFERENCE), "items": summary.items,
                       "resumed_from_step": summary.resumed_from_step,
                               "processes": model.accelerator.num_processes,
                               "curve": summary.curve})
        (mine / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
