"""Prefect flow ``compare-methods``: one labeled data set, every method as a DVC experiment, one table.

1. ``dvc repro --single-item`` sample, label and heldout in the workspace (the round's tasks, cached when
   unchanged), logged into the parent MLflow run "compare";
2. per method of ``compare.methods`` (or the ``methods`` flow parameter), one DVC experiment
   ``compare-<method>``: the flow resolves that method's baseline (``registry/baseline.json``, as the round
   does before evaluate), then ``dvc exp run --temp -n compare-<method> -S train.method=<method> -S <its
   compare.overrides, flattened> evaluate``. It reproduces the pipeline up to evaluate; sample, label and
   heldout do not read any train key, so DVC finds them cached and only train and evaluate run. The
   stages log into a child MLflow run of the parent (``MLFLOW_RUN_ID``), as they log into a round's run;
3. the table from ``dvc exp show --json`` (the experiments' params.yaml and metrics files, not anything
   computed in this process): ``reports/comparison.md`` / ``.json``, logged to the parent run; every
   child run gets the same metric names (``eval_win_rate``, ``train_final_loss``, ...).

Why ``--temp``, one experiment after another: each experiment starts from the same workspace (HEAD plus
its uncommitted changes), so one method's overrides never leak into the next, and the workspace's
params.yaml, dvc.lock and outputs stay as they were. The queue (``--queue`` + ``dvc queue start``) runs
in detached Celery workers that share one environment, so each experiment could not log into its own
MLflow child run, and its output would not reach the Prefect log. Register stays out of the experiments:
registering every compared method as a model version would move the champion alias at every comparison;
``dvc exp apply compare-<method>`` then ``dvc repro --allow-missing register`` registers the one you choose.

Run: ``make compare`` (= ``python -m flows.compare``), or ``python -m flows.compare --methods d3po sft``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.round import (
    REPO_ROOT,
    TAIL_LINES,
    _dvc_executable,
    _logger,
    _mark_failed,
    open_parent_run,
    refused,
    run_flow_cli,
    resolve_baseline,
    run_stage,
    stage_env,
    stream_command,
)
from prefdiff.config import ParamsError, load_params
from prefdiff.data.atomic import atomic_write_json, atomic_write_text
from prefdiff.paths import Paths

COMMAND = "make compare"
EXPERIMENT_PREFIX = "compare-"
# Stages that read no train key: run once in the workspace, cached inside every experiment.
SHARED_STAGES = ("sample", "label", "heldout")
# The last stage each experiment reproduces (with everything upstream of it): train and evaluate run,
# the shared stages are cached, register stays out (see the module docstring).
EXPERIMENT_TARGET = "evaluate"
REPORT_MD = Path("reports") / "comparison.md"
REPORT_JSON = Path("reports") / "comparison.json"
METHOD_TAG = "prefdiff.method"
EXPERIMENT_TAG = "prefdiff.dvc_experiment"
EXPERIMENT_REV_TAG = "prefdiff.dvc_experiment_rev"
# metrics/train.json keys that describe the run rather than its outcome: not logged as train_final_*
_TRAIN_BOOKKEEPING = frozenset({"epochs", "resumed_from_step"})


def experiment_name(method: str) -> str:
    return f"{EXPERIMENT_PREFIX}{method}"


# --------------------------------------------------------------------------------------------------
# compare.overrides -> `dvc exp run -S` arguments
# --------------------------------------------------------------------------------------------------

# Unquoted, Hydra's override grammar reads these words as bool / null / float, not as strings.
_HYDRA_WORDS = frozenset({"true", "false", "null", "inf", "nan"})
_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DICT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def _quote(text: str) -> str:
    # Hydra's quoted strings keep backslashes literally except before a quote: escape the quotes, double
    # the backslashes in front of one (and before the closing quote), and escape "${" so OmegaConf does
    # not read an interpolation.
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return "'" + body.replace("${", "\\${") + "'"


def hydra_value(value: Any, key: str = "value") -> str:
    """``value`` as a `-S` value that DVC's parser (Hydra's override grammar) reads back as the same
    Python value and type, so params.yaml holds what ``compare.overrides`` said: ``0.001`` a float, ``4``
    an int, ``'no'`` / ``'1e3'`` strings, ``null``, ``true``, lists and mappings recursively."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.001, 500.0, 1e-08, inf, nan: all Hydra floats
    if isinstance(value, str):
        plain = _PLAIN_STRING.fullmatch(value) and value.lower() not in _HYDRA_WORDS
        return value if plain else _quote(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        bad = [k for k in value if not (isinstance(k, str) and _DICT_KEY.fullmatch(k))]
        if bad:
            raise ValueError(f"{key}: mapping keys {bad} cannot be passed to `dvc exp run -S` (allowed: "
                             "names of letters, digits, '_' and '-')")
        return "{" + ", ".join(f"{k}: {hydra_value(v, f'{key}.{k}')}" for k, v in value.items()) + "}"
    raise ValueError(f"{key}: {value!r} ({type(value).__name__}) cannot be passed to `dvc exp run -S` "
                     "(allowed: null, bool, int, float, str, lists and mappings of them)")


def flatten_overrides(overrides: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """Dotted keys of every leaf of a nested mapping: ``{lr: 0.001, diffusion_dpo: {beta: 500.0}}`` under
    ``train`` -> ``[("train.lr", 0.001), ("train.diffusion_dpo.beta", 500.0)]``. A mapping is a section
    to descend into, so only the keys it names change; an empty one changes nothing."""
    out: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out += flatten_overrides(value, dotted)
        else:
            out.append((dotted, value))
    return out


def _has_key(params: Mapping[str, Any], dotted: str) -> bool:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def set_param_args(method: str, overrides: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The ``-S`` values of one method's experiment: ``train.method=<method>`` and its overrides (a
    partial ``train`` mapping, flat or nested). ``current`` is the workspace's params.yaml: DVC applies
    ``-S`` in Hydra's struct mode, which refuses a key the file lacks unless written ``++key=value``."""
    pairs = [("train.method", method), *flatten_overrides(overrides, "train")]
    return [f"{'' if _has_key(current, k) else '++'}{k}={hydra_value(v, k)}" for k, v in pairs]


def check_experiment_params(params_path: Path, set_params: Sequence[str], label: str) -> None:
    """Apply ``set_params`` to a copy of ``params_path`` exactly as ``dvc exp run -S`` will (DVC's own
    function) and validate the result, so a bad override fails before any experiment runs.
    Raises ParamsError naming ``label``, the key and what is allowed."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_text(params_path.read_text())
        try:
            apply_overrides(copy, list(set_params))
        except InvalidArgumentError as err:
            cause = str(err.__cause__ or err).strip().splitlines()[0]
            raise ParamsError(f"{label}: `dvc exp run -S` cannot apply {list(set_params)}: {cause}") from None
        try:
            load_params(copy)
        except ParamsError as err:
            raise ParamsError(f"{label} ({' '.join(set_params)}): {str(err).replace(str(copy), 'params.yaml')}") \
                from None


# --------------------------------------------------------------------------------------------------
# Experiments and their results
# --------------------------------------------------------------------------------------------------


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _remove_same_named(repo: str, name: str) -> bool:
    """Remove experiment ``name`` of the current baseline commit (a rerun replaces it; one of another
    baseline is another experiment and stays). True if there was one."""
    from dvc.repo.experiments.refs import ExpRefInfo

    ref = str(ExpRefInfo(baseline_sha=_git(repo, "rev-parse", "HEAD"), name=name))
    exists = subprocess.run(["git", "rev-parse", "--verify", "--quiet", ref], cwd=repo, capture_output=True)
    if exists.returncode != 0:
        return False
    subprocess.run([_dvc_executable(), "exp", "remove", ref], cwd=repo, check=True, capture_output=True)
    return True


@task(name="open-method-run", task_run_name="open-method-run-{method}", cache_policy=NO_CACHE)
def open_method_run(repo: str, parent_run_id: str, method: str) -> str:
    """A child run of ``parent_run_id`` for ``method``, ended at once: the experiment's stages resume it."""
    import mlflow

    from prefdiff.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(Path(repo)))
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=method, tags={
        "mlflow.parentRunId": parent_run_id, METHOD_TAG: method, EXPERIMENT_TAG: experiment_name(method)})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def method_baseline(repo: str, method: str) -> list[str]:
    """Write ``registry/baseline.json`` (and ``models/baseline``) for ``method``'s experiment, as the round
    does before evaluate: with ``evaluate.baseline: champion`` each method compares with the champion of
    its own registered model. Returns those of the two paths that exist: the experiment copies them in."""
    from prefdiff.registry import resolve_baseline as resolve

    root = Path(repo)
    params = load_params(Paths(root).params)
    resolve(root, params.evaluate.baseline, params.register.registered_name(method))
    paths = Paths(root)
    return [p.relative_to(root).as_posix() for p in (paths.baseline, paths.baseline_weights) if p.exists()]


@task(name="dvc-exp-run", task_run_name="dvc-exp-run-{method}", cache_policy=NO_CACHE)
def run_experiment(repo: str, method: str, set_params: list[str], run_id: str) -> dict[str, Any]:
    """Resolve ``method``'s baseline, then ``dvc exp run --temp -n compare-<method> -S ... evaluate``, each
    output line logged as it arrives, the stages logging into MLflow run ``run_id``. Returns ``{"method",
    "experiment", "seconds"}``; raises RuntimeError with the last lines of output if the experiment fails."""
    log = _logger()
    name = experiment_name(method)
    if _remove_same_named(repo, name):
        log.info(f"replacing experiment {name} of this commit")
    cmd = [_dvc_executable(), "exp", "run", "--temp", "-n", name]
    for copied in method_baseline(repo, method):  # untracked or ignored: a temp copy would lack them
        cmd += ["-C", copied]
    for value in set_params:
        cmd += ["-S", value]
    cmd.append(EXPERIMENT_TARGET)
    log.info(f"$ {' '.join(cmd[1:])}  (in {repo})")
    began = time.time()
    code, lines = stream_command(cmd, repo, stage_env(repo, run_id))
    seconds = round(time.time() - began, 1)
    if code != 0:
        tail = lines[-TAIL_LINES:]
        raise RuntimeError(f"experiment {name} failed: `dvc exp run` exited with {code} after {seconds} s; "
                           f"last {len(tail)} lines:\n" + "\n".join(tail))
    log.info(f"experiment {name}: done in {seconds} s")
    return {"method": method, "experiment": name, "seconds": seconds}


def experiment_result(show: list[dict[str, Any]], baseline: str, name: str,
                      metrics_files: Mapping[str, str]) -> dict[str, Any]:
    """Experiment ``name`` of commit ``baseline`` in ``dvc exp show --json``: ``{"rev", "params": its
    params.yaml, <key>: the data of metrics_files[key]}``. Raises ValueError naming a missing experiment
    or an unreadable metrics file."""
    commit = next((entry for entry in show if entry.get("rev") == baseline), None)
    revs = next((exp["revs"] for exp in (commit or {}).get("experiments") or []
                 if exp.get("name") == name and exp.get("revs")), None)
    if revs is None:
        raise ValueError(f"`dvc exp show --json` lists no experiment {name} of commit {baseline[:7]}")
    data = revs[0]["data"]
    out = {"rev": revs[0]["rev"], "params": data["params"]["params.yaml"]["data"]}
    for key, path in metrics_files.items():
        entry = (data.get("metrics") or {}).get(path, {})
        if "data" not in entry:
            why = entry.get("error", {}).get("msg", "not among the experiment's metrics")
            raise ValueError(f"experiment {name}: {path}: {why}")
        out[key] = entry["data"]
    return out


@task(name="dvc-exp-show", task_run_name="dvc-exp-show-{method}", cache_policy=NO_CACHE)
def read_experiment(repo: str, method: str) -> dict[str, Any]:
    """``method``'s result, read back through DVC: ``{"method", "experiment", "rev", "params" (its train
    section), "train" (metrics/train.json), "eval" (metrics/eval.json)}``."""
    paths = Paths(Path(repo))
    shown = subprocess.run([_dvc_executable(), "exp", "show", "--json"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout
    files = {"train": paths.train_metrics.relative_to(paths.root).as_posix(),
             "eval": paths.eval_metrics.relative_to(paths.root).as_posix()}
    name = experiment_name(method)
    row = experiment_result(json.loads(shown), _git(repo, "rev-parse", "HEAD"), name, files)
    return {"method": method, "experiment": name, "rev": row["rev"], "params": row["params"]["train"],
            "train": row["train"], "eval": row["eval"]}


def method_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """A method's summary metrics under the names every child run shares: ``eval_<k>`` for each number
    of metrics/eval.json's top level, ``train_final_<k>`` for metrics/train.json's outcomes."""
    def numbers(values: Mapping[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    out = {f"eval_{k}": v for k, v in numbers(result["eval"]).items()}
    out |= {f"train_final_{k}": v for k, v in numbers(result["train"]).items() if k not in _TRAIN_BOOKKEEPING}
    return out


@task(name="log-method-run", task_run_name="log-method-run-{result[method]}", cache_policy=NO_CACHE)
def log_method_run(repo: str, result: dict[str, Any]) -> None:
    """Into the method's child run: ``method_metrics``, the experiment's train params that the train stage
    did not log itself (it logs nothing when DVC restored it from the run cache), the experiment's rev."""
    import mlflow
    from mlflow.entities import Metric, Param

    from prefdiff.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(Path(repo)))
    run_id = result["run_id"]
    have = client.get_run(run_id).data.params
    params = [Param(k, str(v)) for k, v in flatten_overrides(result["params"], "train") if k not in have]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in sorted(method_metrics(result).items()) if math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_tag(run_id, EXPERIMENT_REV_TAG, result["rev"])


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def comparison_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per method with its eval metrics against the base and its training cost.

    "train acc" is the implicit accuracy on the training batches of the last epoch (DPO methods);
    "held-out acc" the implicit reward accuracy on held-out pairs in D3PO's (trajectory) and
    Diffusion-DPO's (ELBO) forms, when the evaluation computed them.
    """
    header = ("| method | win-rate vs base [95% CI] | W / L / T | base reward | trained reward | gain | "
              "final train loss | train acc | held-out acc (traj / ELBO) | train steps | train s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    nan = float("nan")
    for r in results:
        e, t = r["eval"], r["train"]
        imp = e.get("implicit", {})
        held = f"{_fmt(imp.get('implicit_acc_trajectory', nan))} / {_fmt(imp.get('implicit_acc_elbo', nan))}"
        lines.append(
            f"| {r['method']} | {_fmt(e['win_rate'])} [{_fmt(e['win_rate_low'])}, {_fmt(e['win_rate_high'])}] | "
            f"{e['wins']} / {e['losses']} / {e['ties']} | {_fmt(e['base_mean_reward'])} | "
            f"{_fmt(e['trained_mean_reward'])} | {_fmt(e['reward_gain'], 4)} | {_fmt(t.get('loss', nan), 4)} | "
            f"{_fmt(t.get('implicit_acc', nan))} | {held} | {t['steps']} | {_fmt(float(t['seconds']), 1)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(root: Path, results: Sequence[Mapping[str, Any]], *, command: str) -> Path:
    """``reports/comparison.md`` (the table, how it was made, the experiments) and ``reports/comparison.json``."""
    samples = results[0]["eval"]["num_samples"] if results else 0
    judges = ", ".join(sorted({str(r["eval"].get("judge")) for r in results}))
    experiments = ", ".join(f"`{r['experiment']}` ({r['rev'][:7]})" for r in results)
    text = (f"# Method comparison\n\nSame labeled data, same held-out prompts and seeds ({samples} paired samples "
            f"per method), judge `{judges}`. Produced by `{command}`; one DVC experiment per method: "
            f"{experiments}. Inspect them with `dvc exp show`; bring one into the workspace with "
            f"`dvc exp apply {EXPERIMENT_PREFIX}<method>`.\n\n" + comparison_table(results))
    md, js = root / REPORT_MD, root / REPORT_JSON
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, text)
    atomic_write_json(js, {"judge": judges, "command": command, "results": list(results)})
    return md


# --------------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------------


@flow(name="compare-methods", log_prints=True,
      description="Every method as a DVC experiment on the same labeled data, evaluated against the base; one table.")
def compare_methods(repo: str | None = None, methods: list[str] | None = None) -> dict[str, Any]:
    """Returns ``{"run_id": the parent MLflow run, "report": reports/comparison.md, "results": one per method}``."""
    root = Path(repo).resolve() if repo else REPO_ROOT
    paths = Paths(root)
    params = load_params(paths.params)
    todo = list(methods) if methods else list(params.compare.methods)
    if len(set(todo)) != len(todo):
        raise ValueError(f"methods {todo}: each method may appear once (it is one experiment)")
    current = yaml.safe_load(paths.params.read_text())
    set_params = {m: set_param_args(m, params.compare.overrides.get(m, {}), current) for m in todo}
    for m in todo:  # every method's overrides, before any work
        check_experiment_params(paths.params, set_params[m], f"compare.overrides.{m}")

    repo_s = str(root)
    parent = open_parent_run(repo_s, params.register.experiment, "compare")
    failing: list[str] = [parent]  # the MLflow runs to mark FAILED if this goes wrong now
    step: str | None = None
    results: list[dict[str, Any]] = []
    try:
        for stage in SHARED_STAGES:
            step = stage
            run_stage(stage, repo_s, parent)
        step = None
        for m in todo:
            child = open_method_run(repo_s, parent, m)
            failing.append(child)
            run_experiment(repo_s, m, set_params[m], child)
            result = read_experiment(repo_s, m) | {"run_id": child}
            log_method_run(repo_s, result)
            failing.remove(child)
            results.append(result)
        resolve_baseline(repo_s)  # the workspace's own baseline again (its train.method's), as a round leaves it
        report = write_report(root, results, command=COMMAND)

        import mlflow

        from prefdiff.tracking import tracking_uri

        client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
        client.log_artifact(parent, str(report))
        client.log_artifact(parent, str(root / REPORT_JSON))
        client.set_terminated(parent, status="FINISHED")
    except BaseException as err:
        for run_id in failing:
            _mark_failed(repo_s, run_id, step if run_id == parent else None, err, [])
        raise
    print(report.read_text())
    return {"run_id": parent, "report": str(report), "results": results}


def main(argv: list[str] | None = None, prog: str = "python -m flows.compare") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", help="default: compare.methods in params.yaml")
    args = parser.parse_args(argv)
    try:
        load_params(Paths(REPO_ROOT).params)  # before the ephemeral Prefect server starts (~10 s)
    except ParamsError as err:
        return refused(err)
    return run_flow_cli("compare-methods", lambda: compare_methods(methods=args.methods))


if __name__ == "__main__":
    sys.exit(main())
