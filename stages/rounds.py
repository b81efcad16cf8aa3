"""Stage ``rounds`` (pipelines/rounds/dvc.yaml): many automatic-judge rounds in this one process.

Reads params ``model``, ``sampling``, ``sample`` (prompt set, group size, seed, batches), ``label`` (judge or
simulated), ``train`` (its shared keys and ``train.<method>``), ``evaluate`` (prompts, seeds, judge of the
win-rate) and ``rounds``; writes ``data/rounds`` (every round's trajectories, preferences, LoRA and state;
persistent, so a larger ``rounds.count`` or a rerun after an interruption continues after the rounds there),
``metrics/rounds.json``, ``plots/rounds.csv``, ``plots/rounds_eval.csv`` and ``plots/rounds.png``.

Each round becomes an MLflow child run of the stage's run (the flow's parent run when ``MLFLOW_RUN_ID`` is
set) as soon as it is done, and a point of the parent's ``rounds/<metric>`` curves.
"""

from __future__ import annotations

from stages._common import load_or_exit, refuse, run_stage, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.rounds.loop import rounds_refusal

    why = rounds_refusal(params)
    if why is not None:
        refuse(why)
    import mlflow

    from prefdiff.rounds.loop import run_rounds
    from prefdiff.tracking import log_round_run

    with tracked("rounds", params, paths, ("rounds", "sample", "label", "train")) as log_metrics:
        parent = mlflow.active_run().info.run_id
        result = run_rounds(params, paths.root, on_round=lambda row: log_round_run(parent, row), progress=say)
        log_metrics({f"rounds/final/{k}": v for k, v in result.summary.items()})
        say(f"rounds: {len(result.computed)} computed, {result.resumed} resumed from data/rounds; "
            f"{result.summary['samples']} images in all")


if __name__ == "__main__":
    run_stage(main)
