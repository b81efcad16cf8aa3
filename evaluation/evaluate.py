"""The evaluate stage's library function: baseline versus trained on held-out prompts with fixed seeds.

Every (prompt, seed) is generated twice, by the baseline and by the trained model, from the same initial
noise and the same per-step noise (``prefdiff.sampling.sampler``), so the comparison is paired. The
baseline is the base model or the registry champion that ``registry/baseline.json`` names (resolved by the
round flow; this module never reads the registry). Reported: mean objective reward of each with a 95%
t-interval; the paired win-rate of trained over the baseline (ties, |difference| <= tie_margin, count as
half a win) whose headline interval is the prompt-clustered bootstrap (seeds of one prompt are not
independent trials), with the Wilson interval beside it; the evaluation protocol and its fingerprint (what
the champion gate compares); a grid of baseline vs trained samples; from the per-epoch snapshots, a reward
and win-rate curve; and implicit reward accuracy on the held-out pairs of the heldout stage. When every prompt
names a digit (the built-in ``digits`` model), also the digit accuracy of both models and a sample grid per
digit (``evaluation.digits``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.digits import (DIGIT_SCORER, accuracy_rows, digit_accuracy, digit_sample_grid, per_digit_rows,
                               predicted_digits, prompted_digits)
from evaluation.grid import base_vs_trained_grid, save_png_atomic
from evaluation.stats import mean_ci, win_rate_summary
from prefdiff.config import Params
from prefdiff.data.atomic import atomic_write_json, atomic_write_text
from prefdiff.paths import Paths
from prefdiff.progress import progress_bar
from prefdiff.prompts import get_prompt_set

_SNAPSHOT = re.compile(r"epoch-(\d+)")
# Keys of metrics/eval.json that describe the evaluation rather than measure it (never logged as metrics).
DESCRIPTIVE_KEYS = frozenset({"protocol"})
DIGIT_GRID = "digits.png"  # under eval/: one row per digit, baseline then trained samples


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    curve: list[dict[str, float]]  # one row per evaluated snapshot (epoch 0 = the baseline itself)


def eval_prompts_and_seeds(params: Params, root: Path | None = None) -> tuple[list[str], list[int]]:
    """Prompt i, image j gets seed ``evaluate.seed + i * seeds_per_prompt + j``."""
    ep = params.evaluate
    prompts = get_prompt_set(ep.prompt_set, ep.num_prompts, root=root)
    pairs = [(p, ep.seed + i * ep.seeds_per_prompt + j) for i, p in enumerate(prompts) for j in range(ep.seeds_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def generate_shared(pipe, prompts: list[str], seeds: list[int], cfg, batch_size: int, state, *,
                    on_batch: Callable[[int, list], None] | None = None) -> list | None:
    """``generate(pipe, prompts, seeds)`` shared by the run's processes (``state``): the batches of ``batch_size``
    images generate forms itself in one process, process r generating batches r, r + N, ... (``shared_batches``);
    every image in order on the main process, None on the others (a collective: every process calls it).
    ``on_batch(rank, images)``: each gathered batch with the process that generated it, on the main process.
    Each batch holds the prompts, seeds and noise it holds in one process: with the same kernels, the same images."""
    from prefdiff.models.processes import shared_batches
    from prefdiff.sampling.sampler import generate

    batches = [slice(start, start + batch_size) for start in range(0, len(prompts), batch_size)]
    images: list = []
    for gathered in shared_batches(
            batches, lambda rows: generate(pipe, prompts[rows], seeds[rows], cfg, batch_size=batch_size), state):
        for rank, batch in enumerate(gathered):
            images += batch
            if on_batch is not None:
                on_batch(rank, batch)
    return images if state.is_main_process else None


def _snapshots(trained_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in sorted((trained_dir / "snapshots").glob("epoch-*")):
        match = _SNAPSHOT.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def build_scorers(params: Params, progress: Callable[[str], None]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """{name: scorer} for the primary judge and every ``evaluate.scorers`` entry whose weights are here, and
    [(name, reason)] for the skipped ones. The primary judge must be available (it gates registration)."""
    from prefdiff.labeling.pairs import judge_scorer
    from prefdiff.scorers import available

    ep = params.evaluate
    primary = params.eval_judge
    args = scorer_args(params)
    scorers: dict[str, Any] = {}
    skipped: list[tuple[str, str]] = []
    for name in [primary] + [s for s in ep.scorers if s != primary]:
        kwargs = dict(args.get(name, {}))
        ok, reason = available(name, **kwargs)
        if not ok:
            if name == primary:
                raise FileNotFoundError(f"the primary judge {name!r} cannot run here: {reason}")
            skipped.append((name, reason))
            progress(f"skipping scorer {name}: {reason}")
            continue
        scorers[name] = judge_scorer(name, kwargs, params.label.jpeg_quality)
    return scorers, skipped


def scorer_args(params: Params) -> dict[str, dict[str, Any]]:
    """{scorer: constructor arguments}: ``evaluate.scorer_args``, and ``label.judge_args`` for the primary judge
    when it is the label judge (unless ``evaluate.scorer_args`` names it)."""
    primary = params.eval_judge
    return {primary: params.label.judge_args if primary == params.label.judge else {}, **params.evaluate.scorer_args}


def digit_classifier(params: Params, scorers: dict[str, Any]) -> tuple[Any | None, str]:
    """(the ``digit_alignment`` scorer whose classifier reads the digit of a sample, "") - the evaluation's own
    when it scores with it, else one built from ``evaluate.scorer_args`` - or (None, why it cannot run here)."""
    from prefdiff.labeling.pairs import judge_scorer
    from prefdiff.scorers import available

    if DIGIT_SCORER in scorers:
        return scorers[DIGIT_SCORER], ""
    kwargs = dict(scorer_args(params).get(DIGIT_SCORER, {}))
    ok, reason = available(DIGIT_SCORER, **kwargs)
    if not ok:
        return None, f"digit accuracy needs the {DIGIT_SCORER} classifier: {reason}"
    return judge_scorer(DIGIT_SCORER, kwargs, params.label.jpeg_quality), ""


def evaluation_protocol(params: Params, prompts: list[str], seeds: list[int], judge) -> dict[str, Any]:
    """Everything that decides the primary judge's scores of a given model: two evaluations are comparable
    (the champion gate compares their numbers) only when these agree. The baseline is not part of it: it
    is what the trained model is compared against inside one evaluation."""
    ep, mp = params.evaluate, params.model
    return {
        "judge": {"name": params.eval_judge, "params": dict(judge.params())},  # sources, version, constants
        "model": {"source": mp.source, "revision": mp.revision, "dtype": mp.dtype},
        "sampling": params.sampling.model_dump(),
        "prompts": {"set": ep.prompt_set, "count": len(set(prompts)),
                    "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()},
        "seeds": {"seed": ep.seed, "per_prompt": ep.seeds_per_prompt,
                  "sha256": hashlib.sha256(",".join(map(str, seeds)).encode()).hexdigest()},
    }


def protocol_fingerprint(protocol: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()


def _baseline(params: Params, paths: Paths, pipe, progress) -> tuple[dict[str, Any], Callable]:
    """(metrics naming the baseline, context putting its weights into ``pipe``) from ``registry/baseline.json``."""
    from prefdiff.data import DatasetError
    from prefdiff.data.baseline import CHAMPION, read_baseline, tree_sha256
    from prefdiff.models.finetuned import trained_weights

    if params.evaluate.baseline == "base":
        return {"baseline": "base"}, nullcontext
    ref = read_baseline(paths.baseline)
    name = params.register.registered_name(params.train.method)
    if ref.model_name != name:
        raise DatasetError(f"{paths.baseline} names the champion of {ref.model_name!r}, but evaluate.baseline: "
                           f"champion compares against {name!r}'s; resolve it again (the round flow does so "
                           "before evaluate: flows/round.py resolve_baseline)")
    if ref.kind != CHAMPION:
        progress(f"baseline: {ref.note or f'no champion of {name}'}; using the base model")
        return {"baseline": "base"}, nullcontext
    weights = paths.root / ref.weights
    got = tree_sha256(weights)
    if got != ref.weights_sha256:
        raise DatasetError(f"{weights}: sha256 {got[:12]}... but {paths.baseline} names {ref.weights_sha256[:12]}...; "
                           "resolve the baseline again")
    progress(f"baseline: {name} champion v{ref.version}")
    return ({"baseline": ref.label, "baseline_model": name, "baseline_version": int(ref.version)},
            lambda: trained_weights(pipe, weights))


def evaluate_trained(params: Params, trained_dir: Path, paths: Paths, *,
                     progress: Callable[[str], None] = print) -> EvalResult | None:
    """Score baseline and trained samples with every scorer; write metrics, plots, grid and the HTML report.
    ``trained_dir``: a LoRA or a full UNet (``prefdiff.models.finetuned``), with epoch snapshots.

    Under ``accelerate launch`` (``evaluate.num_processes``) every process calls this: they share the image
    generation (the batches of ``evaluate.batch_size`` images, ``shared_batches``), the main process gathers the
    images in batch order, scores them, writes everything and returns the result; the others return None once
    their last share is gathered. Each batch holds the prompts, seeds and noise it holds in one process, so with
    the same kernels the images, and every number, are the one process's."""
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.models.loading import load_pipeline
    from prefdiff.models.processes import process_device, process_state
    from prefdiff.sampling.sampler import SamplingConfig
    from prefdiff.scorers import scores_as_decimals

    ep = params.evaluate
    state = process_state(params)
    main = state.is_main_process
    prompts, seeds = eval_prompts_and_seeds(params, paths.root)
    scorers: dict[str, Any] = {}  # the main process's alone: the others only generate
    skipped: list[tuple[str, str]] = []
    prompted = classifier = None
    if main:
        scorers, skipped = build_scorers(params, progress)
        prompted = prompted_digits(prompts)
        if prompted is not None:
            classifier, reason = digit_classifier(params, scorers)
            if classifier is None:
                skipped.append(("digit_accuracy", reason))
                progress(f"skipping digit accuracy: {reason}")
    primary = params.eval_judge
    cfg = SamplingConfig(**params.sampling.model_dump())
    pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=process_device(params, state),
                         revision=params.model.revision)
    baseline, baseline_ctx = _baseline(params, paths, pipe, progress if main else (lambda _: None))
    began = time.time()

    def sampled(label: str) -> list | None:
        """Every image of this phase in order on the main process (this process's share generated), else None."""
        shares = [0] * state.num_processes  # images each process generated, as gathered

        def gathered(rank: int, batch: list) -> None:
            shares[rank] += len(batch)
            bar.update(len(batch))

        with progress_bar(desc=f"evaluate {label}: sampling", total=len(prompts), unit="img", disable=not main) as bar:
            images = generate_shared(pipe, prompts, seeds, cfg, ep.batch_size, state, on_batch=gathered)
        if images is None:
            return None
        if state.num_processes > 1:
            progress(f"{label}: generated by {state.num_processes} processes: "
                     f"{' + '.join(map(str, shares))} images")
        return images

    def run(label: str, names: list[str]) -> tuple[list, dict[str, np.ndarray]] | None:
        images = sampled(label)
        if images is None:
            return None
        # the label stage's stored values (float32 scores as their shortest decimals: JPEG kB stay exact)
        scores = {n: np.asarray(scores_as_decimals(scorers[n].score(images, prompts)))
                  for n in progress_bar(names, desc=f"evaluate {label}: scoring", unit="scorer")}
        progress(f"{label}: {len(images)} samples, mean {primary} {scores[primary].mean():.5f} "
                 f"({time.time() - began:.1f} s)")
        return images, scores

    # every process generates the phases in this order: (curve epoch, label, weights, scorers, images kept)
    snapshots = [(e, p) for e, p in _snapshots(trained_dir) if e < params.train.epochs] if ep.reward_curve else []
    phases = [(0, baseline["baseline"], baseline_ctx, list(scorers), True),
              *((e, f"epoch {e}", partial(trained_weights, pipe, p), [primary], False) for e, p in snapshots),
              (params.train.epochs, "trained", partial(trained_weights, pipe, trained_dir), list(scorers), True)]
    runs = []  # (curve epoch, images or None, scores) per phase, on the main process
    for epoch, label, weights, names, keep in phases:
        with weights():
            got = run(label, names)
        if got is not None:
            runs.append((epoch, got[0] if keep else None, got[1]))
    if not main:  # its shares are with the main process, which scores, reports and writes
        return None
    (_, base_images, base), (_, trained_images, trained) = runs[0], runs[-1]
    higher = bool(scorers[primary].higher_is_better)
    curve = [_curve_row(epoch, scores[primary], base[primary], prompts, ep, higher) for epoch, _, scores in runs]

    per_scorer = {name: _scorer_metrics(scorers[name], base[name], trained[name], prompts, ep) for name in scorers}
    protocol = evaluation_protocol(params, prompts, seeds, scorers[primary])
    metrics: dict[str, Any] = _headline(primary, base[primary], trained[primary], per_scorer[primary])
    metrics |= baseline
    metrics["protocol_fingerprint"] = protocol_fingerprint(protocol)
    metrics["protocol"] = protocol
    metrics["scorers"] = per_scorer
    metrics["skipped_scorers"] = {name: reason for name, reason in skipped}
    if ep.implicit_accuracy:
        metrics["implicit"] = implicit_metrics(params, paths, pipe, trained_dir, progress)
    digit_grid = None
    if classifier is not None:
        base_pred = predicted_digits(classifier.digit_probabilities(base_images))
        trained_pred = predicted_digits(classifier.digit_probabilities(trained_images))
        metrics["digit_accuracy"] = digit_accuracy(prompted, base_pred, trained_pred, prompts,
                                                   n_boot=ep.bootstrap_samples, seed=ep.seed)
        digit_grid = digit_sample_grid(base_images, trained_images, prompted, base_pred, trained_pred,
                                       _grid_columns(len(prompts), len(prompts), ep.seeds_per_prompt),
                                       per_digit=ep.grid_columns, baseline=metrics["baseline"])
    _write_outputs(paths, prompts, seeds, base, trained, curve, metrics)
    captions = [f"{p} #{s}" for p, s in zip(prompts, seeds)]
    cols = _grid_columns(len(prompts), ep.grid_columns, ep.seeds_per_prompt)
    save_png_atomic(base_vs_trained_grid([base_images[i] for i in cols], [trained_images[i] for i in cols],
                                         [captions[i] for i in cols]), paths.eval_dir / "grid.png")
    if digit_grid is not None:
        save_png_atomic(digit_grid, paths.eval_dir / DIGIT_GRID)
    else:  # a stale grid of an earlier digit evaluation must not pass for this one's
        (paths.eval_dir / DIGIT_GRID).unlink(missing_ok=True)
    if ep.report:
        write_report(paths.eval_dir / "report.html", params, metrics, skipped,
                     [(prompts[i], seeds[i], base_images[i], trained_images[i], base[primary][i], trained[primary][i])
                      for i in cols], digit_grid=digit_grid)
    return EvalResult(metrics=metrics, curve=curve)


def _scorer_metrics(scorer, base: np.ndarray, trained: np.ndarray, prompts: list[str], ep) -> dict[str, Any]:
    """Means with t-intervals, and the paired win-rate summary (Wilson and prompt-clustered bootstrap
    intervals, W/(W+L), sign test) of trained over the baseline, for one scorer."""
    higher = bool(scorer.higher_is_better)
    summary = win_rate_summary(trained, base, prompts, tie_margin=ep.tie_margin, higher_is_better=higher,
                               n_boot=ep.bootstrap_samples, seed=ep.seed)
    b, t = mean_ci(base), mean_ci(trained)
    return {"higher_is_better": higher, "base_mean": b.mean, "base_ci_low": b.low, "base_ci_high": b.high,
            "trained_mean": t.mean, "trained_ci_low": t.low, "trained_ci_high": t.high, **summary.as_dict()}


def implicit_metrics(params: Params, paths: Paths, pipe, trained: Path, progress) -> dict[str, Any]:
    """Implicit reward accuracy of the trained model on held-out pairs (evaluation/implicit.py): those of
    ``evaluate.implicit_pairs``, else the heldout stage's ``data/heldout``."""
    from evaluation.implicit import elbo_implicit_accuracy, trajectory_implicit_accuracy
    from prefdiff.data.preferences import PreferenceStore, workspace_ref
    from prefdiff.data.trajectories import TrajectoryStore

    ep, tp = params.evaluate, params.train
    if ep.implicit_pairs:
        source = Path(ep.implicit_pairs) if Path(ep.implicit_pairs).is_absolute() else paths.root / ep.implicit_pairs
        prefs, trajectories = PreferenceStore.open(source), None
        if prefs.source_kind == "trajectories":
            raise ValueError(f"evaluate.implicit_pairs {source}: give an image-pair dataset (e.g. an imported "
                             "Pick-a-Pic test split); trajectory pairs come from the heldout stage")
        label = str(ep.implicit_pairs)
    else:
        trajectories = TrajectoryStore.open(paths.heldout / "trajectories")
        prefs = PreferenceStore.open(paths.heldout / "preferences")
        prefs.check_trajectories(trajectories)
        label = workspace_ref(paths.heldout)
    progress(f"implicit accuracy on the pairs of {label}")
    out: dict[str, Any] = {"pairs_source": label, "dpo_beta": tp.diffusion_dpo.official_beta}
    image_pairs = prefs.image_pairs(trajectories)
    if image_pairs:
        out |= elbo_implicit_accuracy(pipe, trained, image_pairs, beta=tp.diffusion_dpo.official_beta, draws=ep.implicit_draws,
                                      seed=ep.seed, batch_size=ep.batch_size).as_dict()
    if trajectories is not None and prefs.training_pairs():
        out |= trajectory_implicit_accuracy(pipe, trained, trajectories, prefs.training_pairs(),
                                            guidance=params.sampling.guidance_scale, eta=params.sampling.eta,
                                            batch_size=ep.batch_size).as_dict()
    progress("implicit reward accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()
                                                       if k.endswith(("_elbo", "_trajectory"))))
    return out


def report_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One report row per scorer; ``win_rate_ci`` is the headline (prompt-clustered bootstrap) interval."""
    rows = []
    for name, m in metrics["scorers"].items():
        rows.append({"metric": "mean score", "scorer": name, "base": m["base_mean"], "trained": m["trained_mean"],
                     "diff": m["mean_diff"], "ci_low": m["mean_diff_low"], "ci_high": m["mean_diff_high"],
                     "win_rate": m["win_rate"], "win_rate_ci": (m["win_rate_boot_low"], m["win_rate_boot_high"]),
                     "wins": m["wins"], "losses": m["losses"], "ties": m["ties"], "p_value": m["sign_test_p"],
                     "win_rate_ci_wilson": (m["win_rate_wilson_low"], m["win_rate_wilson_high"]),
                     "n_prompts": m["n_prompts"], "decisive_rate": m["decisive_rate"]})
    return rows


def write_report(out: Path, params: Params, metrics: dict[str, Any], skipped, image_pairs, *,
                 digit_grid=None) -> Path:
    """eval/report.html; with a digit evaluation (``metrics["digit_accuracy"]``) also its accuracy tables and
    ``digit_grid`` (:func:`evaluation.digits.digit_sample_grid`)."""
    from evaluation.report import Figure, render_report

    extra: dict[str, Any] = {}
    if "digit_accuracy" in metrics:
        block, baseline = metrics["digit_accuracy"], metrics["baseline"]
        extra["Digit accuracy"] = accuracy_rows(block, baseline)
        extra["Digit accuracy per digit"] = per_digit_rows(block, baseline)
        extra["Digit accuracy: how it is measured"] = (
            f"A sample is correct when the {DIGIT_SCORER} classifier's most probable digit is the one its prompt "
            "names. ci: 95% prompt-clustered bootstrap; ci_wilson: Wilson, treating every sample as independent.")
    if digit_grid is not None:
        extra["Samples per digit"] = Figure(digit_grid, f"One row per digit: {metrics['baseline']} samples (left of "
                                            "the divider), then the trained samples of the same seeds; under each "
                                            "image the digit the classifier reads (green: the prompted digit, red: "
                                            "another).")
    extra |= {
        "Win-rate intervals": "win_rate_ci: 95% prompt-clustered bootstrap (whole prompts resampled: the seeds of "
                              "one prompt are not independent trials); win_rate_ci_wilson: Wilson, treating every "
                              "sample as independent (optimistic when a prompt has several seeds).",
        "Evaluation protocol": {"fingerprint": metrics["protocol_fingerprint"], **metrics["protocol"]},
    }
    if "implicit" in metrics:
        extra["Implicit reward accuracy (held-out pairs)"] = metrics["implicit"]
    title = f"prefdiff evaluation: trained ({params.train.method}) vs {metrics['baseline']}"
    return render_report(out, title=title, metrics_table=report_rows(metrics), skipped=list(skipped),
                         image_pairs=image_pairs, extra_sections=extra, params=params.model_dump())


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as stable flat names: ``win_rate``, ``scorers/pickscore/win_rate``, ``implicit/...``
    (the protocol description is left out: its numbers are settings, not measurements)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in DESCRIPTIVE_KEYS:
            continue
        if isinstance(value, dict):
            out |= flat_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _grid_columns(n: int, columns: int, per_prompt: int) -> list[int]:
    """First seed of as many different prompts as fit, then further seeds: a varied grid."""
    order = sorted(range(n), key=lambda i: (i % per_prompt, i // per_prompt))
    return order[:columns]


def _win_rate_columns(s: dict[str, Any]) -> dict[str, float]:
    """The headline win-rate with its prompt-clustered bootstrap interval, Wilson beside it."""
    return {"win_rate": s["win_rate"], "win_rate_low": s["win_rate_boot_low"], "win_rate_high": s["win_rate_boot_high"],
            "win_rate_wilson_low": s["win_rate_wilson_low"], "win_rate_wilson_high": s["win_rate_wilson_high"]}


def _curve_row(epoch: int, scores: np.ndarray, base: np.ndarray, prompts: list[str], ep,
               higher_is_better: bool) -> dict[str, float]:
    mean = mean_ci(scores)
    summary = win_rate_summary(scores, base, prompts, tie_margin=ep.tie_margin, higher_is_better=higher_is_better,
                               n_boot=ep.bootstrap_samples, seed=ep.seed).as_dict()
    return {"epoch": epoch, "mean_reward": mean.mean, "ci_low": mean.low, "ci_high": mean.high,
            **_win_rate_columns(summary)}


def _headline(judge: str, base: np.ndarray, trained: np.ndarray, summary: dict[str, Any]) -> dict[str, Any]:
    b, t = mean_ci(base), mean_ci(trained)
    return {
        "judge": judge, "num_samples": int(len(base)), "num_prompts": summary["n_prompts"],
        "base_mean_reward": b.mean, "base_ci_low": b.low, "base_ci_high": b.high,
        "trained_mean_reward": t.mean, "trained_ci_low": t.low, "trained_ci_high": t.high,
        "reward_gain": t.mean - b.mean,
        **_win_rate_columns(summary), "win_rate_interval": "prompt-clustered bootstrap",
        "wins": summary["wins"], "losses": summary["losses"], "ties": summary["ties"],
    }


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


WIN_RATE_FIELDS = ["win_rate", "win_rate_low", "win_rate_high", "win_rate_wilson_low", "win_rate_wilson_high"]


def _write_outputs(paths: Paths, prompts, seeds, base, trained, curve, metrics) -> None:
    """eval/samples.csv (every scorer, baseline and trained, per sample), the curve plots, plots/scorers.csv
    (win-rate per scorer, bootstrap and Wilson intervals) and metrics/eval.json."""
    for target in (paths.eval_dir, paths.eval_metrics.parent, paths.reward_curve_plot.parent):
        target.mkdir(parents=True, exist_ok=True)
    primary = metrics["judge"]
    names = list(base)
    samples = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        row = {"prompt": p, "seed": s, "base": float(base[primary][i]), "trained": float(trained[primary][i]),
               "diff": float(trained[primary][i] - base[primary][i])}
        for n in names:
            row[f"{n}_base"], row[f"{n}_trained"] = float(base[n][i]), float(trained[n][i])
        samples.append(row)
    fields = ["prompt", "seed", "base", "trained", "diff"] + [f"{n}_{k}" for n in names for k in ("base", "trained")]
    atomic_write_text(paths.eval_dir / "samples.csv", _csv_text(samples, fields))
    atomic_write_text(paths.reward_curve_plot,
                      _csv_text([{k: r[k] for k in ("epoch", "mean_reward", "ci_low", "ci_high")} for r in curve],
                                ["epoch", "mean_reward", "ci_low", "ci_high"]))
    atomic_write_text(paths.winrate_plot, _csv_text([{k: r[k] for k in ["epoch", *WIN_RATE_FIELDS]} for r in curve],
                                                    ["epoch", *WIN_RATE_FIELDS]))
    per_scorer = [{"scorer": n, **_win_rate_columns(m)} for n, m in metrics["scorers"].items()]
    atomic_write_text(paths.scorers_plot, _csv_text(per_scorer, ["scorer", *WIN_RATE_FIELDS]))
    atomic_write_json(paths.eval_metrics, metrics)
