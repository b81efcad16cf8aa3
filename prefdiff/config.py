"""Typed params for every ``params.yaml`` section, validated before any heavy work.

Every section is a pydantic model with ``extra="forbid"`` and strict types, so an unknown key, a wrong
type or an out-of-range value fails at load time with an error that names the key, the value and what is
allowed (``ParamsError``). Names that depend on registries (judges, prompt sets) are checked against
those registries, which are cheap to import.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_PREFIX = "builtin:"


class ParamsError(ValueError):
    """params.yaml is invalid; the message lists every offending key with its value and what is allowed."""


_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml11_floats(cls, data: Any) -> Any:
        # PyYAML (YAML 1.1) reads "3e-5" as a string, and `dvc exp run -S train.lr=1e-3` writes exactly
        # that; accept such strings for float fields only (strict mode rejects every other coercion).
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is not None and field.annotation is float and isinstance(value, str):
                if _FLOAT_RE.fullmatch(value.strip()):
                    out[key] = float(value)
        return out


class ModelParams(_Section):
    # "builtin:tiny-sd" (built offline by prefdiff), a hub id "org/name" (read from the local HF cache,
    # never downloaded at run time) or a local diffusers directory.
    source: str = "builtin:tiny-sd"
    revision: str | None = None
    # Compute dtype of UNet, VAE and text encoder. Log-probs and the stored chain are always fp32.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps (got {v!r})")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        from prefdiff.models.tiny import BUILTIN_MODELS

        if v.startswith(BUILTIN_PREFIX) and v[len(BUILTIN_PREFIX) :] not in BUILTIN_MODELS:
            allowed = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise ValueError(f"unknown built-in model {v!r}; allowed: {allowed}, a hub id or a local dir")
        return v


class SamplingParams(_Section):
    """DDIM sampling shared by the sample and evaluate stages (paper Table 2: T=20, eta=1, w=5)."""

    num_steps: int = Field(20, ge=1, le=1000)
    eta: float = Field(1.0, gt=0.0, le=1.0)  # eta>0: log-probs need a stochastic step
    guidance_scale: float = Field(5.0, ge=1.0, le=50.0)


class SampleParams(_Section):
    prompt_set: str = "animals45"
    num_prompts: int | None = Field(None, ge=1)  # first N prompts of the set (None: all)
    # Prompt groups = prompts_per_epoch * groups_per_prompt; each group shares one initial noise x_T.
    groups_per_prompt: int = Field(1, ge=1, le=1000)
    images_per_group: int = Field(2, ge=2, le=7)  # G; the paper's human-feedback runs use 7
    seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1, le=4096)  # images per UNet call (x2 for guidance)
    shard_size: int = Field(256, ge=1)  # images per safetensors shard

    @field_validator("prompt_set")
    @classmethod
    def _prompt_set(cls, v: str) -> str:
        return _check_prompt_set(v)


class LabelParams(_Section):
    judge: str = "jpeg_compressibility"
    jpeg_quality: int = Field(95, ge=1, le=95)

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str) -> str:
        from prefdiff.labeling.judges import judge_names

        if v not in judge_names():
            raise ValueError(f"unknown judge {v!r}; allowed: {', '.join(judge_names())}")
        return v


class TrainParams(_Section):
    method: Literal["d3po"] = "d3po"
    # AdamW (paper Table 2: lr 3e-5, betas 0.9/0.999, weight decay 1e-4, eps 1e-8).
    lr: float = Field(3e-5, gt=0.0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)  # preference pairs per optimizer micro-batch
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    beta: float = Field(0.1, gt=0.0)  # DPO temperature (D3PO Eq. 14)
    clip_eps: float = Field(0.1, gt=0.0, lt=1.0)  # ratio clipped to [1-eps, 1+eps]
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0)  # train the first ceil(f*T) permuted steps
    lora_rank: int = Field(4, ge=1, le=1024)
    lora_alpha: float = Field(4.0, gt=0.0)
    # "base": the base UNet with adapters disabled; "previous_round": the frozen adapter weights the
    # round started from (init_lora).
    reference: Literal["base", "previous_round"] = "base"
    init_lora: str | None = None  # a diffusers-format LoRA dir to start from
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between resumable checkpoints
    snapshot_every_epochs: int = Field(1, ge=1)  # LoRA snapshots for the evaluate reward curve
    seed: int = Field(0, ge=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, v: Any) -> Any:
        # accelerate's value is the string "no", which YAML 1.1 reads as False when unquoted (and
        # `dvc exp run -S` rewrites params.yaml without the quotes): take False as "no".
        return "no" if v is False else v

    @model_validator(mode="after")
    def _reference_needs_init(self) -> TrainParams:
        if self.reference == "previous_round" and not self.init_lora:
            raise ValueError("train.reference = 'previous_round' needs train.init_lora (the round's start LoRA)")
        return self


class EvaluateParams(_Section):
    prompt_set: str = "animals_heldout"
    num_prompts: int | None = Field(None, ge=1)  # first N prompts of the set (None: all)
    seeds_per_prompt: int = Field(4, ge=1)
    seed: int = Field(1000, ge=0)  # seed of (prompt i, image j) = seed + i * seeds_per_prompt + j
    judge: str | None = None  # None: the label stage's judge
    tie_margin: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, ge=1)
    grid_columns: int = Field(8, ge=1, le=64)
    reward_curve: bool = True  # also score every epoch snapshot (the DVC reward-curve plot)

    @field_validator("prompt_set")
    @classmethod
    def _prompt_set(cls, v: str) -> str:
        return _check_prompt_set(v)

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str | None) -> str | None:
        return None if v is None else LabelParams._judge(v)


class RegisterParams(_Section):
    experiment: str = Field("prefdiff", min_length=1)
    model_name: str = Field("prefdiff-d3po-lora", min_length=1)
    gate_metric: str = "trained_mean_reward"
    base_metric: str | None = "base_mean_reward"
    min_improvement: float = 0.0


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    # A field named "register" shadows BaseModel's ABC.register (never used here); pydantic warns once.
    model: ModelParams = ModelParams()
    sampling: SamplingParams = SamplingParams()
    sample: SampleParams = SampleParams()
    label: LabelParams = LabelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()

    @property
    def eval_judge(self) -> str:
        return self.evaluate.judge or self.label.judge


def _check_prompt_set(name: str) -> str:
    from prefdiff.prompts import prompt_set_names

    if name not in prompt_set_names():
        raise ValueError(f"unknown prompt set {name!r}; allowed: {', '.join(prompt_set_names())}")
    return name


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            model = Params.model_fields[section].annotation if section in Params.model_fields else Params
            allowed = ", ".join(model.model_fields)  # type: ignore[union-attr]
            lines.append(f"  {key}: unknown key; allowed keys here: {allowed}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raises ParamsError listing every bad key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: Path) -> Params:
    """Read and validate params.yaml (the whole file, so a typo anywhere fails every stage early)."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(data, str(path))
