"""Stage ``train``: D3PO on the labeled trajectories; a LoRA in the diffusers format.

Reads params ``model``, ``sampling``, ``train``; reads ``data/trajectories`` and ``data/preferences``;
writes ``models/lora`` (final adapter + epoch snapshots), ``metrics/train.json``, ``plots/train.csv``;
keeps resumable checkpoints in ``models/checkpoints`` (persistent: an interrupted run resumes).
"""

from __future__ import annotations

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.atomic import atomic_write_json, atomic_write_text
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.training.d3po import CURVE_FIELDS, train_d3po

    with tracked("train", params, paths, ("train",)) as log_metrics:
        trajectories = TrajectoryStore.open(paths.trajectories)
        preferences = PreferenceStore.open(paths.preferences)
        preferences.check_trajectories(trajectories)
        summary = train_d3po(params, trajectories, preferences, lora_out=paths.lora,
                             checkpoint_dir=paths.checkpoints, log_metrics=log_metrics, progress=say)
        paths.train_plot.parent.mkdir(parents=True, exist_ok=True)
        paths.train_metrics.parent.mkdir(parents=True, exist_ok=True)
        lines = [",".join(CURVE_FIELDS)] + [",".join(str(row[k]) for k in CURVE_FIELDS) for row in summary.curve]
        atomic_write_text(paths.train_plot, "\n".join(lines) + "\n")
        atomic_write_json(paths.train_metrics, summary.metrics())
        log_metrics({f"train/final_{k}": v for k, v in summary.final.items()})


if __name__ == "__main__":
    main()
