"""Stage ``sample``: draw G-image groups per prompt with the base model, storing full DDIM trajectories.

Reads params ``model``, ``sampling``, ``sample`` and ``label.source``; with ``sample.lora`` the policy that
samples is the base with that LoRA loaded (a stage-based round r puts round r-1's LoRA in ``models/policy``,
a dependency of this stage, and sets ``sample.lora: models/policy``); writes ``data/trajectories``
(safetensors shards, index.json, PNGs). When ``label.source`` imports its pairs (``pickapic``) nothing
reads sampled chains, so none are drawn: the directory then holds only ``not_sampled.json`` with the reason
(DVC 3 cannot make the label stage's dependencies conditional on a param value, see the README).

``sample.num_processes`` N > 1: the stage relaunches itself as N processes under ``accelerate launch``, as the
train stage does (``PREFDIFF_ACCELERATE_CONFIG`` too); they share the prompt groups, and only the main process
writes the dataset (the one process's, byte for byte) and the MLflow entries.
"""

from __future__ import annotations

from stages._common import load_or_exit, relaunch, run_stage, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    if params.label.source != "pickapic":  # nothing to share when nothing is sampled
        relaunch("sample", params.sample.num_processes)
    from prefdiff.data.trajectories import TrajectoryStore, write_not_sampled
    from prefdiff.models.processes import process_state
    from prefdiff.sampling.dataset import sample_dataset

    main_process = process_state(params).is_main_process
    if not main_process:  # one of the launched processes: its share of the groups goes to the main process
        if params.label.source != "pickapic":
            sample_dataset(params, paths.trajectories, progress=say)
        return
    with tracked("sample", params, paths, ("model", "sampling", "sample")) as log_metrics:
        if params.label.source == "pickapic":
            reason = (f"label.source is {params.label.source!r}: the label stage imports image pairs and "
                      "never reads sampled chains")
            write_not_sampled(paths.trajectories, reason)
            say(f"sample: no trajectories sampled ({reason})")
            log_metrics({"sample/groups": 0, "sample/images": 0})
            return
        sample_dataset(params, paths.trajectories, progress=say)
        store = TrajectoryStore.open(paths.trajectories)
        log_metrics({"sample/groups": store.num_groups, "sample/images": store.num_images})

if __name__ == "__main__":
    run_stage(main)
