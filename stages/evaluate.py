"""Stage ``evaluate``: baseline vs trained on held-out prompts with fixed seeds.

Reads params ``model``, ``sampling``, the judge keys of ``label``, ``evaluate``, ``train.epochs``/``method``
and ``register.model_name``; reads ``models/trained``, ``data/heldout`` (held-out pairs of the heldout
stage) and ``registry/baseline.json`` (with ``evaluate.baseline: champion``, the champion it names and its
weights under ``models/baseline``); writes ``metrics/eval.json`` (with the protocol fingerprint),
``plots/reward_curve.csv``, ``plots/win_rate.csv``, ``plots/scorers.csv`` and ``eval/`` (grid, per-sample
scores, report.html; with digit prompts also digits.png, the sample grid per digit).

``evaluate.num_processes`` N > 1: the stage relaunches itself as N processes under ``accelerate launch``, as the
sample stage does (``PREFDIFF_ACCELERATE_CONFIG`` too); they share the image generation, and only the main
process scores, prints, writes the outputs (the one process's) and the MLflow entries.
"""

from __future__ import annotations

from stages._common import load_or_exit, relaunch, run_stage, say, tracked, workspace


def headline(m: dict) -> str:
    """The one-line result: win-rate with its prompt-clustered bootstrap interval, Wilson beside it."""
    return (f"trained {m['trained_mean_reward']:.4f} vs {m['baseline']} {m['base_mean_reward']:.4f} ({m['judge']}); "
            f"win-rate {m['win_rate']:.3f} [{m['win_rate_low']:.3f}, {m['win_rate_high']:.3f}] prompt-clustered "
            f"bootstrap over {m['num_prompts']} prompts (Wilson [{m['win_rate_wilson_low']:.3f}, "
            f"{m['win_rate_wilson_high']:.3f}]), {m['num_samples']} paired samples (W {m['wins']} / L {m['losses']} "
            f"/ T {m['ties']}); protocol {m['protocol_fingerprint'][:12]}")


def digit_line(block: dict, baseline: str) -> str:
    """Digit accuracy of both models with their prompt-clustered bootstrap intervals, Wilson beside them."""
    def one(side: str) -> str:
        return (f"{block[side]:.3f} [{block[f'{side}_low']:.3f}, {block[f'{side}_high']:.3f}] (Wilson "
                f"[{block[f'{side}_wilson_low']:.3f}, {block[f'{side}_wilson_high']:.3f}])")

    return (f"digit accuracy {baseline} {one('base')}, trained {one('trained')}, gain {block['gain']:+.3f} "
            f"[{block['gain_low']:+.3f}, {block['gain_high']:+.3f}] prompt-clustered bootstrap over "
            f"{block['n_prompts']} prompts, {block['n']} samples")


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    relaunch("evaluate", params.evaluate.num_processes)
    import mlflow

    from evaluation.evaluate import DIGIT_GRID, evaluate_trained, flat_metrics
    from prefdiff.models.processes import process_state

    if not process_state(params).is_main_process:  # one of the launched processes: it only generates its share
        evaluate_trained(params, paths.trained, paths, progress=say)
        return
    with tracked("evaluate", params, paths, ("evaluate",)) as log_metrics:
        result = evaluate_trained(params, paths.trained, paths, progress=say)
        m = result.metrics
        say(f"evaluate: {headline(m)}")
        if "digit_accuracy" in m:
            say(f"evaluate: {digit_line(m['digit_accuracy'], m['baseline'])}")
        for name, reason in m["skipped_scorers"].items():
            say(f"evaluate: skipped scorer {name}: {reason}")
        log_metrics(flat_metrics(m, "eval/"))  # eval/win_rate, eval/scorers/<name>/win_rate, eval/implicit/...
        for row in result.curve:
            log_metrics({"eval_curve/mean_reward": row["mean_reward"], "eval_curve/win_rate": row["win_rate"]},
                        step=int(row["epoch"]))
        mlflow.log_artifact(str(paths.eval_dir / "grid.png"), artifact_path="eval")
        if (paths.eval_dir / DIGIT_GRID).is_file():
            mlflow.log_artifact(str(paths.eval_dir / DIGIT_GRID), artifact_path="eval")
        if (paths.eval_dir / "report.html").is_file():
            mlflow.log_artifact(str(paths.eval_dir / "report.html"), artifact_path="eval")


if __name__ == "__main__":
    run_stage(main)
