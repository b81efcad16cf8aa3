"""Register trained weights (a LoRA or a full UNet) in the MLflow Model Registry, gated against the champion.

Registry writes are side effects, not reproducible outputs: the register stage (or the flow) calls
``register_model`` after evaluation. It is idempotent: the inputs (weight files, eval metrics, model
config, model name) are fingerprinted, and a version already carrying that fingerprint is returned as is,
so re-running a round whose DVC stages were all skipped creates no duplicate version and moves no alias.

The decision is ``prefdiff.gate.decide``: the new version becomes ``champion`` only when its gate metric,
measured under the same evaluation protocol as the champion's (or re-measured in this evaluation with the
champion as baseline), beats it; every version carries its protocol fingerprint as a tag.

``resolve_baseline`` turns the registry's current champion into ``registry/baseline.json`` plus the
weights under ``models/baseline``: files DVC hashes, so the evaluate stage re-runs when the champion moves.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefdiff import tracking
from prefdiff.data.baseline import BASE, BaselineRef, read_baseline, tree_sha256, write_baseline
from prefdiff.data.baseline import CHAMPION as CHAMPION_KIND
from prefdiff.gate import PROMOTE, Candidate, Decision, GateRule, Incumbent, check_finite, decide
from prefdiff.paths import Paths

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_FINGERPRINT = "prefdiff.fingerprint"
TAG_PROTOCOL = "prefdiff.protocol"
TAG_GATE_METRIC = "prefdiff.gate_metric"
TAG_GATE_VALUE = "prefdiff.gate_value"
TAG_GATE_ACTION = "prefdiff.gate_action"
TAG_GATE_REASON = "prefdiff.gate_reason"
TAG_COMPARED_TO = "prefdiff.compared_to"
TAG_COMPARED_WITH = "prefdiff.compared_with"
TAG_MIN_IMPROVEMENT = "prefdiff.min_improvement"
TAG_SETTLED = "prefdiff.settled"  # the alias this version was given: its registration completed
WEIGHTS_ARTIFACT = "weights"  # key of the weights dir among the pyfunc model's artifacts
MAX_TAG_VALUE = 5000  # MLflow's limit on a model-version tag value

PACKAGE_DIR = Path(__file__).resolve().parent
PYFUNC_MODEL_FILE = PACKAGE_DIR / "serving" / "pyfunc_model.py"
# What the served model imports; pinned to the versions this process runs with.
SERVING_PACKAGES = ("torch", "diffusers", "peft", "transformers", "safetensors", "pillow", "pandas")
PREDICT_PARAMS: dict[str, Any] = {"seed": 0, "num_inference_steps": 20, "guidance_scale": 5.0, "eta": 1.0}


@dataclass(frozen=True)
class Registration:
    """What ``register_model`` did (registry/decision.json)."""

    model_name: str
    version: int
    alias: str  # "champion" | "challenger"
    action: str  # prefdiff.gate: promote | challenger | re-evaluate
    reason: str
    gate_metric: str
    value: float
    compared_to: float | None  # the number the gate compared against (None: nothing comparable)
    compared_with: str  # as prefdiff.gate.Decision.compared_with
    protocol: str  # protocol fingerprint of the evaluation
    fingerprint: str
    reused: bool  # True: this exact input was already registered; nothing was logged or moved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(weights_dir: Path, eval_metrics: dict, model_config: dict, model_name: str) -> str:
    """sha256 over the weights' tree hash (``prefdiff.data.baseline.tree_sha256``), ``json(eval_metrics)``,
    ``json(model_config)`` (sorted keys) and ``model_name``."""
    import hashlib

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"weights directory {weights_dir} does not exist")
    h = hashlib.sha256()
    h.update(f"weights {tree_sha256(weights_dir)}\n".encode())
    h.update(b"metrics " + json.dumps(eval_metrics, sort_keys=True, default=str).encode() + b"\n")
    h.update(b"config " + json.dumps(model_config, sort_keys=True, default=str).encode() + b"\n")
    h.update(b"name " + model_name.encode())
    return h.hexdigest()


def _metric(eval_metrics: dict, key: str, role: str) -> float:
    if key not in eval_metrics:
        raise ValueError(f"{role} {key!r} is not in the eval metrics; available keys: {sorted(eval_metrics)}")
    try:
        return float(eval_metrics[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{role} {key!r} = {eval_metrics[key]!r} is not a number") from e


def candidate_from_metrics(eval_metrics: dict, rule: GateRule) -> Candidate:
    """The gate's view of metrics/eval.json; raises ValueError naming a missing or non-numeric key."""
    value = _metric(eval_metrics, rule.metric, "gate_metric")
    base = None if rule.base_metric is None else _metric(eval_metrics, rule.base_metric, "base_metric")
    protocol = eval_metrics.get("protocol_fingerprint")
    if not isinstance(protocol, str) or not protocol:
        raise ValueError("the eval metrics have no 'protocol_fingerprint' (written by the evaluate stage); "
                         "re-run evaluate before registering")
    low = eval_metrics.get("win_rate_low")
    version = eval_metrics.get("baseline_version")
    return Candidate(value=value, protocol=protocol, baseline_value=base,
                     baseline_version=None if version is None else int(version),
                     win_rate_low=None if low is None else float(low))


def pip_requirements() -> list[str]:
    """``name==version`` for the serving stack, local labels dropped (``2.13.0+cpu`` -> ``2.13.0``:
    a public specifier matches any local build, while ``+cpu`` would not install from PyPI)."""
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
            continue
        reqs.append(f"{name}=={version.split('+', 1)[0]}")
    return reqs


def model_signature():
    """Input: DataFrame with a string column ``prompt``; output: prompt, seed, png (bytes);
    params with defaults. ``predict`` stays untyped in the model file: type hints there would make
    MLflow infer a signature from them, override this one and drop the params."""
    import pandas as pd
    from mlflow.models import infer_signature

    example_out = pd.DataFrame({"prompt": ["a cat"], "seed": [0], "png": [b"\x89PNG\r\n\x1a\n"]})
    return infer_signature(pd.DataFrame({"prompt": ["a cat"]}), example_out, params=dict(PREDICT_PARAMS))


def _find_version(client, model_name: str, fp: str):
    """The (lowest) version of ``model_name`` tagged with fingerprint ``fp``; None if none, or no such model."""
    versions = _search_versions(client, model_name)
    matches = [v for v in versions if (v.tags or {}).get(TAG_FINGERPRINT) == fp]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _search_versions(client, model_name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{model_name}'"))
    except MlflowException as e:
        if tracking.is_unreachable(e):
            raise
        return []  # no such registered model yet


def _champion(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:  # no such model, or no champion alias yet
        if tracking.is_unreachable(e):
            raise
        return None


def _incumbent(client, model_name: str, *, besides: int | None = None) -> Incumbent | None:
    """The champion as the gate sees it (None: none, or it is version ``besides`` itself)."""
    champ = _champion(client, model_name)
    if champ is None or (besides is not None and int(champ.version) == besides):
        return None
    tags = champ.tags or {}
    if TAG_GATE_VALUE not in tags:
        raise ValueError(f"{model_name} champion v{champ.version} has no {TAG_GATE_VALUE!r} tag (not registered by "
                         "prefdiff?); tag it or remove the alias before gating against it")
    return Incumbent(version=int(champ.version), value=float(tags[TAG_GATE_VALUE]),
                     metric=tags.get(TAG_GATE_METRIC, ""), protocol=tags.get(TAG_PROTOCOL) or None)


def _optional_float(text: str | None) -> float | None:
    return None if text in (None, "", "None") else float(text)


def _gate_tags(candidate: Candidate, decision: Decision, rule: GateRule) -> dict[str, str]:
    return {
        TAG_PROTOCOL: candidate.protocol,
        TAG_GATE_METRIC: rule.metric,
        TAG_GATE_VALUE: repr(candidate.value),
        TAG_GATE_ACTION: decision.action,
        TAG_GATE_REASON: decision.reason[:MAX_TAG_VALUE],
        TAG_COMPARED_TO: repr(decision.compared_to),
        TAG_COMPARED_WITH: decision.compared_with,
        TAG_MIN_IMPROVEMENT: repr(float(rule.min_improvement)),
    }


def model_description(model_name: str, model_config: dict, rule: GateRule) -> str:
    """The registered model's description (shown in the MLflow UI): what a version is and how aliases move."""
    return (f"{model_name}: diffusion-model weights (a LoRA or a full UNet) trained by prefdiff on preferences, "
            f"served as an MLflow pyfunc on the base pipeline {model_config.get('base_source')!r} "
            "(input: a DataFrame with a 'prompt' column; output: prompt, seed, PNG bytes). "
            f"Alias '{CHAMPION}' = the version the gate promoted last (gate metric {rule.metric!r}, higher is "
            f"better, compared under one evaluation protocol); '{CHALLENGER}' = the last version that did not beat it. "
            f"Each version's tags hold its gate decision ({TAG_GATE_ACTION}, {TAG_GATE_REASON}), its input "
            f"fingerprint ({TAG_FINGERPRINT}) and lineage (git_sha, dvc.* hashes).")


def _log_and_register(weights_dir: Path, model_config: dict, model_name: str, tags: dict[str, str]) -> int:
    """Log ``weights_dir`` as a pyfunc model into the active run (or a new run named ``register``) and
    register it as a new version of ``model_name`` with ``tags``; returns the version."""
    import mlflow

    started = mlflow.active_run() is None
    if started:
        mlflow.start_run(run_name="register")
    try:
        with tempfile.TemporaryDirectory(prefix="prefdiff-pyfunc-") as tmp:
            # save_model + log_artifacts rather than log_model: log_model would also log model_config as
            # un-prefixed run params (base_source, num_steps, ...), duplicating the stages' model.*/sampling.*.
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={WEIGHTS_ARTIFACT: str(weights_dir)},
                model_config=dict(model_config),
                code_paths=[str(PACKAGE_DIR)],
                signature=model_signature(),
                pip_requirements=pip_requirements(),
            )
            mlflow.log_artifacts(str(local), artifact_path="model")
        run_id = mlflow.active_run().info.run_id
        # register_model creates the version WITH its tags in one call, so a crash cannot leave a version
        # without its fingerprint, which would defeat the idempotency check on the next run.
        mv = mlflow.register_model(f"runs:/{run_id}/model", model_name, tags=tags)
    except BaseException:
        if started:
            mlflow.end_run(status="FAILED")
        raise
    if started:
        mlflow.end_run()
    return int(mv.version)


def _latest_promoted(client, model_name: str):
    """The newest version whose gate decision was to promote and whose alias step completed."""
    promoted = [v for v in _search_versions(client, model_name)
                if (v.tags or {}).get(TAG_GATE_ACTION) == PROMOTE and (v.tags or {}).get(TAG_SETTLED)]
    return max(promoted, key=lambda v: int(v.version)) if promoted else None


def _settle(client, model_name: str, version: int, candidate: Candidate, rule: GateRule,
            model_config: dict) -> tuple[str, dict[str, str]]:
    """Finish version ``version``'s registration from the registry's state, whatever step a crash stopped
    at: its gate decision (made now, against the current champion, if it has none or its alias step never
    completed), the model's description, the alias, then tag ``prefdiff.settled``. Returns (the alias this
    version holds, its tags). Every step is idempotent, so running it again after a crash converges.

    A settled version is left as it is, but a registry with no champion at all (an alias lost) gets one
    back: the newest settled version the gate promoted."""
    mv = client.get_model_version(model_name, str(version))
    tags = dict(mv.tags or {})
    champ = _champion(client, model_name)
    holds = champ is not None and int(champ.version) == version
    if not (client.get_registered_model(model_name).description or "").strip():
        client.update_registered_model(model_name, description=model_description(model_name, model_config, rule))
    if tags.get(TAG_SETTLED):
        if champ is None:
            restored = _latest_promoted(client, model_name)
            if restored is not None:
                client.set_registered_model_alias(model_name, CHAMPION, str(restored.version))
                holds = int(restored.version) == version
        return (CHAMPION if holds else CHALLENGER), tags
    if not holds:
        # Gate it now: a crash may have stopped it after its decision, and the champion may have moved since.
        decision = decide(candidate, _incumbent(client, model_name, besides=version), rule)
        for key, value in _gate_tags(candidate, decision, rule).items():
            if tags.get(key) != value:
                client.set_model_version_tag(model_name, str(version), key, value)
                tags[key] = value
        client.update_model_version(model_name, str(version), description=decision.reason[:MAX_TAG_VALUE])
    alias = CHAMPION if holds or tags[TAG_GATE_ACTION] == PROMOTE else CHALLENGER
    client.set_registered_model_alias(model_name, alias, str(version))
    client.set_model_version_tag(model_name, str(version), TAG_SETTLED, alias)
    tags[TAG_SETTLED] = alias
    return alias, tags


def _registration(model_name: str, version: int, alias: str, tags: dict[str, str], fp: str,
                  reused: bool) -> Registration:
    return Registration(
        model_name=model_name, version=version, alias=alias,
        action=tags.get(TAG_GATE_ACTION, ""), reason=tags.get(TAG_GATE_REASON, ""),
        gate_metric=tags.get(TAG_GATE_METRIC, ""), value=float(tags.get(TAG_GATE_VALUE, "nan")),
        compared_to=_optional_float(tags.get(TAG_COMPARED_TO)), compared_with=tags.get(TAG_COMPARED_WITH, "none"),
        protocol=tags.get(TAG_PROTOCOL, ""), fingerprint=fp, reused=reused)


def register_model(
    *,
    root: Path,
    weights_dir: Path,
    eval_metrics: dict,
    model_config: dict,
    model_name: str,
    rule: GateRule,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    attempts: int = 3,
    retry_delay_s: float = 2.0,
) -> Registration:
    """Register ``weights_dir`` (a LoRA or a full UNet) as a new version of ``model_name`` and set alias
    ``champion`` or ``challenger`` by ``prefdiff.gate.decide``. Idempotent and convergent (module docstring):
    a version with these inputs' fingerprint is reused, and finished if a crash interrupted it.

    Logs into the active MLflow run if there is one, else into a new run named ``register`` in
    ``experiment``. ``model_config`` is stored with the model and read by the serving code
    (``base_source``, ``dtype``, ``device``). Bad metrics raise ``GateInputError``/``ValueError`` before the
    registry is touched. An unreachable tracking server is tried ``attempts`` times (``retry_delay_s``,
    doubling), then ``tracking.TrackingUnavailable`` says so; ``weights_dir`` is never touched.
    """
    import time

    root = Path(root).resolve()
    weights_dir = Path(weights_dir).resolve()
    candidate = candidate_from_metrics(eval_metrics, rule)
    check_finite(candidate, rule)
    if "base_source" not in model_config:
        raise ValueError(f"model_config needs 'base_source' (the base pipeline the served model loads); "
                         f"got keys {sorted(model_config)}")
    fp = fingerprint(weights_dir, eval_metrics, model_config, model_name)
    for attempt in range(1, attempts + 1):
        try:
            return _register_once(root, weights_dir, candidate, model_config, model_name, rule, experiment, fp)
        except Exception as e:
            if not tracking.is_unreachable(e):
                raise
            uri = tracking.tracking_uri(root)
            if attempt == attempts:
                raise tracking.TrackingUnavailable(f"MLflow at {uri} is unreachable ({tracking.short_reason(e)}); "
                                                   f"tried {attempts} times") from e
            print(f"register: MLflow at {uri} unreachable ({tracking.short_reason(e)}); "
                  f"retry {attempt}/{attempts - 1} in {retry_delay_s:g} s", flush=True)
            time.sleep(retry_delay_s)
            retry_delay_s *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


def _register_once(root: Path, weights_dir: Path, candidate: Candidate, model_config: dict, model_name: str,
                   rule: GateRule, experiment: str, fp: str) -> Registration:
    import mlflow

    tracking.ensure_experiment(experiment, root)
    client = mlflow.MlflowClient()
    existing = _find_version(client, model_name, fp)
    if existing is None:
        decision = decide(candidate, _incumbent(client, model_name), rule)  # against the champion as it is now
        tags = {TAG_FINGERPRINT: fp, **_gate_tags(candidate, decision, rule), **tracking.lineage(root)}
        version = _log_and_register(weights_dir, model_config, model_name, tags)
    else:
        version = int(existing.version)
    alias, tags = _settle(client, model_name, version, candidate, rule, model_config)
    return _registration(model_name, version, alias, tags, fp, reused=existing is not None)


def _weights_in(local: Path) -> Path:
    """The weights dir (LoRA or full UNet, not a snapshot) inside a downloaded model's artifacts."""
    from prefdiff.models.finetuned import FULL_UNET_DIR, is_full_unet
    from prefdiff.models.lora import LORA_WEIGHT_NAME

    found = [p.parent for p in local.rglob(LORA_WEIGHT_NAME)]
    found += [p.parent.parent for p in local.rglob("config.json")
              if p.parent.name == FULL_UNET_DIR and is_full_unet(p.parent.parent)]
    found = [p for p in found if "snapshots" not in p.relative_to(local).parts]
    if not found:
        raise FileNotFoundError(f"no LoRA or UNet weights in the downloaded artifacts at {local}")
    return found[0]


def _download_weights(model_name: str, version: int, dest: Path) -> None:
    """Copy version ``version``'s weights (without epoch snapshots) into ``dest``, replacing it."""
    import mlflow

    from prefdiff.data.atomic import atomic_dir

    with tempfile.TemporaryDirectory(prefix="prefdiff-champion-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=tmp))
        weights = _weights_in(local)
        with atomic_dir(dest) as out:
            shutil.copytree(weights, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("snapshots"))


def resolve_baseline(root: Path, baseline: str, model_name: str) -> tuple[BaselineRef, bool]:
    """Write ``registry/baseline.json`` for ``evaluate.baseline`` = ``baseline`` ("base" | "champion"):
    the base, or ``model_name``'s current champion with its weights copied to ``models/baseline`` (the
    copy is skipped when it already holds them). Returns the reference and whether the file changed."""
    import mlflow

    paths = Paths(Path(root).resolve())
    ref = BaselineRef(kind=BASE)
    if baseline == CHAMPION_KIND:
        mlflow.set_tracking_uri(tracking.tracking_uri(paths.root))
        champ = _champion(mlflow.MlflowClient(), model_name)
        if champ is None:
            ref = BaselineRef(kind=BASE, model_name=model_name, note=f"no champion of {model_name} registered yet")
        else:
            ref = _champion_ref(paths, model_name, champ)
    if ref.kind == BASE and paths.baseline_weights.exists():
        shutil.rmtree(paths.baseline_weights)  # no stale champion weights beside a file that names none
    return ref, write_baseline(paths.baseline, ref)


def _champion_ref(paths: Paths, model_name: str, champ) -> BaselineRef:
    version = int(champ.version)
    weights = paths.baseline_weights
    held = read_baseline(paths.baseline) if paths.baseline.is_file() else None
    have = (held is not None and held.kind == CHAMPION_KIND and (held.model_name, held.version) == (model_name, version)
            and weights.is_dir() and any(weights.iterdir()) and tree_sha256(weights) == held.weights_sha256)
    if not have:
        _download_weights(model_name, version, weights)
    return BaselineRef(kind=CHAMPION_KIND, model_name=model_name, version=version,
                       weights=weights.relative_to(paths.root).as_posix(), weights_sha256=tree_sha256(weights),
                       protocol=(champ.tags or {}).get(TAG_PROTOCOL, ""))


def gate_rule(register_params) -> GateRule:
    """The gate rule of the ``register`` params section."""
    rp = register_params
    return GateRule(metric=rp.gate_metric, base_metric=rp.base_metric, min_improvement=float(rp.min_improvement),
                    min_win_rate_low=rp.min_win_rate_low)

