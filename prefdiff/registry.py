"""Register a trained LoRA in the MLflow Model Registry and gate it against the champion.

Registry writes are side effects, not reproducible outputs, so this runs in the Prefect flow after the
DVC stages, never as a DVC stage. It is idempotent: the inputs (LoRA files, eval metrics, model config,
model name) are fingerprinted, and a version already carrying that fingerprint is returned as is, so
re-running a flow whose DVC stages were all skipped creates no duplicate version and moves no alias.

Gate (higher is better): the new version becomes ``champion`` only if
``value > compared + min_improvement``, where ``compared`` is the current champion's
``prefdiff.gate_value`` tag, or, with no champion yet, ``eval_metrics[base_metric]`` (the base model's
score in the same evaluation), or -inf when ``base_metric`` is None. Otherwise it becomes ``challenger``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefdiff import tracking
from prefdiff.data.atomic import sha256_file

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_FINGERPRINT = "prefdiff.fingerprint"
TAG_GATE_METRIC = "prefdiff.gate_metric"
TAG_GATE_VALUE = "prefdiff.gate_value"
TAG_COMPARED_TO = "prefdiff.compared_to"
TAG_COMPARED_WITH = "prefdiff.compared_with"
TAG_MIN_IMPROVEMENT = "prefdiff.min_improvement"

PACKAGE_DIR = Path(__file__).resolve().parent
PYFUNC_MODEL_FILE = PACKAGE_DIR / "serving" / "pyfunc_model.py"
# What the served model imports; pinned to the versions this process runs with.
SERVING_PACKAGES = ("torch", "diffusers", "peft", "transformers", "safetensors", "pillow", "pandas")
PREDICT_PARAMS: dict[str, Any] = {"seed": 0, "num_inference_steps": 20, "guidance_scale": 5.0, "eta": 1.0}


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: int
    alias: str  # "champion" | "challenger"
    gate_metric: str
    value: float
    compared_to: float | None  # the number the gate compared against (None: nothing to compare)
    compared_with: str  # "champion vN" | "base" | "none"
    fingerprint: str
    reused: bool  # True: this exact input was already registered; nothing was logged or moved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(lora_dir: Path, eval_metrics: dict, model_config: dict, model_name: str) -> str:
    """sha256 over: each file of ``lora_dir`` (relative path + sha256, sorted by path), then
    ``json(eval_metrics)``, ``json(model_config)`` (sorted keys) and ``model_name``."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise FileNotFoundError(f"LoRA directory {lora_dir} does not exist")
    files = sorted(p for p in lora_dir.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"LoRA directory {lora_dir} holds no files")
    h = hashlib.sha256()
    for path in files:
        rel = path.relative_to(lora_dir).as_posix()
        h.update(f"file {rel} {sha256_file(path)}\n".encode())
    h.update(b"metrics " + json.dumps(eval_metrics, sort_keys=True, default=str).encode() + b"\n")
    h.update(b"config " + json.dumps(model_config, sort_keys=True, default=str).encode() + b"\n")
    h.update(b"name " + model_name.encode())
    return h.hexdigest()


def _metric(eval_metrics: dict, key: str, role: str) -> float:
    if key not in eval_metrics:
        raise ValueError(
            f"{role} {key!r} is not in the eval metrics; available keys: {sorted(eval_metrics)}"
        )
    try:
        return float(eval_metrics[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{role} {key!r} = {eval_metrics[key]!r} is not a number") from e


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
    MLflow override this signature and drop the params (reference note, section 4)."""
    import pandas as pd
    from mlflow.models import infer_signature

    example_out = pd.DataFrame({"prompt": ["a cat"], "seed": [0], "png": [b"\x89PNG\r\n\x1a\n"]})
    return infer_signature(pd.DataFrame({"prompt": ["a cat"]}), example_out, params=dict(PREDICT_PARAMS))


def _find_version(client, model_name: str, fp: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    matches = [v for v in versions if (v.tags or {}).get(TAG_FINGERPRINT) == fp]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _champion(client, model_name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:  # no such model, or no champion alias yet
        return None


def champion_weights(model_name: str, root: Path, dest: Path) -> tuple[str, Path] | None:
    """The current champion's trained weights (LoRA or full UNet dir) downloaded under ``dest``, with its
    version; None when the model has no champion yet (then the base is the baseline)."""
    import mlflow

    from prefdiff.models.finetuned import is_full_unet
    from prefdiff.models.lora import LORA_WEIGHT_NAME
    from prefdiff.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(root))
    client = mlflow.MlflowClient()
    champ = _champion(client, model_name)
    if champ is None:
        return None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}@{CHAMPION}",
                                                     dst_path=str(dest)))
    found = [p.parent for p in local.rglob(LORA_WEIGHT_NAME)] + [p.parent.parent for p in local.rglob("config.json")
                                                                 if p.parent.name == "unet" and is_full_unet(p.parent.parent)]
    found = [p for p in found if "snapshots" not in p.parts]
    if not found:
        raise FileNotFoundError(f"{model_name} champion v{champ.version}: no LoRA or UNet weights in its artifacts at {local}")
    return str(champ.version), found[0]


def _optional_float(text: str | None) -> float | None:
    return None if text in (None, "", "None") else float(text)


def register_lora(
    *,
    root: Path,
    lora_dir: Path,
    eval_metrics: dict,
    model_config: dict,
    model_name: str,
    gate_metric: str,
    base_metric: str | None,
    min_improvement: float,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> Decision:
    """Log ``lora_dir`` as a pyfunc model, register it as a new version of ``model_name``, and set
    alias ``champion`` or ``challenger`` by the gate (module docstring). Idempotent (fingerprint).

    Logs into the active MLflow run if there is one, else into a new run named ``register`` in
    ``experiment``. ``model_config`` is stored with the model and read by the serving code
    (``base_source``, ``dtype``, ``device``).
    """
    import mlflow

    root = Path(root).resolve()
    lora_dir = Path(lora_dir).resolve()
    value = _metric(eval_metrics, gate_metric, "gate_metric")
    if base_metric is not None:
        _metric(eval_metrics, base_metric, "base_metric")
    if "base_source" not in model_config:
        raise ValueError(
            f"model_config needs 'base_source' (the base pipeline the served model loads); "
            f"got keys {sorted(model_config)}"
        )
    fp = fingerprint(lora_dir, eval_metrics, model_config, model_name)

    tracking.ensure_experiment(experiment, root)
    client = mlflow.MlflowClient()

    existing = _find_version(client, model_name, fp)
    if existing is not None:
        champ = _champion(client, model_name)
        tags = existing.tags or {}
        return Decision(
            model_name=model_name,
            version=int(existing.version),
            alias=CHAMPION if champ is not None and champ.version == existing.version else CHALLENGER,
            gate_metric=tags.get(TAG_GATE_METRIC, gate_metric),
            value=float(tags.get(TAG_GATE_VALUE, value)),
            compared_to=_optional_float(tags.get(TAG_COMPARED_TO)),
            compared_with=tags.get(TAG_COMPARED_WITH, "none"),
            fingerprint=fp,
            reused=True,
        )

    # Gate decided before registering, against the champion as it is now.
    champ = _champion(client, model_name)
    if champ is not None:
        champ_tags = champ.tags or {}
        if TAG_GATE_VALUE not in champ_tags:
            raise ValueError(
                f"{model_name} champion v{champ.version} has no {TAG_GATE_VALUE!r} tag (not registered by "
                "prefdiff?); tag it or remove the alias before gating against it"
            )
        champ_metric = champ_tags.get(TAG_GATE_METRIC, gate_metric)
        if champ_metric != gate_metric:
            raise ValueError(
                f"{model_name} champion v{champ.version} was gated on {champ_metric!r}, this run on "
                f"{gate_metric!r}: the values are not comparable; use the same gate_metric or remove "
                "the champion alias"
            )
        compared: float | None = float(champ_tags[TAG_GATE_VALUE])
        compared_with = f"champion v{champ.version}"
    elif base_metric is not None:
        compared = float(eval_metrics[base_metric])
        compared_with = "base"
    else:
        compared, compared_with = None, "none"
    # A NaN/inf gate value never promotes (NaN > x is False anyway; be explicit for the first version).
    promote = math.isfinite(value) and (compared is None or value > compared + float(min_improvement))

    tags = {
        TAG_FINGERPRINT: fp,
        TAG_GATE_METRIC: gate_metric,
        TAG_GATE_VALUE: repr(value),
        TAG_COMPARED_TO: repr(compared),
        TAG_COMPARED_WITH: compared_with,
        TAG_MIN_IMPROVEMENT: repr(float(min_improvement)),
        **tracking.lineage(root),
    }

    started = mlflow.active_run() is None
    if started:
        mlflow.start_run(run_name="register")
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts={"lora": str(lora_dir)},
            model_config=dict(model_config),
            code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(),
            pip_requirements=pip_requirements(),
        )
        # register_model (rather than log_model's registered_model_name) creates the version WITH
        # its tags in one call, so a crash cannot leave a version without its fingerprint, which
        # would defeat the idempotency check on the next run.
        mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
    except BaseException:
        if started:
            mlflow.end_run(status="FAILED")
        raise
    if started:
        mlflow.end_run()

    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(model_name, alias, mv.version)
    return Decision(
        model_name=model_name,
        version=int(mv.version),
        alias=alias,
        gate_metric=gate_metric,
        value=value,
        compared_to=compared,
        compared_with=compared_with,
        fingerprint=fp,
        reused=False,
    )
