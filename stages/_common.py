"""What every stage does around its one library call: validate params, open the MLflow run, report errors.

Stages run with the DVC workspace as the current directory (``dvc repro`` does that), so paths come from
``Paths(Path.cwd())``. The whole params.yaml is validated first, before any heavy import, so a typo in
any section fails every stage at once with a message naming the key; then what params name outside the
file (prompt files, the base model's files, the devices) is checked the same way (``load_or_exit``).
A user's error found later (a corrupt dataset, a model file that does not load) is the same one ``error:``
line and exit status 2 (``run_stage``), never a traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from prefdiff.config import Params, ParamsError, check_files, load_params
from prefdiff.paths import Paths


def say(message: str) -> None:
    print(message, flush=True)


def refuse(err: Exception | str) -> NoReturn:
    """Bad input: one ``error:`` line per problem on stderr (each names the key or file and the fix), exit
    status 2, no traceback."""
    problems = err.problems if isinstance(err, ParamsError) else [" ".join(str(err).split())]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def load_or_exit(paths: Paths) -> Params:
    """Every stage's first step: the whole params.yaml (every section and key present, types, ranges), the
    prompt sets it names on disk, the base model's files and the devices against this machine; ``refuse``
    on the first problem, before any heavy work."""
    try:
        params = load_params(paths.params)
        check_files(params, paths.root)
    except ParamsError as err:
        refuse(err)
    why = machine_refusal(params, paths)
    if why is not None:
        refuse(why)
    return params


def machine_refusal(params: Params, paths: Paths) -> str | None:
    """Why this machine cannot run ``params`` (None: it can): a device that is not here (``model.device`` and
    a ``device`` in the judge's or scorers' args), a base model whose files are not here or incomplete."""
    from prefdiff.models.loading import ModelNotFoundError, device_problem, locate_model

    devices = {"model.device": params.model.device}
    if isinstance(params.label.judge_args.get("device"), str):
        devices["label.judge_args.device"] = params.label.judge_args["device"]
    for name, args in params.evaluate.scorer_args.items():
        if isinstance(args.get("device"), str):
            devices[f"evaluate.scorer_args.{name}.device"] = args["device"]
    for key, device in devices.items():
        problem = device_problem(device, key)
        if problem is not None:
            return problem
    try:
        source = params.model.source
        relative = not source.startswith("builtin:") and not Path(source).expanduser().is_absolute()
        if relative and (paths.root / source).exists():  # a local dir relative to the workspace
            source = str(paths.root / source)
        locate_model(source, params.model.revision)
    except ModelNotFoundError as err:
        return str(err)
    return None


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (params, prompt files, datasets, model files, devices), not a bug: each
    message names the key or file and what to do; or a run that cannot usefully go on (``RunError``: non-finite
    numbers, a policy that did not learn, out of memory), whose message names the keys to change. Imported
    here, when one was raised, not at start-up."""
    from prefdiff.data import DatasetError
    from prefdiff.models.loading import DeviceError, ModelNotFoundError
    from prefdiff.prompts import PromptSetError
    from prefdiff.sampling.guards import RunError

    return ParamsError, PromptSetError, DatasetError, ModelNotFoundError, DeviceError, RunError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a user's error (``user_errors``) raised anywhere in it is refused as one
    ``error:`` line with exit status 2 instead of a traceback."""
    try:
        main()
    except Exception as err:
        if isinstance(err, user_errors()):
            refuse(err)
        raise


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


ACCELERATE_CONFIG_ENV = "PREFDIFF_ACCELERATE_CONFIG"


def launch_command(stage: str, processes: int, *, mixed_precision: str = "no",
                   environ: Mapping[str, str] = os.environ) -> list[str] | None:
    """The command that reruns ``stages.<stage>`` as ``processes`` processes under ``accelerate launch``, or None:
    work here (one process, or one of the launched ones: the launcher sets LOCAL_RANK in each)."""
    if processes == 1 or "LOCAL_RANK" in environ:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    config = environ.get(ACCELERATE_CONFIG_ENV)
    if config:  # its machines, FSDP or DeepSpeed settings; the process count is that of all nodes
        cmd += ["--config_file", config]
    else:  # one process per GPU (torchrun), or per CPU worker meeting over gloo when model.device is the CPU
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", mixed_precision,
                # a free port, not accelerate's fixed 29500: two launched stages on one machine (two pipelines, or
                # an experiment beside a run) would otherwise meet on the same rendezvous port
                "--main_process_port", str(free_port())]
    return cmd + ["-m", f"stages.{stage}"]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(stage: str, processes: int, *, mixed_precision: str = "no") -> None:
    """With ``processes`` > 1 and no launcher yet: run this stage as that many processes under ``accelerate
    launch`` and exit with their status (the command DVC runs stays ``python -m stages.<stage>``); else return,
    and this process does the work."""
    launch = launch_command(stage, processes, mixed_precision=mixed_precision)
    if launch is not None:
        say(f"{stage}: {processes} processes: {' '.join(launch[1:])}")
        raise SystemExit(subprocess.run(launch, check=False).returncode)

