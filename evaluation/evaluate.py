"""The evaluate stage's library function: base versus trained on held-out prompts with fixed seeds.

Every (prompt, seed) is generated twice, by the base model and by the model with the trained LoRA, from
the same initial noise and the same per-step noise (``prefdiff.sampling.sampler``), so the comparison
is paired. Reported: mean objective reward of each with a 95% t-interval, the paired win-rate of trained
over base (ties, |difference| <= tie_margin, count as half a win) with a Wilson interval, a grid of base
vs trained samples, and, from the per-epoch LoRA snapshots, a reward and win-rate curve.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.grid import base_vs_trained_grid, save_png_atomic
from evaluation.stats import mean_ci, paired_outcomes, win_rate, win_rate_summary
from prefdiff.config import Params
from prefdiff.data.atomic import atomic_write_json, atomic_write_text
from prefdiff.paths import Paths
from prefdiff.prompts import get_prompt_set

_SNAPSHOT = re.compile(r"epoch-(\d+)")


@dataclass
class EvalResult:
    metrics: dict[str, float | int | str]
    curve: list[dict[str, float]]  # one row per evaluated LoRA (epoch 0 = base)


def eval_prompts_and_seeds(params: Params, root: Path | None = None) -> tuple[list[str], list[int]]:
    """Prompt i, image j gets seed ``evaluate.seed + i * seeds_per_prompt + j``."""
    ep = params.evaluate
    prompts = get_prompt_set(ep.prompt_set, ep.num_prompts, root=root)
    pairs = [(p, ep.seed + i * ep.seeds_per_prompt + j) for i, p in enumerate(prompts) for j in range(ep.seeds_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def _snapshots(lora_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in sorted((lora_dir / "snapshots").glob("epoch-*")):
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
    args = {primary: params.label.judge_args if primary == params.label.judge else {}, **ep.scorer_args}
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


def _baseline(params: Params, paths: Paths, pipe, progress) -> tuple[str, Any]:
    """("base", no-op) or ("champion vN", context putting the champion's weights into ``pipe``)."""
    from prefdiff.models.finetuned import trained_weights

    if params.evaluate.baseline == "champion":
        from prefdiff.registry import champion_weights

        found = champion_weights(params.register.model_name, paths.root, paths.eval_dir / "champion")
        if found is not None:
            version, weights = found
            progress(f"baseline: {params.register.model_name} champion v{version}")
            return f"champion v{version}", lambda: trained_weights(pipe, weights)
        progress(f"baseline: no champion of {params.register.model_name} registered yet; using the base model")
    return "base", nullcontext


def evaluate_lora(params: Params, lora_dir: Path, paths: Paths, *, progress: Callable[[str], None] = print) -> EvalResult:
    """Score baseline and trained samples with every scorer; write metrics, plots, grid and the HTML report."""
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.models.loading import load_pipeline
    from prefdiff.sampling.sampler import SamplingConfig, generate

    ep = params.evaluate
    prompts, seeds = eval_prompts_and_seeds(params, paths.root)
    scorers, skipped = build_scorers(params, progress)
    primary = params.eval_judge
    cfg = SamplingConfig(**params.sampling.model_dump())
    pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=params.model.device,
                         revision=params.model.revision)
    baseline_name, baseline_ctx = _baseline(params, paths, pipe, progress)
    began = time.time()

    def run(label: str, names: list[str]) -> tuple[list, dict[str, np.ndarray]]:
        images = generate(pipe, prompts, seeds, cfg, batch_size=ep.batch_size)
        scores = {n: np.asarray(scorers[n].score(images, prompts), dtype=np.float64) for n in names}
        progress(f"{label}: {len(images)} samples, mean {primary} {scores[primary].mean():.5f} "
                 f"({time.time() - began:.1f} s)")
        return images, scores

    with baseline_ctx():
        base_images, base = run(baseline_name, list(scorers))
    curve = [_curve_row(0, base[primary], base[primary], ep.tie_margin)]
    snapshots = [(e, p) for e, p in _snapshots(lora_dir) if e < params.train.epochs] if ep.reward_curve else []
    for epoch, snapshot in snapshots:
        with trained_weights(pipe, snapshot):
            curve.append(_curve_row(epoch, run(f"epoch {epoch}", [primary])[1][primary], base[primary], ep.tie_margin))
    with trained_weights(pipe, lora_dir):
        trained_images, trained = run("trained", list(scorers))
    curve.append(_curve_row(params.train.epochs, trained[primary], base[primary], ep.tie_margin))

    metrics: dict[str, Any] = _metrics(primary, base[primary], trained[primary], ep.tie_margin)
    metrics["baseline"] = baseline_name
    metrics["scorers"] = {name: _scorer_metrics(scorers[name], base[name], trained[name], prompts, ep)
                          for name in scorers}
    metrics["skipped_scorers"] = {name: reason for name, reason in skipped}
    if ep.implicit_accuracy:
        metrics["implicit"] = implicit_metrics(params, paths, pipe, lora_dir, scorers[primary], progress)
    _write_outputs(paths, prompts, seeds, base, trained, curve, metrics)
    captions = [f"{p} #{s}" for p, s in zip(prompts, seeds)]
    cols = _grid_columns(len(prompts), ep.grid_columns, ep.seeds_per_prompt)
    save_png_atomic(base_vs_trained_grid([base_images[i] for i in cols], [trained_images[i] for i in cols],
                                         [captions[i] for i in cols]), paths.eval_dir / "grid.png")
    if ep.report:
        write_report(paths.eval_dir / "report.html", params, metrics, skipped,
                     [(prompts[i], seeds[i], base_images[i], trained_images[i], base[primary][i], trained[primary][i])
                      for i in cols])
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


def implicit_metrics(params: Params, paths: Paths, pipe, trained: Path, judge, progress) -> dict[str, Any]:
    """Implicit reward accuracy of the trained model on held-out pairs (evaluation/implicit.py)."""
    from evaluation.implicit import elbo_implicit_accuracy, trajectory_implicit_accuracy
    from prefdiff.data.preferences import PreferenceStore

    ep, tp = params.evaluate, params.train
    if ep.implicit_pairs:
        source = Path(ep.implicit_pairs) if Path(ep.implicit_pairs).is_absolute() else paths.root / ep.implicit_pairs
        prefs, trajectories = PreferenceStore.open(source), None
        if prefs.source_kind == "trajectories":
            raise ValueError(f"evaluate.implicit_pairs {source}: give an image-pair dataset (e.g. an imported "
                             "Pick-a-Pic test split); trajectory pairs are sampled by the evaluate stage itself")
        progress(f"implicit accuracy on the pairs of {source}")
    else:
        trajectories, prefs = heldout_pairs(params, paths, pipe, judge, progress)
    out: dict[str, Any] = {"pairs_source": str(ep.implicit_pairs or "sampled held-out groups"),
                           "dpo_beta": tp.diffusion_dpo.official_beta}
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


def heldout_pairs(params: Params, paths: Paths, pipe, judge, progress):
    """Groups of 2 sampled by the base on the evaluation prompts with seeds no training or evaluation sample
    uses, ranked by the primary judge: held-out preference pairs with trajectories, under ``eval/heldout``."""
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import label_trajectories
    from prefdiff.sampling.dataset import sample_dataset

    ep = params.evaluate
    sample = params.sample.model_copy(update={
        "prompt_set": ep.prompt_set, "num_prompts": ep.num_prompts, "groups_per_prompt": ep.implicit_groups_per_prompt,
        "images_per_group": 2, "seed": ep.seed + 7_777_777, "batch_size": ep.batch_size})
    hparams = params.model_copy(update={"sample": sample})
    root = paths.eval_dir / "heldout"
    progress(f"held-out pairs: {ep.implicit_groups_per_prompt} groups of 2 per evaluation prompt, judged by {judge.name}")
    sample_dataset(hparams, root / "trajectories", progress=lambda _: None, pipe=pipe, root=paths.root)
    store = TrajectoryStore.open(root / "trajectories")
    label_trajectories(store, judge, root / "preferences", progress=lambda _: None)
    return store, PreferenceStore.open(root / "preferences")


def write_report(out: Path, params: Params, metrics: dict[str, Any], skipped, image_pairs) -> Path:
    from evaluation.report import render_report

    rows = []
    for name, m in metrics["scorers"].items():
        rows.append({"metric": "mean score", "scorer": name, "base": m["base_mean"], "trained": m["trained_mean"],
                     "diff": m["mean_diff"], "ci_low": m["mean_diff_low"], "ci_high": m["mean_diff_high"],
                     "win_rate": m["win_rate"],
                     "win_rate_ci": f"[{m['win_rate_wilson_low']:.3f}, {m['win_rate_wilson_high']:.3f}] Wilson; "
                                    f"[{m['win_rate_boot_low']:.3f}, {m['win_rate_boot_high']:.3f}] bootstrap",
                     "wins": m["wins"], "losses": m["losses"], "ties": m["ties"], "p_value": m["sign_test_p"],
                     "decisive_rate": m["decisive_rate"]})
    extra = {"Implicit reward accuracy (held-out pairs)": metrics["implicit"]} if "implicit" in metrics else None
    title = f"prefdiff evaluation: trained ({params.train.method}) vs {metrics['baseline']}"
    return render_report(out, title=title, metrics_table=rows, skipped=list(skipped), image_pairs=image_pairs,
                         extra_sections=extra, params=params.model_dump())


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as stable flat names: ``win_rate``, ``scorers/pickscore/win_rate``, ``implicit/...``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= flat_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _grid_columns(n: int, columns: int, per_prompt: int) -> list[int]:
    """First seed of as many different prompts as fit, then further seeds: a varied grid."""
    order = sorted(range(n), key=lambda i: (i % per_prompt, i // per_prompt))
    return order[:columns]


def _curve_row(epoch: int, scores: np.ndarray, base: np.ndarray, tie_margin: float) -> dict[str, float]:
    mean = mean_ci(scores)
    wr = win_rate(paired_outcomes(scores, base, tie_margin))
    return {"epoch": epoch, "mean_reward": mean.mean, "ci_low": mean.low, "ci_high": mean.high,
            "win_rate": wr.win_rate, "win_rate_low": wr.low, "win_rate_high": wr.high}


def _metrics(judge: str, base: np.ndarray, trained: np.ndarray, tie_margin: float) -> dict[str, float | int | str]:
    b, t = mean_ci(base), mean_ci(trained)
    wr = win_rate(paired_outcomes(trained, base, tie_margin))
    return {
        "judge": judge, "num_samples": int(len(base)),
        "base_mean_reward": b.mean, "base_ci_low": b.low, "base_ci_high": b.high,
        "trained_mean_reward": t.mean, "trained_ci_low": t.low, "trained_ci_high": t.high,
        "reward_gain": t.mean - b.mean,
        "win_rate": wr.win_rate, "win_rate_low": wr.low, "win_rate_high": wr.high,
        "wins": wr.wins, "losses": wr.losses, "ties": wr.ties,
    }


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_outputs(paths: Paths, prompts, seeds, base, trained, curve, metrics) -> None:
    """eval/samples.csv (every scorer, base and trained, per sample), the curve plots, plots/scorers.csv
    (win-rate per scorer with both intervals) and metrics/eval.json."""
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
    atomic_write_text(paths.winrate_plot,
                      _csv_text([{k: r[k] for k in ("epoch", "win_rate", "win_rate_low", "win_rate_high")} for r in curve],
                                ["epoch", "win_rate", "win_rate_low", "win_rate_high"]))
    per_scorer = [{"scorer": n, "win_rate": m["win_rate"], "wilson_low": m["win_rate_wilson_low"],
                   "wilson_high": m["win_rate_wilson_high"], "boot_low": m["win_rate_boot_low"],
                   "boot_high": m["win_rate_boot_high"]} for n, m in metrics["scorers"].items()]
    atomic_write_text(paths.scorers_plot, _csv_text(per_scorer, list(per_scorer[0])))
    atomic_write_json(paths.eval_metrics, metrics)
