"""Stage ``evaluate``: base vs trained on held-out prompts with fixed seeds.

Reads params ``model``, ``sampling``, ``label.judge``, ``evaluate``; reads ``models/lora``; writes
``metrics/eval.json``, ``plots/reward_curve.csv``, ``plots/win_rate.csv`` and ``eval/`` (grid, samples).
"""

from __future__ import annotations

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    import mlflow

    from evaluation.evaluate import evaluate_lora

    with tracked("evaluate", params, paths, ("evaluate",)) as log_metrics:
        result = evaluate_lora(params, paths.lora, paths, progress=say)
        m = result.metrics
        say(f"evaluate: trained {m['trained_mean_reward']:.4f} vs base {m['base_mean_reward']:.4f} "
            f"({m['judge']}); win-rate {m['win_rate']:.3f} [{m['win_rate_low']:.3f}, {m['win_rate_high']:.3f}] "
            f"over {m['num_samples']} paired samples (W {m['wins']} / L {m['losses']} / T {m['ties']})")
        log_metrics({f"eval/{k}": v for k, v in m.items()})
        for row in result.curve:
            log_metrics({"eval_curve/mean_reward": row["mean_reward"], "eval_curve/win_rate": row["win_rate"]},
                        step=int(row["epoch"]))
        mlflow.log_artifact(str(paths.eval_dir / "grid.png"), artifact_path="eval")


if __name__ == "__main__":
    main()
