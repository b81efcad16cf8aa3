"""One training loop for every method: ``fit``, and the ``Method`` interface it trains.

A method (one module under ``prefdiff/training/methods/`` and one line in ``prefdiff.catalog.TRAIN_METHODS``)
says what data it trains on, the loss of one unit and what it logs. ``fit`` owns everything around it, the
same for every method:

- the trainable UNet (LoRA or full), its reference, optimizer and lr warmup (``trainable.py``);
- the order of the items (pairs, or images): each epoch shuffles them with a generator seeded by
  (train.seed, epoch); an optimizer step takes ``gradient_accumulation_steps`` micro-batches of
  ``batch_size`` items (an epoch's last step may hold fewer);
- per micro-batch, a generator seeded by (train.seed, epoch, batch index). A timestep method (D3PO, DDPO)
  gets one random permutation of the T denoising steps per item from it (shared by both images of a pair)
  and trains the first ceil(f*T) permuted steps, one unit per step; any other method gets the generator
  for its own draws (noise, t, caption dropout) in a single unit;
- every unit back-propagates loss / (units in this optimizer step), as the official D3PO loop accumulates
  over T x gradient accumulation; gradients are all-reduced only on the step's last backward
  (``accelerator.no_sync``); then the gradient norm is clipped and the optimizer steps;
- processes (``accelerate launch``, ``train.num_processes``): every process walks the same micro-batches and
  draws and computes its contiguous share of each micro-batch's rows (``accumulate``), so N processes make the
  update one process makes on the same batch; only the main process writes checkpoints, snapshots and
  ``out_dir`` and logs; every process reads the checkpoint it resumes from;
- logging: per optimizer step the mean of each of the method's ``metrics`` over its units (a curve row,
  MLflow, ``progress``), kept on the device and read once per step with the gradient norm;
- checkpoints (weights, optimizer, position, the method's precomputed tensors, the curve) every
  ``checkpoint_every`` steps, valid only for the same inputs. A run with the same inputs resumes from one
  and ends where an uninterrupted run does: every random draw is a pure function of (seed, epoch, batch);
- weight snapshots every ``snapshot_every_epochs`` epochs (the evaluate stage's reward curve), written
  with the final weights under ``out_dir`` as one unit.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from prefdiff.catalog import TRAIN_METHODS, resolve
from prefdiff.config import Params, TrainParams
from prefdiff.data import DatasetError
from prefdiff.data.atomic import atomic_dir
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.models.processes import process_state
from prefdiff.sampling.dataset import dtype_knob
from prefdiff.progress import above_bars, progress_bar
from prefdiff.sampling.guards import NumericsError, RunError, memory_knobs
from prefdiff.sampling.guidance import Conditioning, encode_prompts
from prefdiff.training.checkpoint import load_checkpoint, save_checkpoint
from prefdiff.training.trainable import TrainableUNet


def _silent(_: str) -> None:
    """The progress of every process but the main one."""


def rng(*key: int) -> torch.Generator:
    """A CPU generator that is a pure function of the integers ``key`` (seed, epoch, batch index, ...).

    Seeded from SHA-256 of the integers' 8-byte encodings: the same draws in every process and Python
    version (``hash`` of a tuple is an implementation detail, not a stable function).
    """
    digest = hashlib.sha256(struct.pack(f"<{len(key)}q", *key)).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 2)


class PromptTable:
    """Every distinct prompt encoded once (the text encoders are frozen), the empty prompt as the last row.

    ``cond`` holds len(prompts) + 1 rows on the CPU; methods index it with ``rows(prompts)``.
    """

    def __init__(self, pipe, prompts: Sequence[str]) -> None:
        self.prompts = sorted(set(prompts))
        self.row = {p: i for i, p in enumerate(self.prompts)}
        self.empty_row = len(self.prompts)
        self.cond = Conditioning.cat([encode_prompts(pipe, self.prompts), encode_prompts(pipe, [""])]).cpu()

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.row[p] for p in prompts])

    @property
    def empty(self) -> Conditioning:
        """The unconditional branch of guidance (a dropped caption): one row."""
        return self.cond[self.empty_row]


@dataclass(frozen=True)
class Unit:
    """What one backward trains on: this process's share of a micro-batch, the micro-batch's generator and, for
    timestep methods, the denoising step of each item.

    With N processes (``accelerate launch``) every process walks the same micro-batches and draws; process r
    computes only its contiguous share of each micro-batch's rows. A method whose random draws or batch
    statistics span the whole micro-batch (the image methods' noise, the reward-weighted softmax) builds them
    from ``micro_batch`` and keeps the rows at ``share`` (``own``), so N processes train on the draws one does.
    """

    rows: torch.Tensor  # [b_r] item indices of this process's share
    generator: torch.Generator  # seeded by (train.seed, epoch, batch index)
    step_index: torch.Tensor | None  # [b_r] step index into the trajectory per item (timestep methods), else None
    micro_batch: torch.Tensor  # [b] the whole micro-batch's item indices, every process's rows
    share: torch.Tensor  # [b_r] positions of ``rows`` in ``micro_batch``
    # True: this process has no rows of the micro-batch but must run the step's all-reducing last backward; it
    # trains the micro-batch's first row with weight 0
    padding: bool = False

    def own(self, tensor: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """This share's rows of a tensor laid out as ``copies`` blocks of the whole micro-batch ([copies x b, ...],
        e.g. winners then losers); the result keeps the block layout: [copies x b_r, ...]."""
        b = len(self.micro_batch)
        index = torch.cat([self.share + k * b for k in range(copies)]).to(tensor.device)
        return tensor[index]


@dataclass(frozen=True)
class FitContext:
    """What a method is built from: the params, the trainable model and the opened datasets."""

    params: Params
    model: TrainableUNet
    preferences: PreferenceStore
    trajectories: TrajectoryStore | None  # None for an imported image-pair dataset
    progress: Callable[[str], None]


class Method:
    """A training method for ``fit``.

    A subclass declares the data it needs (``data``), what it logs (``metrics``, means over an optimizer
    step's units, "loss" first) and whether the reference is a frozen copy of the starting UNet; its
    constructor loads its ``items`` from the context; ``loss`` returns the loss of one unit (the mean over the
    unit's ``rows``: ``fit`` weights each process's share by its size) with its metrics as 0-dim tensors (means
    over the same rows; left on the device: ``fit`` reads them once per optimizer step).
    ``timestep_fraction`` set (not None) makes it a timestep method (see ``Unit``); ``timestep_window`` N limits
    its steps to the chain's first N (None: all of them). ``precompute`` runs once
    before the first update; ``fit`` stores its tensors with every checkpoint and sets ``precomputed`` to
    them (or to those of the checkpoint a run resumes from).
    """

    data: ClassVar[Literal["trajectories", "images"]] = "images"  # trajectories: needs sampled chains
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    needs_reference_copy: ClassVar[bool] = False  # for LoRA previous_round / full fine-tuning references
    item_name: ClassVar[str] = "pairs"

    def __init__(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.items = 0
        self.timestep_fraction: float | None = None
        self.timestep_window: int | None = None
        self.precomputed: dict[str, torch.Tensor] = {}

    def precompute(self) -> dict[str, torch.Tensor]:
        return {}

    def describe(self) -> str:
        """The method's options for the start-of-run line."""
        return ""

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


@dataclass
class TrainSummary:
    method: str
    steps: int
    epochs: int
    items: int
    resumed_from_step: int
    seconds: float
    final: dict[str, float]
    curve: list[dict[str, float]] = field(repr=False, default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {
            "method": self.method, "steps": self.steps, "epochs": self.epochs, "items": self.items,
            "resumed_from_step": self.resumed_from_step, "seconds": round(self.seconds, 2), **self.extra, **self.final,
        }


def steps_per_epoch(items: int, tp: TrainParams) -> tuple[int, int]:
    """(micro-batches, optimizer steps) per epoch for ``items`` training items."""
    batches = math.ceil(items / tp.batch_size)
    return batches, math.ceil(batches / tp.gradient_accumulation_steps)


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: its micro-batches as (batch index in the epoch, item rows) and its lr."""

    epoch: int  # 0-based
    step: int  # 1-based, over the whole run
    epoch_done: bool  # the epoch's last optimizer step
    micro_batches: list[tuple[int, torch.Tensor]]


def plan_steps(items: int, tp: TrainParams, start_step: int) -> Iterator[StepPlan]:
    """The optimizer steps after ``start_step`` (a resumed run skips those done)."""
    batches, per_epoch = steps_per_epoch(items, tp)
    for epoch in range(tp.epochs):
        order = torch.randperm(items, generator=rng(tp.seed, epoch, -1))
        for opt_index in range(per_epoch):
            step = epoch * per_epoch + opt_index + 1
            if step <= start_step:
                continue
            first = opt_index * tp.gradient_accumulation_steps
            ids = range(first, min(first + tp.gradient_accumulation_steps, batches))
            micro = [(b, order[b * tp.batch_size : (b + 1) * tp.batch_size]) for b in ids]
            yield StepPlan(epoch=epoch, step=step, epoch_done=opt_index + 1 == per_epoch, micro_batches=micro)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the means of the method's metrics over its units, the gradient norm before
    clipping, and whether the step was skipped (a non-finite loss or gradient norm)."""

    means: dict[str, float]
    grad_norm: float
    skipped: bool


def backwards_before(step: int, items: int, tp: TrainParams, units: int) -> int:
    """Backward passes of the run's first ``step`` optimizer steps (every micro-batch back-propagates ``units``
    times; an epoch's last step may hold fewer micro-batches)."""
    batches, per_epoch = steps_per_epoch(items, tp)
    epochs, rest = divmod(step, per_epoch)
    return (epochs * batches + min(batches, rest * tp.gradient_accumulation_steps)) * units


def shares(items: int, processes: int) -> list[torch.Tensor]:
    """Positions of each process's rows in a micro-batch of ``items``: contiguous, sizes differ by at most one."""
    return list(torch.tensor_split(torch.arange(items), processes))


def step_units(plan: StepPlan, seed: int, timesteps: tuple[int, int] | None, rank: int, processes: int, *,
               sharded: bool) -> Iterator[tuple[Unit | None, float, bool]]:
    """The backwards of one optimizer step, in order, as process ``rank`` of ``processes`` runs them: (unit, weight
    of its loss, whether it is the step's last backward). Unit None: this process has no rows of the micro-batch
    and that backward need not run here. Lazy: each micro-batch's generator is drawn from as the units' losses
    consume it, in this order."""
    units = 1 if timesteps is None else timesteps[1]
    backwards, count = len(plan.micro_batches) * units, 0
    for b_index, micro in plan.micro_batches:
        generator = rng(seed, plan.epoch, b_index)
        if timesteps is None:
            steps: list[torch.Tensor | None] = [None]
        else:  # drawn for the whole micro-batch, so every process draws the same
            perms = torch.stack([torch.randperm(timesteps[0], generator=generator) for _ in range(len(micro))])
            steps = list(perms[:, :units].T)  # per unit [b]: one step per item, shared by a pair's images
        share = shares(len(micro), processes)[rank]
        for step_index in steps:
            count += 1
            last = count == backwards
            if len(share) == 0 and not (last or sharded):  # fewer rows than processes: none here
                yield None, 0.0, last
                continue
            # The last backward all-reduces (and under FSDP every forward and backward gathers weights), so every
            # process runs it: an empty share trains one row with weight 0.
            weight, mine = (len(share) / len(micro), share) if len(share) else (0.0, torch.arange(1))
            yield (Unit(micro[mine], generator, None if step_index is None else step_index[mine], micro, mine,
                        padding=not weight), weight, last)


def accumulate(model: TrainableUNet, method: Method, plan: StepPlan, seed: int,
               timesteps: tuple[int, int] | None, on_backward: Callable[[], None] = lambda: None) -> StepResult:
    """Back-propagate every unit of one optimizer step, then step (unless a loss or the gradient is not finite).

    ``timesteps``: (W, steps trained per item) for a timestep method, else None: each item trains that many
    steps of a random permutation of the chain's first W steps (W = T: any step, as the official code).
    ``on_backward`` runs after every backward (the progress bar).

    N processes: each computes its share (``shares``) of every micro-batch. A share's loss is the mean over its
    b_r rows; it back-propagates loss x (b_r / b) x N / (units in the step): DDP averages the gradients over the
    N processes on the step's last backward, so the update is the one process's on the whole micro-batch (the
    mean over all b rows), up to the order of the float sums. Metrics and the count of non-finite losses stay
    on the device, weighted the same way, summed over processes and read once with the gradient norm: the
    inner loop never waits for the device.
    """
    acc = model.accelerator
    processes = acc.num_processes
    backwards = len(plan.micro_batches) * (1 if timesteps is None else timesteps[1])
    totals = torch.zeros(len(method.metrics) + 1, device=model.device)  # [metric sums..., non-finite losses]
    for unit, weight, last in step_units(plan, seed, timesteps, acc.process_index, processes, sharded=model.sharded):
        if unit is not None:
            with nullcontext() if last else acc.no_sync(model.unet):
                loss, metrics = method.loss(unit)
                acc.backward(loss * (weight * processes) / backwards)
            if weight:
                values = [torch.as_tensor(metrics[k], dtype=torch.float32, device=model.device).detach() * weight
                          for k in method.metrics]
                totals += torch.stack([*values, (~torch.isfinite(loss.detach())).any().float()])
        on_backward()
    if processes > 1:
        totals = acc.reduce(totals, reduction="sum")
    grad_norm = model.clip_gradients()
    *sums, nonfinite, norm = torch.cat([totals, grad_norm.detach().float().reshape(1).to(totals.device)]).tolist()
    skipped = nonfinite > 0 or not math.isfinite(norm)
    model.optimizer_step(take=not skipped)
    return StepResult({k: v / backwards for k, v in zip(method.metrics, sums)}, norm, skipped=skipped)


class CompileMismatch(RunError):
    """``train.compile``'s backend computes other gradients than eager PyTorch on this machine."""


# Relative distance allowed between the compiled and the eager UNet's gradients, per top-level part of the UNet
# (||g_compiled - g_eager|| / ||g_eager||): fp32 kernels fused in another order move gradients by ~1e-6; under
# bf16/fp16 autocast a fused kernel rounds its intermediates differently, ~1e-3. A wrong compiler misses by far
# more: inductor's CPU backward (README "Fast path") loses whole parts, distance ~1.
COMPILE_RTOL = {"no": 1e-3, "bf16": 3e-2, "fp16": 3e-2}


def check_compiled(model: TrainableUNet, method: Method, plan: StepPlan, seed: int,
                   timesteps: tuple[int, int] | None) -> tuple[str, float]:
    """Back-propagate the first unit of ``plan`` through the eager UNet and through the compiled one
    (``model.unet``), from the same weights and draws, and compare the gradients per top-level part of the UNet
    (summed over processes). Returns the part furthest from eager and its relative distance; raises
    CompileMismatch beyond ``COMPILE_RTOL``. Leaves no gradient behind and does not touch the training draws
    (``step_units`` makes its own generators)."""
    acc = model.accelerator
    unit = next(u for u, _, _ in step_units(plan, seed, timesteps, acc.process_index, acc.num_processes,
                                           sharded=model.sharded) if u is not None)
    draws = unit.generator.get_state()
    named = [(name.split(".")[0], p) for name, p in model.raw_unet.named_parameters() if p.requires_grad]
    parts = sorted({part for part, _ in named})
    grads = []
    for unet in (model.eager_unet, model.unet):
        unit.generator.set_state(draws)
        # synchronised, as a step's last backward is: under FSDP a gradient exists only once reduce-scattered (every
        # process runs both passes); under DDP every process then holds the same averaged gradients
        with model.training_unet(unet):
            loss, _ = method.loss(unit)
            acc.backward(loss)
        # FSDP: each process's shard of each gradient (the sums below add up the shards)
        grads.append([None if p.grad is None else (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
                      .detach().clone() for _, p in named])
        model.optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(len(parts), 2, dtype=torch.float64, device=model.device)  # [part, (||diff||^2, ||eager||^2)]
    for (part, _), eager, compiled in zip(named, *grads):
        eager = torch.zeros(()) if eager is None else eager.double()
        compiled = torch.zeros(()) if compiled is None else compiled.double()
        row = parts.index(part)
        sums[row, 0] += ((compiled - eager) ** 2).sum().to(sums.device)
        sums[row, 1] += (eager**2).sum().to(sums.device)
    if acc.num_processes > 1:
        sums = acc.reduce(sums, reduction="sum")
    distance = [math.sqrt(d / r) if r > 0 else (0.0 if d == 0 else math.inf) for d, r in sums.tolist()]
    worst = max(range(len(parts)), key=lambda k: distance[k])
    tolerance = COMPILE_RTOL[model.tp.mixed_precision]
    if not distance[worst] <= tolerance:
        far = ", ".join(f"{part} {d:.2g}" for part, d in zip(parts, distance) if not d <= tolerance)
        raise CompileMismatch(
            f"train.compile = {model.tp.compile!r}: the compiled UNet's gradients are not eager PyTorch's on the first "
            f"training unit (relative distance {far}; allowed {tolerance:g} under mixed_precision "
            f"{model.tp.mixed_precision!r}): this backend computes wrong gradients here (torch {torch.__version__}); "
            "allowed: train.compile null (eager), or a backend that passes this check")
    return parts[worst], distance[worst]


def inputs_fingerprint(params: Params, preferences: PreferenceStore, trajectories: TrajectoryStore | None) -> str:
    """What a checkpoint is valid for: the train keys in use, the model (and sampling) params, the datasets."""
    payload: dict[str, Any] = {"train": params.train.in_use(), "model": params.model.model_dump(),
                               "preferences": preferences.index["pairs_sha256"]}
    if trajectories is not None:
        payload |= {"sampling": params.sampling.model_dump(), "trajectories": trajectories.index_sha256()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _open_data(method_cls: type[Method], name: str, trajectories_dir: Path,
               preferences_dir: Path) -> tuple[PreferenceStore, TrajectoryStore | None]:
    preferences = PreferenceStore.open(preferences_dir)
    if preferences.source_kind != "trajectories":
        if method_cls.data == "trajectories":
            image_methods = [m for m, spec in TRAIN_METHODS.items() if resolve(spec).data == "images"]
            raise DatasetError(
                f"{preferences_dir}: train.method {name!r} learns from sampled trajectories, but this preference "
                f"dataset is imported image pairs ({preferences.source_kind}); use train.method "
                f"{', '.join(image_methods[:-1])} or {image_methods[-1]}, or label.source: judge"
            )
        return preferences, None
    trajectories = TrajectoryStore.open(trajectories_dir)
    preferences.check_trajectories(trajectories)
    return preferences, trajectories


# "The loss never moved": every step's loss within this relative distance of the first (about 4 float32 ulps).
# A policy that did not change still gives losses that differ in the last bits (its log-probs are computed in
# other batches than the reference's: 1.5e-8 at ln 2 on builtin:tiny-sd), while the default digits D3PO run,
# whose loss prints as 0.6931 throughout, moves up to 1.1e-4 from its first step (plots/train.csv).
LOSS_UNMOVED_RTOL = 5e-7
LARGE_LORA_SCALE = 64.0  # lora_alpha / lora_rank beyond this is named as the likely cause of overflow


def nonfinite_steps(curve: list[dict[str, float]]) -> int:
    return sum(1 for row in curve if row.get("skipped"))


def update_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """L2 norm of the change of the trainable weights (fp32 CPU copies of ``TrainableUNet.weights``)."""
    return math.sqrt(sum(float((after[k].double() - before[k].double()).square().sum()) for k in before))


def training_memory_knobs(params: Params) -> list[str]:
    """The params that lower training's peak memory, with their values now (the out-of-memory message).

    Not the timestep fraction: every timestep is its own backward (``accumulate``), so it changes the time
    per step, not the peak."""
    tp = params.train
    knobs = [f"train.batch_size {tp.batch_size} -> smaller (items per micro-batch; raise "
             f"train.gradient_accumulation_steps to keep the effective batch)"]
    if not tp.gradient_checkpointing:
        knobs.append("train.gradient_checkpointing false -> true (recompute activations in backward)")
    if tp.mixed_precision == "no":
        knobs.append("train.mixed_precision no -> bf16 (or fp16)")
    knobs.append(dtype_knob(params.model.dtype))
    if tp.finetune == "full":
        knobs.append("train.finetune full -> lora (no gradients or optimizer state for every UNet weight)")
    return knobs


def likely_causes(params: Params, loss: float, grad_norm: float, steps_taken: int) -> str:
    """The params most likely to have made a loss or gradient non-finite, with what to set instead."""
    tp, causes = params.train, []
    scale = tp.lora_alpha / tp.lora_rank
    if tp.finetune == "lora" and scale > LARGE_LORA_SCALE:
        causes.append(f"train.lora_alpha {tp.lora_alpha:g} too large (LoRA scale alpha/rank = {scale:g} overflows "
                      f"the gradients; set it near train.lora_rank {tp.lora_rank})")
    if tp.mixed_precision == "fp16" or params.model.dtype == "float16":
        causes.append("fp16 overflow (train.mixed_precision: bf16 or no; model.dtype: bfloat16 or float32)")
    if steps_taken > 0 and not math.isfinite(loss):
        causes.append(f"train.lr {tp.lr:g} too high (finite for {steps_taken} steps, then diverged; lower it or "
                      f"raise train.lr_warmup_fraction)")
    if not causes:
        causes.append(f"train.lr {tp.lr:g} too high, or non-finite data (re-run the sample stage)")
    return "; ".join(causes)


def too_many_nonfinite(params: Params, step: int, total: int, result: StepResult, curve: list[dict[str, float]]) -> str:
    """Why the run stops: the step, its values and the likely cause, in one line."""
    taken = sum(1 for row in curve if not row.get("skipped"))
    return (f"training stopped at optimizer step {step}/{total}: {nonfinite_steps(curve)} steps with a non-finite "
            f"loss or gradient, more than train.max_nonfinite_steps = {params.train.max_nonfinite_steps} (this step: "
            f"loss {result.means['loss']:.6g}, gradient norm {result.grad_norm:.6g}); likely cause: "
            + likely_causes(params, result.means["loss"], result.grad_norm, taken))


def did_not_learn(params: Params, curve: list[dict[str, float]], norm: float, *, steps_this_call: int) -> str | None:
    """Why a finished run must not be handed on (to evaluate and register): no optimizer step taken, weights
    that did not change, or a loss that never moved from its first value. None: it learned."""
    if steps_this_call == 0:
        return None  # resumed from the final checkpoint: nothing trained in this call
    taken = [row for row in curve if not row.get("skipped")]
    if not taken:
        last = curve[-1]
        return (f"training took no optimizer step: all {len(curve)} had a non-finite loss or gradient (last: loss "
                f"{last['loss']:.6g}, gradient norm {last['grad_norm']:.6g}); likely cause: "
                + likely_causes(params, last["loss"], last["grad_norm"], 0))
    if norm == 0.0:
        return (f"the trained weights did not change in {steps_this_call} optimizer steps (update norm 0): the loss "
                f"does not reach them (zero or no gradients); check train.lr {params.train.lr:g} and the method")
    first = taken[0]["loss"]
    if len(taken) > 1 and all(abs(row["loss"] - first) <= LOSS_UNMOVED_RTOL * abs(first) for row in taken):
        return (f"the loss never moved from its first value {first:.7g} in {len(taken)} optimizer steps (update norm "
                f"{norm:.3g}): the policy did not learn; likely cause: gradients clipped to nothing or too small an "
                f"update (train.lr {params.train.lr:g}, train.lora_alpha {params.train.lora_alpha:g}, "
                f"train.max_grad_norm {params.train.max_grad_norm:g})")
    return None


def fit(
    params: Params,
    *,
    trajectories_dir: Path,
    preferences_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
    model: TrainableUNet | None = None,
    snapshots: bool = True,
) -> TrainSummary:
    """Train ``params.train.method`` on the labeled data; write the final weights and snapshots to ``out_dir``.

    ``out_dir`` gets a LoRA (``pipe.load_lora_weights(out_dir)``) or the full UNet under ``unet/``, and the
    epoch snapshots under ``snapshots/``. ``checkpoint_dir`` holds ``state/`` (the latest resumable
    checkpoint) and ``snapshots/``. ``stop_after_steps`` ends the run after that many optimizer steps *of
    this call*, leaving the last checkpoint behind (to test that an interrupted run resumes to the same result).
    ``model``: train this model, optimizer state and all, instead of a new one (the rounds loop: one model
    through every round; it was built with the method's ``needs_reference_copy``). ``snapshots`` False writes
    no epoch snapshots (the rounds loop keeps each round's final weights instead).
    """
    tp, name = params.train, params.train.method
    method_cls: type[Method] = resolve(TRAIN_METHODS[name])
    main = process_state(params).is_main_process
    if not main:  # one process speaks: the others train the same steps silently
        progress = _silent
    preferences, trajectories = _open_data(method_cls, name, trajectories_dir, preferences_dir)
    with memory_knobs("while loading the model and the training data", [dtype_knob(params.model.dtype)]):
        if model is None:
            model = TrainableUNet(params, need_reference_copy=method_cls.needs_reference_copy, progress=progress)
        method = method_cls(FitContext(params, model, preferences, trajectories, progress))
    processes = model.accelerator.num_processes  # launched by hand (several nodes), it may differ from the param
    if processes > tp.batch_size:
        raise ValueError(f"{processes} processes share micro-batches of train.batch_size = {tp.batch_size} items, so "
                         f"some would idle; allowed: train.batch_size >= the process count (a multiple of it)")
    _, per_epoch = steps_per_epoch(method.items, tp)
    total_steps = per_epoch * tp.epochs
    timesteps = None
    extra: dict[str, Any] = {}
    if method.timestep_fraction is not None:
        window = trajectories.num_steps if method.timestep_window is None else method.timestep_window
        if window > trajectories.num_steps:
            raise ValueError(f"train.{name}.timestep_window = {window}: the trajectories have only "
                             f"{trajectories.num_steps} steps; allowed: 1..{trajectories.num_steps} or null (all)")
        timesteps = (window, math.ceil(method.timestep_fraction * window))
        extra["timesteps_per_item"] = timesteps[1]
        extra["timestep_window"] = window

    began = time.time()
    fingerprint = inputs_fingerprint(params, preferences, trajectories)
    state_dir, snapshot_dir = checkpoint_dir / "state", checkpoint_dir / "snapshots"
    saved = load_checkpoint(state_dir, fingerprint)
    model.accelerator.wait_for_everyone()  # every process has read the checkpoint before the main one may remove it
    if saved is not None:
        model.load_weights(saved.weights)
        model.load_optimizer_state(saved.optimizer)
        curve, start_step, method.precomputed = saved.curve, saved.step, saved.precomputed
        progress(f"resuming from checkpoint at optimizer step {start_step}/{total_steps}")
    else:
        if main:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a stale run's state and snapshots
        curve, start_step = [], 0
        with memory_knobs("in the reference log-prob pass", [dtype_knob(params.model.dtype)]):
            method.precomputed = method.precompute()

    per_item = "" if timesteps is None else f", {timesteps[1]}/{trajectories.num_steps} timesteps per item" + (
        "" if timesteps[0] == trajectories.num_steps else f" (of the first {timesteps[0]})")
    progress(f"{name}: {method.items} {method.item_name}, {tp.epochs} epochs x {per_epoch} optimizer steps "
             f"({total_steps} total), batch {tp.batch_size} x accumulation {tp.gradient_accumulation_steps}"
             f"{per_item}, lr {model.base_lr:g}" + (f", {method.describe()}" if method.describe() else ""))

    def summary(step: int) -> TrainSummary:
        """Final metrics = the mean of every logged metric over the last epoch's optimizer steps taken (a
        skipped step's metrics may be non-finite)."""
        last = [r for r in curve if r["epoch"] == curve[-1]["epoch"]] if curve else []
        rows = [r for r in last if not r.get("skipped")]
        final = {k: sum(r[k] for r in rows) / len(rows) for k in method.metrics} if rows else {}
        extra["nonfinite_steps"] = nonfinite_steps(curve)
        extra["update_norm"] = update_norm(start_weights, model.weights())
        return TrainSummary(method=name, steps=step, epochs=tp.epochs, items=method.items,
                            resumed_from_step=start_step, seconds=time.time() - began, final=final, curve=curve,
                            extra=extra)

    if tp.compile is not None:  # a wrong compiler is refused before it trains anything
        first = next(plan_steps(method.items, tp, start_step), None)
        if first is not None:
            part, distance = check_compiled(model, method, first, tp.seed, timesteps)
            extra["compile_gradient_distance"] = distance
            progress(f"train.compile = {tp.compile!r}: gradients of the compiled UNet match eager's on the first unit "
                     f"(furthest part {part}: relative distance {distance:.2g}, allowed "
                     f"{COMPILE_RTOL[tp.mixed_precision]:g})")
    start_weights = model.weights()  # the update norm of this call: did training change the policy at all?
    units = 1 if timesteps is None else timesteps[1]
    bar = progress_bar(desc=f"train {name}", total=backwards_before(total_steps, method.items, tp, units),
                       unit="backward", initial=backwards_before(start_step, method.items, tp, units), disable=not main)
    skipped = nonfinite_steps(curve)  # a resumed run's curve counts its earlier skipped steps
    with bar, memory_knobs("while training", training_memory_knobs(params)):
        for plan in plan_steps(method.items, tp, start_step):
            lr = model.set_lr(plan.step, total_steps)
            step = accumulate(model, method, plan, tp.seed, timesteps, on_backward=bar.update)
            epoch = plan.epoch + 1
            curve.append({"step": plan.step, "epoch": epoch, **step.means, "lr": lr, "grad_norm": step.grad_norm,
                          "skipped": int(step.skipped)})
            if log_metrics is not None and main:
                log_metrics({f"train/{k}": v for k, v in step.means.items()} | {"train/grad_norm": step.grad_norm},
                            plan.step)
            skipped += int(step.skipped)
            with above_bars():
                progress(f"step {plan.step}/{total_steps} epoch {epoch}: "
                         + " ".join(f"{k} {v:.5g}" for k, v in step.means.items()) + f" grad_norm {step.grad_norm:.4g}"
                         + (f" (skipped: non-finite, {skipped} of at most train.max_nonfinite_steps = "
                            f"{tp.max_nonfinite_steps})" if step.skipped else ""))
            bar.set_postfix_str(f"step {plan.step}/{total_steps} loss {step.means['loss']:.5g}", refresh=False)
            if skipped > tp.max_nonfinite_steps:
                raise NumericsError(too_many_nonfinite(params, plan.step, total_steps, step, curve))
            # sharded (FSDP): gathering the weights is a collective, so every process gathers and the main one writes
            gathers = main or model.sharded
            if gathers and snapshots and plan.epoch_done and (epoch % tp.snapshot_every_epochs == 0
                                                              or epoch == tp.epochs):
                weights = model.weights() if model.sharded else None
                if main:
                    with atomic_dir(snapshot_dir / f"epoch-{epoch:04d}") as tmp:
                        model.save(tmp, weights)
            interrupted = stop_after_steps is not None and plan.step - start_step >= stop_after_steps
            if gathers and (plan.step % tp.checkpoint_every == 0 or plan.step == total_steps or interrupted):
                weights, optimizer_state = model.weights(), model.optimizer_state()
                if main:
                    save_checkpoint(state_dir, fingerprint=fingerprint, step=plan.step, weights=weights,
                                    optimizer_state=optimizer_state, precomputed=method.precomputed, curve=curve)
            if interrupted:
                model.accelerator.wait_for_everyone()  # the checkpoint is written when any process returns
                return summary(plan.step)
    done = summary(total_steps)
    why = did_not_learn(params, curve, done.extra["update_norm"], steps_this_call=total_steps - start_step)
    if why is not None:  # before out_dir: a policy that did not learn is never written, so never registered
        raise NumericsError(why)
    # The final weights at the top of out_dir, the epoch snapshots below them, written as one unit so a
    # crash never leaves a partial dir.
    weights = model.weights() if model.sharded else None  # a collective: every process gathers
    if main:
        with atomic_dir(out_dir) as tmp:
            model.save(tmp, weights)
            if snapshot_dir.is_dir():
                shutil.copytree(snapshot_dir, tmp / "snapshots")
    model.accelerator.wait_for_everyone()  # out_dir is complete when any process returns
    return done


__all__ = ["COMPILE_RTOL", "CompileMismatch", "FitContext", "Method", "PromptTable", "Unit", "check_compiled", "fit", "rng"]
