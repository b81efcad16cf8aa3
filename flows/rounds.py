"""``preference-rounds``: many preference rounds as one Prefect flow, one MLflow parent run, a child run per round.

For automatic judges (``label.source``: judge or simulated) the rounds run in ONE process: the DVC stage
``rounds`` (pipelines/rounds/dvc.yaml, ``prefdiff.rounds``), so no round pays process start-up and DVC
versions every round's data (``data/rounds``) and the curves. The flow:

1. ``set_round_count``: with ``rounds`` given, writes it into params.yaml's ``rounds.count`` (validated first),
   so dvc.lock records how many rounds ran; rounds already in ``data/rounds`` with the same settings are
   kept, so a larger count appends and a rerun after an interruption resumes;
2. ``open_parent_run`` (as the single round's flow): the parent MLflow run; the stage logs into it and makes
   each round a child run (tag ``mlflow.parentRunId``) as soon as the round is done;
3. ``run_stage``: ``dvc repro --single-item pipelines/rounds/dvc.yaml:rounds``, its output in the Prefect log;
4. ``log_rounds``: the child runs of rounds this parent lacks (DVC skipped the stage as up to date, or rounds
   were resumed from an earlier run) from their ``round.json``, lineage, the per-round curves (plots/rounds.png,
   the CSVs) and metrics/rounds.json as artifacts.

Human-labeled rounds cannot run in one process (people label between rounds): ``flows.human.human_round``
with ``rounds`` runs them through the stages, the sample stage drawing from the previous round's LoRA
(``sample.lora``), each round a child run of its parent run too.

Run: ``make rounds`` (= ``python -m flows.rounds``), ``python -m flows.rounds --rounds 50``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.round import (_flow_run_info, _logger, _mark_failed, open_parent_run, refused, retry_on_io_error,
                         run_flow_cli, run_stage, ui_hint)
from prefdiff.config import ParamsError, load_params, with_param_values
from prefdiff.paths import REPO_ROOT, Paths

ROUNDS_STAGE = "pipelines/rounds/dvc.yaml:rounds"
def with_round_count(text: str, count: int) -> str:
    """params.yaml's text with ``rounds.count`` set to ``count``, every other byte (comments too) unchanged.
    Raises ParamsError when the file has no ``rounds:`` section with a ``count:`` line."""
    return with_param_values(text, {"rounds.count": str(count)})


def write_params(repo: str, values: dict[str, str]) -> bool:
    """Set ``values`` (``{"section.key": YAML value text}``) in ``repo``'s params.yaml, keeping every comment;
    the result is validated before it is written. True if the file changed."""
    import yaml

    from prefdiff.config import parse_params
    from prefdiff.data.atomic import atomic_write_text

    path = Paths(Path(repo)).params
    text = path.read_text()
    new = with_param_values(text, values)
    parse_params(yaml.safe_load(new), f"{path} with " + ", ".join(f"{k} = {v}" for k, v in values.items()))
    if new == text:
        return False
    atomic_write_text(path, new)
    _logger().info("params.yaml: " + ", ".join(f"{k} = {v}" for k, v in values.items()))
    return True


@task(name="set-round-count", cache_policy=NO_CACHE)
def set_round_count(repo: str, count: int) -> bool:
    """``rounds.count = count`` in ``repo``'s params.yaml (validated before it is written); True if it changed."""
    return write_params(repo, {"rounds.count": str(count)})


@task(name="log-rounds", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_error,
      cache_policy=NO_CACHE)
def log_rounds(repo: str, run_id: str) -> dict[str, Any]:
    """Into the parent run: a child run for every round on disk it has none for (from ``round.json``), lineage
    tags, metrics/rounds.json's numbers (``rounds/final/<k>``, when the stage did not log them) and the curves
    as artifacts. Returns ``{"run_id", "summary", "children": {round: child run id}}``."""
    import json
    import time

    import mlflow
    from mlflow.entities import Metric

    from prefdiff.rounds.records import read_record, round_dir
    from prefdiff.tracking import ensure_experiment, log_lineage, log_round_run, round_runs, tracking_uri

    root, paths = Path(repo), Paths(Path(repo))
    params = load_params(paths.params)
    ensure_experiment(params.register.experiment, root)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    children = round_runs(run_id)
    added = []
    for r in range(1, params.rounds.count + 1):
        record = read_record(round_dir(paths.rounds, r))
        if record is not None and r not in children:
            children[r] = log_round_run(run_id, record["metrics"], tags={"prefdiff.round_logged_from": "round.json"})
            added.append(r)
    summary = json.loads(paths.rounds_metrics.read_text()) if paths.rounds_metrics.is_file() else {}
    have = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    missing = [Metric(f"rounds/final/{k}", float(v), now, 0) for k, v in summary.items()
               if isinstance(v, int | float) and f"rounds/final/{k}" not in have]
    if missing:
        client.log_batch(run_id, metrics=missing)
    log_lineage(root, run_id=run_id)
    for path in (paths.rounds_figure, paths.rounds_plot, paths.rounds_eval_plot, paths.rounds_metrics):
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="rounds")
    _logger().info(f"logged into run {run_id}: {len(children)} round child runs ({len(added)} from round.json: "
                   f"{added or 'none'})")
    return {"run_id": run_id, "summary": summary, "children": children}


def summarize(result: dict[str, Any], uri: str) -> str:
    s = result.get("summary") or {}
    lines = [f"Rounds done: MLflow run {result['run_id']} with {len(result['children'])} round child runs",
             f"  rounds      : {s.get('rounds')} ({s.get('method')}, reference {s.get('reference')}), "
             f"{s.get('samples')} images sampled; stage {'ran' if result.get('ran') else 'skipped (up to date)'}"]
    if "final_eval_reward" in s:
        lines.append(f"  reward      : {s['final_eval_reward']:.4f} after round {s['final_round_evaluated']} vs base "
                     f"{s['base_eval_reward']:.4f} ({s.get('eval_judge')}, evaluation prompts)")
        lines.append(f"  win-rate    : {s['final_win_rate']:.3f} (95% prompt-clustered bootstrap "
                     f"{s['final_win_rate_low']:.3f} - {s['final_win_rate_high']:.3f}) vs base")
    lines.append("  curves      : plots/rounds.png, plots/rounds.csv, plots/rounds_eval.csv "
                 "(dvc plots show pipelines/rounds/dvc.yaml)")
    lines.append(f"  MLflow UI   : {ui_hint(uri)}")
    return "\n".join(lines)


@flow(name="preference-rounds", log_prints=True,
      description="Many automatic-judge preference rounds in one process (DVC stage rounds), one MLflow child run "
                  "per round.")
def preference_rounds(rounds: int | None = None, repo: str | None = None, run_name: str | None = None) -> dict:
    """Run ``rounds`` rounds (default: params.yaml's ``rounds.count``) in ``repo`` (default: this repo) through
    the DVC stage ``rounds``, all tracked under one new MLflow parent run with a child run per round.
    Returns ``{"run_id", "summary" (metrics/rounds.json), "children": {round: run id}, "ran": bool}``."""
    root = Path(repo).resolve() if repo else REPO_ROOT
    repo_s = str(root)
    params = load_params(Paths(root).params)  # fail fast, naming the key, before anything heavy
    from prefdiff.rounds.loop import rounds_refusal

    why = rounds_refusal(params)
    if why is not None:
        raise ValueError(why)
    if rounds is not None and not (isinstance(rounds, int) and 1 <= rounds <= 100_000):
        raise ValueError(f"rounds = {rounds!r}: allowed: an integer 1..100000, or None for params.yaml's rounds.count")
    if not (root / ROUNDS_STAGE.split(":")[0]).is_file():
        raise FileNotFoundError(f"{root} has no {ROUNDS_STAGE.split(':')[0]}: not a prefdiff workspace")
    if rounds is not None:
        set_round_count(repo_s, rounds)
    if run_name is None:
        _, flow_run_name = _flow_run_info()
        run_name = f"rounds-{flow_run_name}" if flow_run_name else None
    run_id = open_parent_run(repo_s, params.register.experiment, run_name)
    try:
        stage = run_stage(ROUNDS_STAGE, repo_s, run_id)
        result = log_rounds(repo_s, run_id)
    except BaseException as err:
        _mark_failed(repo_s, run_id, "rounds", err, [])
        raise
    result["ran"] = stage["ran"]

    from prefdiff.tracking import tracking_uri

    print(summarize(result, tracking_uri(root)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.rounds", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="number of rounds (default: params.yaml rounds.count)")
    args = parser.parse_args(argv)
    try:
        params = load_params(Paths(REPO_ROOT).params)  # before the ephemeral Prefect server starts (~10 s)
        from prefdiff.rounds.loop import rounds_refusal

        why = rounds_refusal(params)
        if why is not None:
            raise ParamsError(why)
    except ParamsError as err:
        return refused(err)
    return run_flow_cli("preference_rounds", lambda: preference_rounds(rounds=args.rounds))


if __name__ == "__main__":
    sys.exit(main())
