"""Prefect flow ``compare-methods``: one labeled data set, every method, one table.

1. ``dvc repro --single-item`` sample and label (the same tasks as a round: cached when unchanged), so
   every method sees the same ``data/trajectories`` and ``data/preferences``;
2. one task per method of ``compare.methods`` (or the ``methods`` flow parameter): train on those data
   and evaluate against the base with the same prompts and seeds, as a child MLflow run of the flow's
   parent run (params, train and eval metrics under the same names, so they compare side by side);
3. ``reports/comparison.md`` / ``.json``, logged to the parent run.

Run: ``make compare`` (= ``python -m flows.compare``), or ``python -m flows.compare --methods d3po sft``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.round import REPO_ROOT, _logger, open_parent_run, run_stage
from prefdiff.config import TRAIN_METHODS, load_params
from prefdiff.paths import Paths

COMMAND = "make compare"


@task(name="train-and-evaluate", task_run_name="train-and-evaluate-{method}", cache_policy=NO_CACHE)
def method_task(repo: str, method: str, parent_run_id: str) -> dict[str, Any]:
    """Train and evaluate ``method`` inside a child MLflow run of ``parent_run_id``."""
    import mlflow

    from prefdiff.compare import method_paths, train_and_evaluate
    from prefdiff.tracking import tracking_uri

    log = _logger()
    paths = Paths(Path(repo))
    params = load_params(paths.params)
    mlflow.set_tracking_uri(tracking_uri(paths.root))
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=method, nested=mlflow.active_run() is not None,
                          tags={"mlflow.parentRunId": parent_run_id, "prefdiff.method": method}) as run:
        mparams = params.for_method(method)
        mlflow.log_params({f"train.{k}": v for k, v in mparams.train.model_dump().items()})

        def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
            mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()}, step=step)

        result = train_and_evaluate(params, paths, method, progress=log.info, log_metrics=log_metrics)
        numeric = {f"eval_{k}": float(v) for k, v in result["eval"].items() if isinstance(v, int | float)}
        numeric |= {f"train_final_{k}": float(v) for k, v in result["train"].items()
                    if isinstance(v, int | float) and k not in ("epochs", "resumed_from_step")}
        mlflow.log_metrics(numeric)
        grid = method_paths(paths, method).eval_dir / "grid.png"
        if grid.is_file():
            mlflow.log_artifact(str(grid))
        result["run_id"] = run.info.run_id
    return result


@flow(name="compare-methods", log_prints=True,
      description="Train every method on the same labeled data, evaluate each against the base, write one table.")
def compare_methods(repo: str | None = None, methods: list[str] | None = None) -> dict[str, Any]:
    root = Path(repo).resolve() if repo else REPO_ROOT
    params = load_params(Paths(root).params)
    todo = list(methods) if methods else list(params.compare.methods)
    unknown = [m for m in todo if m not in TRAIN_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {', '.join(TRAIN_METHODS)}")
    for m in todo:
        params.for_method(m)  # validate every method's overrides before any work
    repo_s = str(root)
    parent = open_parent_run(repo_s, params.register.experiment, "compare")
    for stage in ("sample", "label"):
        run_stage(stage, repo_s, parent)
    results = [method_task(repo_s, m, parent) for m in todo]

    import mlflow

    from prefdiff.compare import REPORT_JSON, write_report
    from prefdiff.tracking import tracking_uri

    report = write_report(Paths(root), results, judge=params.eval_judge, command=COMMAND)
    mlflow.set_tracking_uri(tracking_uri(root))
    client = mlflow.MlflowClient()
    client.log_artifact(parent, str(report))
    client.log_artifact(parent, str(root / REPORT_JSON))
    client.set_terminated(parent, status="FINISHED")
    print(report.read_text())
    return {"run_id": parent, "report": str(report), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=TRAIN_METHODS, help="default: compare.methods in params.yaml")
    args = parser.parse_args(argv)
    try:
        compare_methods(methods=args.methods)
    except Exception as err:  # noqa: BLE001 - Prefect has logged the traceback already
        print(f"\ncompare-methods failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
