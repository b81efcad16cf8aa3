"""Stage ``evaluate``: baseline vs trained on held-out prompts with fixed seeds.

Reads params ``model``, ``sampling``, the judge keys of ``label``, ``evaluate``, ``train.epochs``/``method``
and ``register.model_name``; reads ``models/trained``, ``data/heldout`` (held-out pairs of the heldout
stage) and ``registry/baseline.json`` (with ``evaluate.baseline: champion``, the champion it names and its
weights under ``models/baseline``); writes ``metrics/eval.json`` (with the protocol fingerprint),
``plots/reward_curve.csv``, ``plots/win_rate.csv``, ``plots/scorers.csv`` and ``eval/`` (grid, per-sample
scores, report.html).
"""

from __future__ import annotations

from stages._common import load_or_exit, say, tracked, workspace


def headline(m: dict) -> str:
    """The one-line result: win-rate with its prompt-clustered bootstrap interval, Wilson beside it."""
    return (f"trained {m['trained_mean_reward']:.4f} vs {m['baseline']} {m['base_mean_reward']:.4f} ({m['judge']}); "
            f"win-rate {m['win_rate']:.3f} [{m['win_rate_low']:.3f}, {m['win_rate_high']:.3f}] prompt-clustered "
            f"bootstrap over {m['num_prompts']} prompts (Wilson [{m['win_rate_wilson_low']:.3f}, "
            f"{m['win_rate_wilson_high']:.3f}]), {m['num_samples']} paired samples (W {m['wins']} / L {m['losses']} "
            f"/ T {m['ties']}); protocol {m['protocol_fingerprint'][:12]}")


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    import mlflow

    from evaluation.evaluate import evaluate_trained, flat_metrics

    with tracked("evaluate", params, paths, ("evaluate",)) as log_metrics:
        result = evaluate_trained(params, paths.trained, paths, progress=say)
        m = result.metrics
        say(f"evaluate: {headline(m)}")
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
