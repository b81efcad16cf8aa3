"""Stage ``label``: preference pairs, from an automatic judge or simulated annotators over our samples, or
imported from parquet.

Reads params ``label``; reads ``data/trajectories`` (judge, simulated) or ``label.pickapic.path``
(pickapic); writes ``data/preferences``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages._common import load_or_exit, say, tracked, workspace

if TYPE_CHECKING:
    from prefdiff.config import SimulatedLabelParams
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.scorers import Scorer


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
            if lp.source == "simulated":
                log_metrics(_simulate(store, judge, lp.simulated, paths.preferences))
            else:
                label_trajectories(store, judge, paths.preferences, tie_margin=lp.tie_margin, progress=say)
        summary = PreferenceStore.open(paths.preferences).summary()
        say(f"label: {summary.num_pairs} pairs, {summary.num_ties} ties (excluded from training), "
            f"mean score margin {summary.mean_margin:.4f}")
        log_metrics({"label/pairs": summary.num_pairs, "label/ties": summary.num_ties,
                     "label/mean_margin": summary.mean_margin})


def _simulate(store: TrajectoryStore, judge: Scorer, sp: SimulatedLabelParams, out_dir: Path) -> dict[str, float]:
    """Simulated annotators label the pairs (``label.simulated``); prints one summary line and returns
    the agreement metrics: per annotator over the pairs of its groups, and overall."""
    from prefdiff.labeling.annotators import Annotator, label_with_annotators

    annotators = [Annotator(accuracy=a.accuracy, bias=a.bias) for a in sp.annotators]
    labels = label_with_annotators(store, judge, annotators, out_dir, seed=sp.seed, progress=say)
    metrics: dict[str, float] = {}
    parts = []
    for r in labels.reports:
        if r.agreement is not None:  # None: none of its pairs is decided by the judge (or it has no groups)
            metrics[f"label/annotator_{r.annotator}_agreement"] = r.agreement
        shown = "n/a" if r.agreement is None else f"{r.agreement:.3f}"
        parts.append(f"annotator {r.annotator} {shown} of {r.num_decided_by_judge} (accuracy {r.accuracy}, "
                     f"bias {r.bias})")
    if labels.agreement is not None:
        metrics["label/annotator_agreement"] = labels.agreement
    decided = sum(r.num_decided_by_judge for r in labels.reports)
    overall = "n/a" if labels.agreement is None else f"{labels.agreement:.3f}"
    say(f"label: {len(annotators)} simulated annotator(s) agree with judge {judge.name} on {overall} of {decided} "
        "pairs it decides; " + "; ".join(parts))
    return metrics


if __name__ == "__main__":
    main()
