"""Stage ``train``: the method ``train.method`` names (D3PO, Diffusion-DPO, SFT, reward-weighted, DDPO).

Reads params ``model``, ``sampling``, ``train`` (its shared keys and ``train.<method>``); reads ``data/trajectories`` and ``data/preferences``;
writes ``models/trained`` (final LoRA, or the full UNet under ``unet/``, plus epoch snapshots),
``metrics/train.json``, ``plots/train.csv``; keeps resumable checkpoints in ``models/checkpoints``
(persistent: an interrupted run resumes).

``train.num_processes`` N > 1: the stage relaunches itself as N processes under ``accelerate launch`` (the
command DVC runs stays ``python -m stages.train``); they share every micro-batch, and only the main process
writes the outputs, the checkpoints and the MLflow entries. ``PREFDIFF_ACCELERATE_CONFIG`` names an accelerate
config file to launch with (``deploy/accelerate/``: FSDP, several nodes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from stages._common import load_or_exit, refuse, relaunch, run_stage, say, tracked, workspace

if TYPE_CHECKING:
    from prefdiff.config import Params


def refusal(params: Params) -> str | None:
    """Why this stage cannot train with ``params`` (None: it can). One round starts from ``train.init_lora``,
    so a previous-round reference without one would silently be the base (the rounds stage has its own)."""
    tp = params.train
    if tp.reference == "previous_round" and not tp.init_lora:
        return ("train.reference = 'previous_round' needs train.init_lora in the train stage (the LoRA the round "
                "starts from); allowed: set train.init_lora, or train.reference: base")
    return None


@contextmanager
def silent_run():
    """What a process other than the main one has instead of an MLflow run: nothing is logged."""
    yield None


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    why = refusal(params)
    if why is not None:
        refuse(why)
    relaunch("train", params.train.num_processes, mixed_precision=params.train.mixed_precision)
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore

    # the input datasets' indexes and headers, before the model loads (fit verifies the bytes as it reads)
    preferences = PreferenceStore.open(paths.preferences)
    if preferences.source_kind == "trajectories":
        TrajectoryStore.open(paths.trajectories, verify=False)
    else:  # imported pairs: every image shard exists and its header holds the images the index lists
        preferences.image_pairs(verify=False)
    from prefdiff.data.atomic import atomic_write_json, atomic_write_text
    from prefdiff.models.processes import process_state
    from prefdiff.training.fit import fit

    main_process = process_state(params).is_main_process
    with tracked("train", params, paths, ("train",)) if main_process else silent_run() as log_metrics:
        summary = fit(params, trajectories_dir=paths.trajectories, preferences_dir=paths.preferences,
                      out_dir=paths.trained, checkpoint_dir=paths.checkpoints, log_metrics=log_metrics, progress=say)
        if not main_process:
            return
        paths.train_plot.parent.mkdir(parents=True, exist_ok=True)
        paths.train_metrics.parent.mkdir(parents=True, exist_ok=True)
        fields = list(summary.curve[0]) if summary.curve else ["step"]
        lines = [",".join(fields)] + [",".join(str(row.get(k, "")) for k in fields) for row in summary.curve]
        atomic_write_text(paths.train_plot, "\n".join(lines) + "\n")
        atomic_write_json(paths.train_metrics, summary.metrics())
        log_metrics({f"train/final_{k}": v for k, v in summary.final.items()})


if __name__ == "__main__":
    run_stage(main)
