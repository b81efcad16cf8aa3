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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.grid import base_vs_trained_grid, save_png_atomic
from evaluation.stats import mean_ci, paired_outcomes, win_rate
from prefdiff.config import Params
from prefdiff.data.atomic import atomic_write_json, atomic_write_text
from prefdiff.paths import Paths
from prefdiff.prompts import get_prompt_set

_SNAPSHOT = re.compile(r"epoch-(\d+)")


@dataclass
class EvalResult:
    metrics: dict[str, float | int | str]
    curve: list[dict[str, float]]  # one row per evaluated LoRA (epoch 0 = base)


def eval_prompts_and_seeds(params: Params) -> tuple[list[str], list[int]]:
    """Prompt i, image j gets seed ``evaluate.seed + i * seeds_per_prompt + j``."""
    ep = params.evaluate
    prompts = get_prompt_set(ep.prompt_set, ep.num_prompts)
    pairs = [(p, ep.seed + i * ep.seeds_per_prompt + j) for i, p in enumerate(prompts) for j in range(ep.seeds_per_prompt)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def _snapshots(lora_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in sorted((lora_dir / "snapshots").glob("epoch-*")):
        match = _SNAPSHOT.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def evaluate_lora(params: Params, lora_dir: Path, paths: Paths, *, progress: Callable[[str], None] = print) -> EvalResult:
    """Score base and trained samples, write grid, per-sample CSV, metrics JSON and the curve plots."""
    from prefdiff.labeling.judges import make_judge
    from prefdiff.models.loading import load_pipeline
    from prefdiff.models.lora import load_lora_weights
    from prefdiff.sampling.sampler import SamplingConfig, generate

    ep = params.evaluate
    prompts, seeds = eval_prompts_and_seeds(params)
    judge = make_judge(params.eval_judge, quality=params.label.jpeg_quality)
    cfg = SamplingConfig(**params.sampling.model_dump())
    pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=params.model.device,
                         revision=params.model.revision)
    began = time.time()

    def run(label: str) -> tuple[list, np.ndarray]:
        images = generate(pipe, prompts, seeds, cfg, batch_size=ep.batch_size)
        scores = np.asarray(judge.score(images, prompts), dtype=np.float64)
        progress(f"{label}: {len(images)} samples, mean {judge.name} {scores.mean():.5f} ({time.time() - began:.1f} s)")
        return images, scores

    base_images, base = run("base")
    lora_runs = [(e, p) for e, p in _snapshots(lora_dir) if e < params.train.epochs] if ep.reward_curve else []
    curve = [_curve_row(0, base, base, ep.tie_margin)]
    for epoch, snapshot in lora_runs:
        load_lora_weights(pipe, snapshot)
        curve.append(_curve_row(epoch, run(f"epoch {epoch}")[1], base, ep.tie_margin))
        pipe.unload_lora_weights()
    load_lora_weights(pipe, lora_dir)
    trained_images, trained = run("trained")
    curve.append(_curve_row(params.train.epochs, trained, base, ep.tie_margin))

    metrics = _metrics(params.eval_judge, base, trained, ep.tie_margin)
    _write_outputs(paths, prompts, seeds, base, trained, curve, metrics)
    captions = [f"{p} #{s}" for p, s in zip(prompts, seeds)]
    cols = _grid_columns(len(prompts), ep.grid_columns, ep.seeds_per_prompt)
    save_png_atomic(base_vs_trained_grid([base_images[i] for i in cols], [trained_images[i] for i in cols],
                                         [captions[i] for i in cols]), paths.eval_dir / "grid.png")
    return EvalResult(metrics=metrics, curve=curve)


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
    for target in (paths.eval_dir, paths.eval_metrics.parent, paths.reward_curve_plot.parent):
        target.mkdir(parents=True, exist_ok=True)
    samples = [{"prompt": p, "seed": s, "base": float(b), "trained": float(t), "diff": float(t - b)}
               for p, s, b, t in zip(prompts, seeds, base, trained)]
    atomic_write_text(paths.eval_dir / "samples.csv", _csv_text(samples, ["prompt", "seed", "base", "trained", "diff"]))
    atomic_write_text(paths.reward_curve_plot,
                      _csv_text([{k: r[k] for k in ("epoch", "mean_reward", "ci_low", "ci_high")} for r in curve],
                                ["epoch", "mean_reward", "ci_low", "ci_high"]))
    atomic_write_text(paths.winrate_plot,
                      _csv_text([{k: r[k] for k in ("epoch", "win_rate", "win_rate_low", "win_rate_high")} for r in curve],
                                ["epoch", "win_rate", "win_rate_low", "win_rate_high"]))
    atomic_write_json(paths.eval_metrics, metrics)
