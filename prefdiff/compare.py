"""One labeled data set, every method, one table.

``compare_methods`` trains each method of ``compare.methods`` on the SAME sample/label outputs (the
workspace's ``data/trajectories`` and ``data/preferences``) with the same seeds, evaluates each against the
base with the same prompts and seeds (so every row's win-rate is paired against identical base samples),
and writes one table: ``reports/comparison.md`` (Markdown) and ``reports/comparison.json``. Each method's
artifacts go to ``comparisons/<method>/`` (its LoRA, checkpoints, eval outputs and metrics).

MLflow: one parent run ("compare") with a child run per method holding the method's params, train and
eval metrics under the same names, so the MLflow UI's compare view lines them up side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefdiff.config import Params
from prefdiff.data.atomic import atomic_write_json, atomic_write_text
from prefdiff.paths import Paths

COMPARISONS_DIR = "comparisons"
REPORT_MD = Path("reports") / "comparison.md"
REPORT_JSON = Path("reports") / "comparison.json"


def method_paths(paths: Paths, method: str) -> Paths:
    """Where one method's outputs go: a Paths rooted at ``comparisons/<method>``."""
    return Paths(paths.root / COMPARISONS_DIR / method)


def train_and_evaluate(params: Params, paths: Paths, method: str, *, progress: Callable[[str], None] = print,
                       log_metrics: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
    """Train ``method`` on the workspace's labeled data and evaluate it; returns train + eval metrics."""
    from evaluation.evaluate import evaluate_lora
    from prefdiff.training.fit import fit

    mparams = params.for_method(method)
    out = method_paths(paths, method)
    progress(f"== {method}: training on {paths.preferences}")
    summary = fit(mparams, trajectories_dir=paths.trajectories, preferences_dir=paths.preferences,
                  out_dir=out.trained, checkpoint_dir=out.checkpoints, log_metrics=log_metrics, progress=progress)
    atomic_write_json(out.train_metrics, summary.metrics())
    progress(f"== {method}: evaluating against the base")
    result = evaluate_lora(mparams, out.trained, out, progress=progress)
    return {"method": method, "train": summary.metrics(), "eval": result.metrics,
            "params": mparams.train.model_dump()}


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def comparison_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per method with its eval metrics against the base and its training cost.

    "train acc" is the implicit accuracy on the training batches of the last epoch (DPO methods);
    "held-out acc" the implicit reward accuracy on held-out pairs in D3PO's (trajectory) and
    Diffusion-DPO's (ELBO) forms, when the evaluation computed them.
    """
    header = ("| method | win-rate vs base [95% CI] | W / L / T | base reward | trained reward | gain | "
              "final train loss | train acc | held-out acc (traj / ELBO) | train steps | train s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    nan = float("nan")
    for r in results:
        e, t = r["eval"], r["train"]
        imp = e.get("implicit", {})
        held = f"{_fmt(imp.get('implicit_acc_trajectory', nan))} / {_fmt(imp.get('implicit_acc_elbo', nan))}"
        lines.append(
            f"| {r['method']} | {_fmt(e['win_rate'])} [{_fmt(e['win_rate_low'])}, {_fmt(e['win_rate_high'])}] | "
            f"{e['wins']} / {e['losses']} / {e['ties']} | {_fmt(e['base_mean_reward'])} | "
            f"{_fmt(e['trained_mean_reward'])} | {_fmt(e['reward_gain'], 4)} | {_fmt(t.get('loss', nan), 4)} | "
            f"{_fmt(t.get('implicit_acc', nan))} | {held} | {t['steps']} | {_fmt(float(t['seconds']), 1)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(paths: Paths, results: Sequence[dict[str, Any]], *, judge: str, command: str) -> Path:
    """``reports/comparison.md`` (the table plus how it was made) and ``reports/comparison.json``."""
    samples = results[0]["eval"]["num_samples"] if results else 0
    text = (f"# Method comparison\n\nSame labeled data, same held-out prompts and seeds ({samples} paired samples "
            f"per method), judge `{judge}`. Produced by `{command}`.\n\n" + comparison_table(results))
    md, js = paths.root / REPORT_MD, paths.root / REPORT_JSON
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, text)
    atomic_write_json(js, {"judge": judge, "command": command, "results": list(results)})
    return md


__all__ = ["COMPARISONS_DIR", "REPORT_JSON", "REPORT_MD", "comparison_table", "method_paths", "train_and_evaluate",
           "write_report"]
