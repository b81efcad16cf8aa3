"""Stage ``rounds`` (pipelines/rounds/dvc.yaml): many automatic-judge rounds in one run (no process per round).

Reads params ``model``, ``sampling``, ``sample`` (prompt set, group size, seed, batches), ``label`` (judge or
simulated), ``train`` (its shared keys and ``train.<method>``), ``evaluate`` (prompts, seeds, judge of the
win-rate) and ``rounds``; writes ``data/rounds`` (every round's trajectories, preferences, LoRA and state;
persistent, so a larger ``rounds.count`` or a rerun after an interruption continues after the rounds there),
``metrics/rounds.json``, ``plots/rounds.csv``, ``plots/rounds_eval.csv`` and ``plots/rounds.png``.

Each round becomes an MLflow child run of the stage's run (the flow's parent run when ``MLFLOW_RUN_ID`` is
set) as soon as it is done, and a point of the parent's ``rounds/<metric>`` curves.

``rounds.num_processes`` N > 1: the stage relaunches itself as N processes under ``accelerate launch``, as the
train stage does (``PREFDIFF_ACCELERATE_CONFIG``, ``train.mixed_precision``); they share every round's sampling,
training and evaluation, and only the main process writes the rounds (the one process's) and the MLflow entries.
"""

from __future__ import annotations

from stages._common import load_or_exit, refuse, relaunch, run_stage, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.rounds.loop import rounds_refusal

    why = rounds_refusal(params)
    if why is not None:
        refuse(why)
    relaunch("rounds", params.rounds.num_processes, mixed_precision=params.train.mixed_precision)
    import mlflow

    from prefdiff.models.processes import process_state
    from prefdiff.rounds.loop import run_rounds
    from prefdiff.tracking import log_round_run

    if not process_state(params).is_main_process:  # one of the launched processes: it shares the work, silently
        run_rounds(params, paths.root)
        return

    with tracked("rounds", params, paths, ("rounds", "sample", "label", "train")) as log_metrics:
        parent = mlflow.active_run().info.run_id
        result = run_rounds(params, paths.root, on_round=lambda row: log_round_run(parent, row), progress=say)
        log_metrics({f"rounds/final/{k}": v for k, v in result.summary.items()})
        say(f"rounds: {len(result.computed)} computed, {result.resumed} resumed from data/rounds; "
            f"{result.summary['samples']} images in all")


if __name__ == "__main__":
    run_stage(main)
