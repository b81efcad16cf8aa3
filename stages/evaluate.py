"""Stage ``evaluate``: base vs trained on held-out prompts with fixed seeds.

Reads params ``model``, ``sampling``, ``label.judge``, ``evaluate``; reads ``models/trained``; writes
``metrics/eval.json``, ``plots/reward_curve.csv``, ``plots/win_rate.csv``, ``plots/scorers.csv`` and
``eval/`` (grid, per-sample scores, held-out pairs, report.html).
"""

from __future__ import annotations

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    import mlflow

    from evaluation.evaluate import evaluate_lora, flat_metrics

    with tracked("evaluate", params, paths, ("evaluate",)) as log_metrics:
        result = evaluate_lora(params, paths.trained, paths, progress=say)
        m = result.metrics
        say(f"evaluate: trained {m['trained_mean_reward']:.4f} vs base {m['base_mean_reward']:.4f} "
            f"({m['judge']}); win-rate {m['win_rate']:.3f} [{m['win_rate_low']:.3f}, {m['win_rate_high']:.3f}] "
            f"over {m['num_samples']} paired samples (W {m['wins']} / L {m['losses']} / T {m['ties']})")
        for name, reason in m["skipped_scorers"].items():
            say(f"evaluate: skipped scorer {name}: {reason}")
        log_metrics(flat_metrics(m, "eval/"))  # eval/win_rate, eval/scorers/<name>/win_rate, eval/implicit/...
        for row in result.curve:
            log_metrics({"eval_curve/mean_reward": row["mean_reward"], "eval_curve/win_rate": row["win_rate"]},
                        step=int(row["epoch"]))
        mlflow.log_artifact(str(paths.eval_dir / "grid.png"), artifact_path="eval")
        if (paths.eval_dir / "report.html").is_file():
            mlflow.log_artifact(str(paths.eval_dir / "report.html"), artifact_path="eval")


if __name__ == "__main__":
    main()
