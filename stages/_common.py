"""What every stage does around its one library call: validate params, open the MLflow run, report errors.

Stages run with the DVC workspace as the current directory (``dvc repro`` does that), so paths come from
``Paths(Path.cwd())``. The whole params.yaml is validated first, before any heavy import, so a typo in
any section fails every stage at once with a message naming the key.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from prefdiff.config import Params, ParamsError, load_params
from prefdiff.paths import Paths


def say(message: str) -> None:
    print(message, flush=True)


def refuse(err: Exception | str) -> NoReturn:
    """Bad input: its one-line message on stderr and exit status 2, no traceback."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def load_or_exit(paths: Paths) -> Params:
    try:
        return load_params(paths.params)
    except ParamsError as err:
        refuse(err)


def flatten(prefix: str, section: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys of a (nested) params section: ``train.d3po.beta``."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        out |= flatten(f"{prefix}.{key}", value) if isinstance(value, dict) and value else {f"{prefix}.{key}": value}
    return out


@contextmanager
def tracked(stage: str, params: Params, paths: Paths, sections: tuple[str, ...]) -> Iterator[Callable[..., None]]:
    """An MLflow run for the stage (the flow's parent run when MLFLOW_RUN_ID is set).

    Yields ``log_metrics(metrics: dict, step: int | None)``; the sections' params are logged on entry.
    """
    import mlflow

    from prefdiff.tracking import stage_run

    began = time.time()
    with stage_run(stage, paths.root, params.register.experiment):
        for name in sections:
            mlflow.log_params(flatten(name, getattr(params, name).model_dump()))

        def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            mlflow.log_metrics(numeric, step=step)

        yield log_metrics
        mlflow.log_metric(f"{stage}/seconds", time.time() - began)
    say(f"{stage}: done in {time.time() - began:.1f} s")


def workspace() -> Paths:
    return Paths(Path.cwd())
