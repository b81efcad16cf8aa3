"""Typed params for every ``params.yaml`` section, validated before any heavy work.

Every section is a pydantic model with ``extra="forbid"`` and strict types, so an unknown key, a wrong
type or an out-of-range value fails at load time with an error that names the key, the value and what is
allowed (``ParamsError``). Names of pluggable parts (models, scorers, training methods) are checked against
the name tables of ``prefdiff.catalog``, which import nothing, and prompt sets against ``prefdiff.prompts``:
validating params imports neither torch nor transformers.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prefdiff.catalog import BUILTIN_MODELS, BUILTIN_PREFIX, SCORER_ALIASES, SCORERS, TRAIN_METHODS
from prefdiff.paths import LORA_WEIGHT_NAME


class ParamsError(ValueError):
    """params.yaml is invalid; the message lists every offending key with its value and what is allowed.

    ``problems``: one self-contained line per offending key (file, key, value, what is allowed), what a stage
    prints as one ``error:`` line each.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [" ".join(message.split())]


# Bounds of counts and scales: far beyond any real run (the paper's SD runs use batch 10, 400 epochs, 20 seeds
# at most), near enough that a typo (1e12 epochs, alpha 1e30) is refused before hours of work.
MAX_SEED = 2**31 - 1  # numpy's and torch's generators both take it; seeds are offset by counts below it
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536  # items per micro-batch, or micro-batches per optimizer step
MAX_PROMPTS = 1_000_000
MAX_SEEDS_PER_PROMPT = 10_000
MAX_STEPS = 10_000_000  # optimizer steps between checkpoints
MAX_PROCESSES = 4096  # processes of one training, sampling, evaluation or rounds run (GPUs over all nodes)
# train / sample / evaluate / rounds keys that change how a run executes, not its result: the process count (float
# sums in another order) and train.compile (the same math in other kernels, checked against eager: fit.check_compiled)
EXECUTION_KEYS = {"num_processes", "compile"}


_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _Section(BaseModel):
    # NaN and infinity are refused in every float: none of them means anything finite (a NaN gate threshold
    # never promotes, an infinite clipping norm silently turns clipping off).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

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
    num_prompts: int | None = Field(None, ge=1, le=MAX_PROMPTS)  # first N prompts of the set (None: all)
    # Prompt groups = prompts_per_epoch * groups_per_prompt; each group shares one initial noise x_T.
    groups_per_prompt: int = Field(1, ge=1, le=1000)
    images_per_group: int = Field(2, ge=2, le=7)  # G; the paper's human-feedback runs use 7
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(16, ge=1, le=4096)  # images per UNet call (x2 for guidance)
    shard_size: int = Field(256, ge=1, le=1_000_000)  # images per safetensors shard
    # The policy that samples: None = the base model; a diffusers-format LoRA dir (relative to the workspace,
    # e.g. a previous round's models/trained copied to models/policy) loaded onto the base, so a stage-based
    # round r samples from round r-1's policy (D3PO Algorithm 1). The rounds stage ignores it: its round r
    # samples from its own round r-1.
    lora: str | None = Field(None, min_length=1)
    # How the run executes, not what it samples (``EXECUTION_KEYS``): processes that share the prompt groups (the
    # sample stage relaunches itself under `accelerate launch` when > 1; the dataset is the one process's, byte
    # for byte). Not a DVC param of the stage.
    num_processes: int = Field(1, ge=1, le=MAX_PROCESSES)

    def in_use(self) -> dict[str, Any]:
        """The keys that change what is sampled (not the ``EXECUTION_KEYS``): the dataset's index records these."""
        return self.model_dump(exclude=EXECUTION_KEYS)

    @field_validator("prompt_set")
    @classmethod
    def _prompt_set(cls, v: str) -> str:
        return _check_prompt_set(v)


class PickapicImportParams(_Section):
    """Reading Pick-a-Pic-style parquet pairs (``label.source: pickapic``), transforms as the official code."""

    path: str = "data/imports"  # a .parquet file or a directory of them (columns jpg_0, jpg_1, label_0, caption)
    resolution: int = Field(64, ge=8, le=4096)  # shortest side resized to this, then cropped square
    crop: Literal["center", "random"] = "center"
    hflip: Literal["none", "per_image", "joint"] = "none"  # per_image: official; joint: diffusers SDXL
    seed: int = Field(0, ge=0, le=MAX_SEED)  # random crop / flip draws are a pure function of (seed, row)
    max_pairs: int | None = Field(None, ge=1, le=1_000_000_000)  # stop after this many decided pairs (None: all)
    on_bad_row: Literal["error", "skip"] = "error"  # skip: count rejected rows in the dataset index
    # processes that decode and encode images (None: the CPUs this process may use); the dataset's bytes do
    # not depend on it
    workers: int | None = Field(None, ge=1, le=1024)
    shard_mb: int = Field(128, ge=1, le=4096)  # images are stored many to a file: a shard closes at this many MiB
    # a transformed image is stored raw (uncompressed RGB, PPM: no encode cost, ~2.5x PNG's bytes) or as png
    encoding: Literal["raw", "png"] = "raw"
    jpeg_draft: bool = False  # decode JPEGs >= 2x the target at reduced DCT scale: faster, not the official pixels


class AnnotatorParams(_Section):
    """One simulated annotator (``prefdiff.labeling.annotators``, Bradley-Terry choices)."""

    # expected share of its choices that agree with label.judge (with bias 0); 0.5 would be a coin flip
    accuracy: float = 0.85
    bias: float = Field(0.0, ge=-50.0, le=50.0)  # log-odds added in favour of the image shown first

    @field_validator("accuracy")
    @classmethod
    def _accuracy(cls, v: float) -> float:
        if not 0.5 < v < 1.0:
            raise ValueError("must be strictly between 0.5 (a coin flip) and 1 (the judge itself)")
        return v


class SimulatedLabelParams(_Section):
    """``label.source: simulated``: annotators that prefer by ``label.judge`` through Bradley-Terry noise."""

    # groups go to annotators round-robin (group_id % number of annotators)
    annotators: list[AnnotatorParams] = Field(default_factory=lambda: [AnnotatorParams()], max_length=10_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)  # each choice is a pure function of (seed, annotator, group, pair)

    @field_validator("annotators")
    @classmethod
    def _annotators(cls, v: list[AnnotatorParams]) -> list[AnnotatorParams]:
        if not v:
            raise ValueError("needs at least one annotator, e.g. [{accuracy: 0.85, bias: 0.0}]")
        return v


class HumanLabelParams(_Section):
    """``label.source: human``: people label prompt groups in prefdiff's labeling page (``prefdiff label-server``)."""

    # the append-only label log the page writes and the label stage reads (relative to the workspace)
    log: str = "data/labels/labels.jsonl"
    # pair: choose the better of two images or a tie (D3PO's h = [1,-1] / [-1,1] / [0,0]);
    # tag: tag any of the group's images; untagged images are preferred over tagged ones (D3PO Sec. 5.2)
    mode: Literal["pair", "tag"] = "pair"
    tags: list[str] = Field(default_factory=lambda: ["deformed", "wrong digit", "unsafe"])
    # a group's label counts once this many annotators have labeled it (the flow waits for that)
    annotators_per_group: int = Field(1, ge=1, le=1000)
    host: str = "127.0.0.1"  # anything but loopback requires a token (PREFDIFF_LABEL_TOKEN)
    port: int = Field(8765, ge=1, le=65535)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        cleaned = [t.strip() for t in v]
        if not cleaned or any(not t for t in cleaned) or len(set(cleaned)) != len(cleaned):
            raise ValueError("needs one or more distinct, non-empty tags, e.g. [deformed, unsafe]")
        return cleaned


class LabelParams(_Section):
    # judge: rank our own sampled groups with an automatic judge; pickapic: import parquet pairs instead;
    # simulated: annotators choose by the judge through Bradley-Terry noise (label.simulated);
    # human: people's labels from the labeling page (label.human)
    source: Literal["judge", "pickapic", "simulated", "human"] = "judge"
    # Any scorer (prefdiff.catalog.SCORERS: jpeg_*, pickscore, image_reward, laion_aesthetic, clip_score,
    # hpsv2.1, ...) can judge: groups are ranked by it, as the Diffusion-DPO AI-feedback experiments do.
    judge: str = "jpeg_compressibility"
    judge_args: dict[str, Any] = Field(default_factory=dict)  # the scorer's sources/device/dtype/batch_size
    jpeg_quality: int = Field(95, ge=1, le=95)
    # source judge: judge scores within this of each other are a tie (no preference, not trained on)
    tie_margin: float = Field(0.0, ge=0.0)
    pickapic: PickapicImportParams = PickapicImportParams()
    simulated: SimulatedLabelParams = SimulatedLabelParams()
    human: HumanLabelParams = HumanLabelParams()

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str) -> str:
        return _check_scorer_name(v)


class D3POParams(_Section):
    """D3PO (Yang et al. Eq. 14) on the sampled trajectories."""

    beta: float = Field(0.1, gt=0.0, le=1000.0)  # DPO temperature
    clip_eps: float = Field(0.1, gt=0.0, lt=1.0)  # ratio pi_theta / pi_ref clipped to [1-eps, 1+eps]
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0)  # train the first ceil(f*W) permuted steps
    # W: null = all T steps (the official code); N = only the chain's first N steps (the highest-noise ones)
    timestep_window: int | None = Field(None, ge=1, le=1000)


class DiffusionDPOParams(_Section):
    """Diffusion-DPO (Wallace et al. Eq. 14) on final images.

    ``beta`` is read in the OFFICIAL convention z = -(beta/2)[(m_w - m_l) - (r_w - r_l)]
    (SalesforceAIResearch/DiffusionDPO, paper beta = 5000); ``beta_convention: diffusers`` takes the value as
    diffusers' SD1.5 script's beta (no 1/2: official = 2 x diffusers, so diffusers' 2500 is our 5000).
    """

    beta: float = Field(5000.0, gt=0.0, le=1e6)
    beta_convention: Literal["official", "diffusers"] = "official"
    empty_prompt_prob: float = Field(0.0, ge=0.0, lt=1.0)  # per pair, both halves get "" (official: 0.2)

    @property
    def official_beta(self) -> float:
        """beta in the official convention (the one the loss is written in)."""
        return self.beta * (2.0 if self.beta_convention == "diffusers" else 1.0)


class SFTParams(_Section):
    """Denoising loss on the preferred images only (official Diffusion-DPO ``--sft``)."""

    empty_prompt_prob: float = Field(0.0, ge=0.0, lt=1.0)


class RewardWeightedParams(_Section):
    """Denoising loss of both images weighted by batch * softmax(score / temperature) (mean 1)."""

    temperature: float = Field(1.0, ge=1e-6, le=1e6)
    empty_prompt_prob: float = Field(0.0, ge=0.0, lt=1.0)


class DDPOParams(_Section):
    """DDPO: PPO-clipped policy gradient on the sampling-time log-probs (DDPO defaults 1e-4 and 5)."""

    clip_range: float = Field(1e-4, gt=0.0, lt=1.0)  # PPO ratio clip
    adv_clip_max: float = Field(5.0, gt=0.0, le=1000.0)  # advantages clipped to +-this
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0)  # train the first ceil(f*W) permuted steps
    timestep_window: int | None = Field(None, ge=1, le=1000)  # as train.d3po.timestep_window


class NoMethodParams(_Section):
    """The section of a method registered in ``prefdiff.catalog.TRAIN_METHODS`` that has no options."""


# train.<method>: the options of each built-in method. A method registered in the catalog without an entry
# here has no options (``NoMethodParams``).
METHOD_SECTIONS: dict[str, type[_Section]] = {
    "d3po": D3POParams, "diffusion_dpo": DiffusionDPOParams, "sft": SFTParams,
    "reward_weighted": RewardWeightedParams, "ddpo": DDPOParams,
}

# Flat keys of the one-section train schema -> their key in the method sections (the error names the new place).
MOVED_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "beta": ("d3po.beta",),
    "clip_eps": ("d3po.clip_eps",),
    "timestep_fraction": ("d3po.timestep_fraction", "ddpo.timestep_fraction"),
    "dpo_beta": ("diffusion_dpo.beta",),
    "dpo_beta_convention": ("diffusion_dpo.beta_convention",),
    "empty_prompt_prob": ("diffusion_dpo.empty_prompt_prob", "sft.empty_prompt_prob",
                          "reward_weighted.empty_prompt_prob"),
    "reward_temperature": ("reward_weighted.temperature",),
    "ddpo_clip_range": ("ddpo.clip_range",),
    "ddpo_adv_clip_max": ("ddpo.adv_clip_max",),
}


def moved_key_message(key: str, method: Any, prefix: str) -> str:
    """``train.beta moved to train.d3po.beta``: the chosen method's new key when it has one, else every one."""
    places = MOVED_TRAIN_KEYS[key]
    chosen = [p for p in places if p.split(".")[0] == method]
    return f"{prefix}.{key} moved to " + " / ".join(f"{prefix}.{p}" for p in chosen or places)


class TrainParams(_Section):
    """The train section: keys every method shares, and one section of options per method.

    ``method`` picks the section that is used (``method_params``); every section present is validated,
    so params.yaml can hold them all and ``dvc exp run -S train.method=sft`` switches without editing.
    ``in_use()`` is what the output depends on (the DVC train stage's params, the checkpoint fingerprint).
    """

    # d3po: D3PO Eq. 14 on trajectories; diffusion_dpo: Diffusion-DPO Eq. 14 on final images; sft: denoising
    # loss on preferred images only; reward_weighted: denoising loss weighted by the judge's score; ddpo:
    # PPO-clipped policy gradient on the sampling-time log-probs with per-prompt advantages. Any name of
    # prefdiff.catalog.TRAIN_METHODS.
    method: str = "d3po"
    finetune: Literal["lora", "full"] = "lora"  # full: every UNet weight trains (reference = a frozen copy)
    # AdamW (paper Table 2: lr 3e-5, betas 0.9/0.999, weight decay 1e-4, eps 1e-8).
    lr: float = Field(3e-5, gt=0.0, le=1.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=10.0)
    adam_eps: float = Field(1e-8, gt=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, le=1e6)
    # optimizer steps with a non-finite loss or gradient that are skipped before the run stops (fp16's grad
    # scaler skips a few while it calibrates)
    max_nonfinite_steps: int = Field(10, ge=0, le=1_000_000)
    optimizer: Literal["adamw", "adafactor"] = "adamw"  # adafactor as the official SDXL run (no relative step)
    scale_lr: bool = False  # lr x the optimizer step's batch (batch_size x gradient_accumulation_steps)
    lr_warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # constant lr after a linear warmup over this share
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)  # training items (pairs, or images for ddpo) per micro-batch
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH)  # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (less memory, ~30% slower)
    # torch.compile backend of the training UNet's forward and backward (None: eager); each run first compares its
    # gradients with eager's on the first unit and stops on a mismatch (fit.check_compiled). How the run executes
    # (``EXECUTION_KEYS``): not a DVC param of the train stage, not in checkpoints' fingerprints.
    compile: Literal["inductor", "aot_eager", "cudagraphs"] | None = None
    lora_rank: int = Field(4, ge=1, le=1024)
    lora_alpha: float = Field(4.0, gt=0.0, le=4096.0)  # LoRA scale alpha / rank; 1e30 trained nothing
    # "base": the base UNet with adapters disabled; "previous_round": the policy the round starts from, frozen
    # (D3PO Sec. 5.2): the train stage's init_lora (which it then needs, stages/train.py says so), the rounds
    # stage's previous round.
    reference: Literal["base", "previous_round"] = "base"
    init_lora: str | None = None  # a diffusers-format LoRA dir to start from
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(50, ge=1, le=MAX_STEPS)  # optimizer steps between resumable checkpoints
    snapshot_every_epochs: int = Field(1, ge=1, le=MAX_EPOCHS)  # weight snapshots for the evaluate reward curve
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # How the run executes, not what it computes (``EXECUTION_KEYS``): processes that share every micro-batch
    # (the train stage relaunches itself under `accelerate launch` when > 1; the update equals one process's
    # up to float summation order).
    num_processes: int = Field(1, ge=1, le=MAX_PROCESSES)
    d3po: D3POParams = D3POParams()
    diffusion_dpo: DiffusionDPOParams = DiffusionDPOParams()
    sft: SFTParams = SFTParams()
    reward_weighted: RewardWeightedParams = RewardWeightedParams()
    ddpo: DDPOParams = DDPOParams()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in MOVED_TRAIN_KEYS if k in data]
            if moved:
                raise PydanticCustomError("moved_key", "; ".join(
                    moved_key_message(k, data.get("method"), "train") for k in moved))
        return data

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in TRAIN_METHODS:
            raise ValueError(f"unknown method {v!r}; allowed: {', '.join(TRAIN_METHODS)}")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, v: Any) -> Any:
        # accelerate's value is the string "no", which YAML 1.1 reads as False when unquoted (and
        # `dvc exp run -S` rewrites params.yaml without the quotes): take False as "no".
        return "no" if v is False else v

    @model_validator(mode="after")
    def _init_lora_is_a_lora(self) -> TrainParams:
        if self.finetune == "full" and self.init_lora:
            raise ValueError("train.init_lora starts a LoRA; with train.finetune = 'full' set it to null")
        return self

    @model_validator(mode="after")
    def _every_process_has_rows(self) -> TrainParams:
        if self.num_processes > self.batch_size:
            raise ValueError(f"train.num_processes = {self.num_processes} > train.batch_size = {self.batch_size}: the "
                             f"processes share each micro-batch of batch_size items, so some would idle; allowed: "
                             f"batch_size >= num_processes (a multiple of it balances the work)")
        return self

    @property
    def method_params(self) -> _Section:
        """The chosen method's section (``train.<method>``)."""
        return getattr(self, self.method) if self.method in METHOD_SECTIONS else NoMethodParams()

    def in_use(self) -> dict[str, Any]:
        """The shared keys and the chosen method's section: all that changes what this run trains (not the
        ``EXECUTION_KEYS``: a run may resume with another process count)."""
        shared = self.model_dump(exclude=set(METHOD_SECTIONS) | EXECUTION_KEYS)
        return {**shared, self.method: self.method_params.model_dump()}


class EvaluateParams(_Section):
    # Named prompt set (prefdiff/prompts.py): animals_heldout, animals45, d3po_unsafe, d3po_hand; from local
    # files when present: partiprompts, hpsv2_benchmark, pickapic_validation; or file:<path>.
    prompt_set: str = "animals_heldout"
    num_prompts: int | None = Field(None, ge=1, le=MAX_PROMPTS)  # first N prompts of the set (None: all)
    seeds_per_prompt: int = Field(4, ge=1, le=MAX_SEEDS_PER_PROMPT)
    seed: int = Field(1000, ge=0, le=MAX_SEED)  # seed of (prompt i, image j) = seed + i * seeds_per_prompt + j
    judge: str | None = None  # the primary scorer (gate, reward curve); None: the label stage's judge
    # More scorers reported side by side (prefdiff.catalog.SCORERS names); those whose weights are not
    # on this machine are skipped and listed with the reason in metrics and the report.
    scorers: list[str] = Field(default_factory=list)
    scorer_args: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per scorer: sources, device, dtype...
    # compare against the base, or the registry's champion (resolved into registry/baseline.json by the flow)
    baseline: Literal["base", "champion"] = "base"
    tie_margin: float = Field(0.0, ge=0.0)
    bootstrap_samples: int = Field(2000, ge=100, le=1_000_000)  # prompt-clustered bootstrap resamples (CIs)
    batch_size: int = Field(16, ge=1, le=4096)
    grid_columns: int = Field(8, ge=1, le=64)
    reward_curve: bool = True  # also score every epoch snapshot (the DVC reward-curve plot)
    # Implicit reward accuracy on held-out pairs: sampled by the base on the evaluation prompts (fresh seeds)
    # and ranked by the primary scorer; or a preference dataset dir (e.g. an imported Pick-a-Pic test split).
    implicit_accuracy: bool = True
    implicit_groups_per_prompt: int = Field(2, ge=1, le=1000)
    implicit_draws: int = Field(4, ge=1, le=10_000)  # (t, eps) draws per pair for the Diffusion-DPO estimate
    implicit_pairs: str | None = None
    report: bool = True  # eval/report.html: metric table, intervals, image pairs (self-contained)
    # How the run executes, not what it computes (``EXECUTION_KEYS``; not in the evaluation protocol): processes
    # that share the image generation (the evaluate stage relaunches itself under `accelerate launch` when > 1; the
    # main process gathers the images, scores them and writes the one process's results).
    num_processes: int = Field(1, ge=1, le=MAX_PROCESSES)

    @field_validator("prompt_set")
    @classmethod
    def _prompt_set(cls, v: str) -> str:
        return _check_prompt_set(v)

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str | None) -> str | None:
        return None if v is None else _check_scorer_name(v)

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_scorer_name(name)
        if len(set(v)) != len(v):
            raise ValueError(f"scorers {v} lists a name twice")
        return v


class RegisterParams(_Section):
    experiment: str = Field("prefdiff", min_length=1)
    # MLflow registered model; None: "prefdiff-<train.method>" (one model per method: LoRAs and full UNets alike)
    model_name: str | None = Field(None, min_length=1)
    gate_metric: str = "trained_mean_reward"
    base_metric: str | None = "base_mean_reward"
    min_improvement: float = 0.0
    # Also require the lower end of the prompt-clustered bootstrap interval of the win-rate over the
    # evaluation's baseline to exceed this (e.g. 0.5: significantly better than it); None: not required.
    min_win_rate_low: float | None = Field(None, ge=0.0, lt=1.0)

    def registered_name(self, method: str) -> str:
        """The registered model this run's weights go to: ``model_name``, or ``prefdiff-<method>``."""
        return self.model_name or f"prefdiff-{method}"


class CompareParams(_Section):
    """``make compare`` / the ``compare-methods`` flow: several methods on the same labeled data."""

    methods: list[str] = Field(default_factory=lambda: ["d3po", "diffusion_dpo", "sft", "reward_weighted"],
                               min_length=1)
    # Per method, a partial train section in the train schema (shared keys and the method's own section),
    # deep-merged over train: each method has its own scale of lr/beta.
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for name in v:
            TrainParams._method(name)
        return v

    @model_validator(mode="after")
    def _check_overrides(self) -> CompareParams:
        unknown = sorted(set(self.overrides) - set(TRAIN_METHODS))
        if unknown:
            raise ValueError(f"overrides for unknown methods {unknown}; allowed: {', '.join(TRAIN_METHODS)}")
        for method, keys in self.overrides.items():
            moved = [k for k in MOVED_TRAIN_KEYS if k in keys]
            if moved:
                raise PydanticCustomError("moved_key", "; ".join(
                    moved_key_message(k, method, f"compare.overrides.{method}") for k in moved))
            bad = sorted(set(keys) - set(TrainParams.model_fields) | ({"method"} & set(keys)))
            if bad:
                raise ValueError(f"overrides.{method}: keys {bad} are not train keys (method is set by the list)")
        return self


class RoundsParams(_Section):
    """The ``rounds`` stage (``prefdiff.rounds``): many automatic-judge rounds in one run (D3PO Algorithm 1).

    Round r samples ``groups_per_round`` prompt groups (``sample.images_per_group`` images each, prompts drawn
    at random from ``sample.prompt_set``) from round r-1's policy, labels them (``label``: judge or
    simulated), trains ``train.method`` on them (``train``; reference ``train.reference``) with the model and
    optimizer kept in memory, and writes every round's data. The other sections say how; this one how many.
    """

    count: int = Field(10, ge=1, le=100_000)  # N rounds (the paper's Sec. 5.1: 400 epochs of 80 images)
    groups_per_round: int = Field(40, ge=1, le=100_000)  # K prompt groups per round (the paper: 40 pairs)
    # every N rounds and after the last: the policy's reward and win-rate against the base on the evaluation
    # prompts, and the sampling policy's KL proxy and implicit accuracy on the round's fresh pairs
    eval_every: int = Field(5, ge=1, le=100_000)
    # How the run executes, not what it computes (``EXECUTION_KEYS``; not in the rounds fingerprint): processes
    # that share every round's sampling, training and evaluation (the rounds stage relaunches itself under
    # `accelerate launch` when > 1; the main process labels, scores and writes).
    num_processes: int = Field(1, ge=1, le=MAX_PROCESSES)


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
    compare: CompareParams = CompareParams()
    rounds: RoundsParams = RoundsParams()

    @property
    def eval_judge(self) -> str:
        return self.evaluate.judge or self.label.judge

    @model_validator(mode="after")
    def _compare_overrides_valid(self) -> Params:
        for method in self.compare.overrides:  # fail at load time, not after an hour of training
            try:
                self.train_for(method)
            except ValidationError as err:
                raise ValueError(_format_errors(err, f"compare.overrides.{method} over train", TrainParams)) from None
        return self

    @model_validator(mode="after")
    def _timestep_window_fits_the_chain(self) -> Params:
        window = getattr(self.train.method_params, "timestep_window", None)
        if window is not None and window > self.sampling.num_steps:
            raise ValueError(f"train.{self.train.method}.timestep_window = {window}: larger than "
                             f"sampling.num_steps = {self.sampling.num_steps}; allowed: 1..{self.sampling.num_steps} "
                             "or null (all steps)")
        return self

    def train_for(self, method: str) -> TrainParams:
        """The train section of ``make compare``'s experiment for ``method``: ``compare.overrides[method]``
        deep-merged over ``train`` with ``method`` set (what its ``dvc exp run -S`` values give)."""
        train = merged(self.train.model_dump(), self.compare.overrides.get(method, {}))
        return TrainParams.model_validate({**train, "method": method})


def merged(base: dict, overrides: dict) -> dict:
    """``overrides`` deep-merged over ``base``: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        # a mapping over a non-mapping (``lr: {}``) replaces it, and validation then names the key
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) and isinstance(
            out.get(key) or {}, dict) else value
    return out


def _check_scorer_name(name: str) -> str:
    if name not in SCORERS and name not in SCORER_ALIASES:
        raise ValueError(f"unknown scorer {name!r}; allowed: {', '.join(sorted([*SCORERS, *SCORER_ALIASES]))}")
    return name


def _check_prompt_set(name: str) -> str:
    # built-in lists, file-backed sets (partiprompts, ...) and file:<path>; files are checked when read
    from prefdiff.prompts import check_prompt_set_name

    return check_prompt_set_name(name)


def _format_errors(err: ValidationError, source: str, root: Any = None) -> str:
    return "\n".join([f"{source}: {err.error_count()} invalid value(s)", *_error_lines(err, root)])


def _error_lines(err: ValidationError, root: Any = None) -> list[str]:
    """One line per offending key: ``  key = value: what is wrong and what is allowed``."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            model: Any = root or Params  # walk to the (possibly nested) section that holds the unknown key
            for part in e["loc"][:-1]:
                if isinstance(part, int) and get_args(model):  # an item of a list field: its item model
                    model = get_args(model)[0]
                    continue
                field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
                model = field.annotation if field is not None else model
            allowed = ", ".join(model.model_fields)
            lines.append(f"  {key}: unknown key; allowed keys here: {allowed}")
            continue
        if e["type"] == "moved_key":  # the message names the old key and its new place
            lines.append(f"  {e['msg']}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg += " (NaN and infinity are refused)"
        lines.append(f"  {key} = {e.get('input')!r}: {msg}")
    return lines


def parse_params(data: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raises ParamsError listing every bad key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        problems = [f"{source}: {' '.join(line.split())}" for line in _error_lines(err)]
        raise ParamsError(_format_errors(err, source), problems) from None


def load_params(path: Path) -> Params:
    """Read and validate params.yaml (the whole file, so a typo anywhere fails every stage early)."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "save it as UTF-8") from None
    params = parse_params(data, str(path))  # unknown keys and bad values first: they say more than "missing"
    missing = missing_keys(data)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ParamsError(f"{path}: missing {shown}; every section and key must be in params.yaml (DVC tracks "
                          "them and its comments document them): copy them from the repository's params.yaml")
    return params


def missing_keys(data: dict[str, Any], model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of ``model`` (default: every section of Params, and their subsections) absent from ``data``.

    A params file names every key: DVC reads the keys it tracks from the file itself (a missing ``train``
    section passes pydantic's defaults, then fails in DVC at the train stage, after sampling and labeling).
    """
    model = model or Params
    out = []
    for name, field in model.model_fields.items():
        if name not in data:
            out.append(f"{prefix}{name}" + (" (section)" if _is_section(field.annotation) else ""))
        elif _is_section(field.annotation) and isinstance(data[name], dict):
            out += missing_keys(data[name], field.annotation, f"{prefix}{name}.")
    return out


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def check_files(params: Params, root: Path) -> None:
    """What params name on disk, read now rather than hours later: the prompt sets of ``sample`` and
    ``evaluate`` (a missing, empty, non-UTF-8 or unreadable file, a directory without prompt files) and their
    ``num_prompts`` against the set's size; the LoRA dirs of ``sample.lora`` and ``train.init_lora`` (the flows
    write them before the stages run) and the ``evaluate.implicit_pairs`` dataset, by their files. Relative
    paths are resolved against ``root`` (the workspace). Raises ParamsError naming the key, the file and the fix."""
    from prefdiff.prompts import PromptSetError, get_prompt_set

    for section in (params.sample, params.evaluate):
        name = "sample" if section is params.sample else "evaluate"
        try:
            prompts = get_prompt_set(section.prompt_set, root=root)
        except PromptSetError as err:
            raise ParamsError(f"{name}.prompt_set = {section.prompt_set!r}: {err}") from None
        if section.num_prompts is not None and section.num_prompts > len(prompts):
            raise ParamsError(f"{name}.num_prompts = {section.num_prompts}: prompt set {section.prompt_set!r} has "
                              f"only {len(prompts)} prompts; allowed: 1..{len(prompts)} or null (all)")
    for key, value in (("sample.lora", params.sample.lora), ("train.init_lora", params.train.init_lora)):
        if value is not None:
            _check_named_dir(key, value, root, LORA_WEIGHT_NAME,
                             "a diffusers-format LoRA dir (a train stage's models/trained) or null")
    if params.evaluate.implicit_accuracy and params.evaluate.implicit_pairs is not None:
        _check_named_dir("evaluate.implicit_pairs", params.evaluate.implicit_pairs, root, "index.json",
                         "an image-pair preference dataset dir (an imported Pick-a-Pic split) or null (data/heldout)")


def _check_named_dir(key: str, value: str, root: Path, required: str, allowed: str) -> None:
    """A directory that params name, with the file ``required`` in it (relative paths under ``root``)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        raise ParamsError(f"{key} = {value!r}: {path} is not a directory; allowed: {allowed}")
    if not (path / required).is_file():
        raise ParamsError(f"{key} = {value!r}: {path} has no {required}; allowed: {allowed}")


_KEY_LINE = re.compile(r"(?P<indent>\s+)(?P<key>[A-Za-z_][\w-]*):(?P<space>\s*)(?P<value>[^#\s](?:[^#]*[^#\s])?)?"
                       r"(?P<rest>\s*(?:#.*)?)")


def with_param_values(text: str, values: dict[str, str]) -> str:
    """params.yaml's ``text`` with each ``"section.key"`` of ``values`` set to its YAML value text (e.g.
    ``{"sample.lora": "models/policy"}``), every other byte, comments too, unchanged: what a flow writes stays
    a reviewable one-line diff. Only a key directly under its top-level section is set. Raises ParamsError
    naming a key that has no line to set (the caller validates the result with ``parse_params``)."""
    lines = text.split("\n")
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        start = next((i for i, line in enumerate(lines) if re.fullmatch(rf"{re.escape(section)}:\s*(#.*)?", line)),
                     None)
        found = False
        if start is not None and key:
            indent = None  # the section's own keys' indentation: deeper lines belong to a subsection
            for i in range(start + 1, len(lines)):
                line = lines[i]
                if line.strip() and not line[0].isspace() and not line.startswith("#"):
                    break  # the next section
                match = _KEY_LINE.fullmatch(line)
                if match is None:
                    continue
                indent = match["indent"] if indent is None else indent
                if match["indent"] == indent and match["key"] == key and match["value"] is not None:
                    lines[i] = f"{indent}{key}:{match['space'] or ' '}{value}{match['rest']}"
                    found = True
                    break
        if not found:
            raise ParamsError(f"params.yaml: no {dotted} line to set; add `{key}:` under `{section}:` "
                              "(params.yaml of the repository)")
    return "\n".join(lines)
