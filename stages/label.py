"""Stage ``label``: preference pairs, from an automatic judge, simulated annotators or people's labels over
our samples, or imported from parquet.

Reads params ``label``; reads ``data/trajectories`` (judge, simulated, human), ``label.human.log`` inside
``data/labels`` (human) or ``label.pickapic.path`` (pickapic); writes ``data/preferences``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages._common import load_or_exit, refuse, run_stage, say, tracked, workspace

if TYPE_CHECKING:
    from prefdiff.config import HumanLabelParams, SimulatedLabelParams
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.human import HumanPreferences
    from prefdiff.labeling.label_log import LabelLog
    from prefdiff.paths import Paths
    from prefdiff.scorers import Scorer


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.preferences import PreferenceStore

    lp = params.label
    human_log = _human_log(lp.human, paths) if lp.source == "human" else None
    store = None
    if lp.source != "pickapic":  # the sampled chains, checked (index, shards, PNGs) before the run starts
        from prefdiff.data.trajectories import TrajectoryStore

        store = TrajectoryStore.open(paths.trajectories)
    with tracked("label", params, paths, ("label",)) as log_metrics:
        if human_log is not None:
            log_metrics(_human(store, lp.human, human_log, paths))
        elif lp.source == "pickapic":
            from prefdiff.data.pickapic import ImportConfig, import_pickapic

            pk = lp.pickapic
            source = Path(pk.path) if Path(pk.path).is_absolute() else paths.root / pk.path
            config = ImportConfig(resolution=pk.resolution, crop=pk.crop, hflip=pk.hflip, seed=pk.seed,
                                  max_pairs=pk.max_pairs, on_bad_row=pk.on_bad_row, shard_bytes=pk.shard_mb * 2**20,
                                  encoding=pk.encoding, jpeg_draft=pk.jpeg_draft)
            imported = import_pickapic([source], paths.preferences, config, workers=pk.workers, progress=say)
            log_metrics({"label/rows_read": imported.rows_read, "label/ties_dropped": imported.ties_dropped,
                         "label/rows_rejected": imported.rows_rejected, "label/images_kept": imported.images_kept})
        else:
            from prefdiff.labeling.pairs import judge_scorer, label_trajectories

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


def _human_log(hp: HumanLabelParams, paths: Paths) -> Path:
    """``label.human.log`` as a path; refused unless inside data/labels, the directory dvc.yaml declares as
    this stage's input (a log elsewhere would change the preferences behind DVC's back), and unless it exists
    (a fresh clone has none until people label)."""
    log = Path(hp.log) if Path(hp.log).is_absolute() else paths.root / hp.log
    if not log.resolve().is_relative_to(paths.labels.resolve()):
        refuse(f"label.human.log {hp.log!r}: must be inside {paths.labels.relative_to(paths.root)}/, the label "
               "stage's DVC input (e.g. data/labels/labels.jsonl)")
    if not log.is_file():
        refuse(f"{log}: no label log here (label.human.log); label the groups first (make label-server), or set "
               "label.source to judge, simulated or pickapic")
    return log


def _human(store: TrajectoryStore, hp: HumanLabelParams, log_path: Path, paths: Paths) -> dict[str, float]:
    """People's labels -> the preference dataset (prefdiff.labeling.human.label_from_log); prints one summary
    line and returns the combination, agreement and (tag mode) rate metrics."""
    from prefdiff.labeling.human import label_from_log
    from prefdiff.labeling.label_log import LabelLogError

    try:
        prefs, log = label_from_log(store, log_path, paths.preferences, mode=hp.mode, tags=hp.tags,
                                    annotators_per_group=hp.annotators_per_group)
    except LabelLogError as err:
        refuse(err)
    metrics = _combination_metrics(prefs, log)
    if prefs.mode == "tag":
        from evaluation.rates import TaggedLabel, tag_rates

        # the paper's per-image rates over the counted groups; one round = this log
        tagged = [TaggedLabel(round=0, image_id=i, tags=t, annotator=a) for a, i, t in prefs.tagged]
        metrics |= {f"label/{k}": v for k, v in tag_rates(tagged, log.header.tags).items()}
    say(_human_summary(prefs, log, metrics))
    return metrics


_KAPPA_METRIC = {"cohen": "label/cohens_kappa", "fleiss": "label/fleiss_kappa"}


def _metric_name(annotator: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and space; annotator names are free text
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in annotator)


def _combination_metrics(prefs: HumanPreferences, log: LabelLog) -> dict[str, float]:
    import math

    metrics: dict[str, float] = {
        "label/effective_labels": len(log.effective_labels()), "label/undone_labels": len(log.undone_labels()),
        "label/annotators": len(prefs.annotators), "label/groups_labeled": prefs.groups_labeled,
        "label/groups_left_out": prefs.groups_left_out, "label/items": prefs.items,
        "label/ties_dropped": prefs.ties_dropped, "label/splits_dropped": prefs.splits_dropped,
    }
    if prefs.kappa is not None and not math.isnan(prefs.kappa):
        metrics[_KAPPA_METRIC[prefs.kappa_kind]] = prefs.kappa
    if prefs.kappa_kind is not None:
        metrics["label/kappa_items"] = prefs.kappa_items
    for name, share in prefs.majority_agreement.items():
        if share is not None:
            metrics[f"label/majority_agreement/{_metric_name(name)}"] = share
    return metrics


def _human_summary(prefs: HumanPreferences, log: LabelLog, metrics: dict[str, float]) -> str:
    kappa = "no kappa (one annotator)"
    if prefs.kappa_kind is not None:
        who = "Cohen's" if prefs.kappa_kind == "cohen" else "Fleiss'"
        value = f"{prefs.kappa:.3f}" if _KAPPA_METRIC[prefs.kappa_kind] in metrics else "n/a"
        kappa = f"{who} kappa {value} on {prefs.kappa_items} shared image pairs"
    agreement = ", ".join(f"{a} {'n/a' if s is None else f'{s:.3f}'} of {prefs.majority_items[a]}"
                          for a, s in prefs.majority_agreement.items())
    rates = ", ".join(f"{k.removeprefix('label/')} {v:.3f}" for k, v in metrics.items()
                      if k.endswith("_rate"))
    return (f"label: {len(log.effective_labels())} human label(s) ({log.header.mode} mode, "
            f"{len(log.undone_labels())} undone) by "
            f"{len(prefs.annotators)} annotator(s) from {log.path.name}"
            f"{' (its torn last line ignored)' if log.torn_tail else ''}; {prefs.groups_used} of "
            f"{prefs.groups_labeled} labeled groups counted ({prefs.groups_left_out} left out: fewer than "
            f"{prefs.annotators_per_group} annotator(s)); {prefs.items} image pairs judged -> {len(prefs.pairs)} "
            f"pairs, {prefs.ties_dropped} ties and {prefs.splits_dropped} even splits dropped (plurality vote); "
            f"{kappa}; agreement with the majority: {agreement or 'n/a'}" + (f"; rates: {rates}" if rates else ""))


if __name__ == "__main__":
    run_stage(main)
