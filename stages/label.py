"""Stage ``label``: preference pairs, from an automatic judge over our samples or imported from parquet.

Reads params ``label``; reads ``data/trajectories`` (judge) or ``label.pickapic.path`` (pickapic);
writes ``data/preferences``.
"""

from __future__ import annotations

from pathlib import Path

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.preferences import PreferenceStore

    lp = params.label
    with tracked("label", params, paths, ("label",)) as log_metrics:
        if lp.source == "pickapic":
            from prefdiff.data.pickapic import ImportConfig, import_pickapic

            pk = lp.pickapic
            source = Path(pk.path) if Path(pk.path).is_absolute() else paths.root / pk.path
            config = ImportConfig(resolution=pk.resolution, crop=pk.crop, hflip=pk.hflip, seed=pk.seed,
                                  max_pairs=pk.max_pairs, on_bad_row=pk.on_bad_row)
            imported = import_pickapic([source], paths.preferences, config, progress=say)
            log_metrics({"label/rows_read": imported.rows_read, "label/ties_dropped": imported.ties_dropped,
                         "label/rows_rejected": imported.rows_rejected})
        else:
            from prefdiff.data.trajectories import TrajectoryStore
            from prefdiff.labeling.pairs import judge_scorer, label_trajectories

            store = TrajectoryStore.open(paths.trajectories)
            judge = judge_scorer(lp.judge, lp.judge_args, lp.jpeg_quality)
            label_trajectories(store, judge, paths.preferences, progress=say)
        summary = PreferenceStore.open(paths.preferences).summary()
        say(f"label: {summary.num_pairs} pairs, {summary.num_ties} ties (excluded from training), "
            f"mean score margin {summary.mean_margin:.4f}")
        log_metrics({"label/pairs": summary.num_pairs, "label/ties": summary.num_ties,
                     "label/mean_margin": summary.mean_margin})


if __name__ == "__main__":
    main()
