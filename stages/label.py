"""Stage ``label``: rank every group with the automatic judge and write preference pairs.

Reads params ``label``; reads ``data/trajectories``; writes ``data/preferences``.
"""

from __future__ import annotations

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.judges import make_judge
    from prefdiff.labeling.pairs import label_trajectories

    with tracked("label", params, paths, ("label",)) as log_metrics:
        store = TrajectoryStore.open(paths.trajectories)
        judge = make_judge(params.label.judge, quality=params.label.jpeg_quality)
        label_trajectories(store, judge, paths.preferences, progress=say)
        summary = PreferenceStore.open(paths.preferences).summary()
        say(f"label: {summary.num_pairs} pairs, {summary.num_ties} ties (excluded from training), "
            f"mean score margin {summary.mean_margin:.4f}")
        log_metrics({"label/pairs": summary.num_pairs, "label/ties": summary.num_ties,
                     "label/mean_margin": summary.mean_margin})


if __name__ == "__main__":
    main()
