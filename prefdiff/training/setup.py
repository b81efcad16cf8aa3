"""What every trainer shares: the trainable UNet (LoRA or full), its reference, optimizer, lr schedule, output.

Trainers (``d3po.py``, ``pairs.py``, ``ddpo.py``) differ only in their data and loss; model setup, the
reference policy, the optimizer (AdamW or Adafactor), the warmup schedule, checkpoint state and the saved
artifact are the same code, so a choice such as ``train.finetune: full`` works for every method.

Reference policy:
- LoRA with ``reference: base``: the same UNet with adapters disabled, under no_grad (no second copy);
- LoRA with ``reference: previous_round`` or ``finetune: full``: a frozen copy of the UNet as it was before
  the first update (for D3PO the reference log-probs are precomputed before training, so no copy is kept).

Output (``save``): a LoRA in the diffusers format (``pipe.load_lora_weights(dir)``), or for full fine-tuning
the whole UNet under ``dir/unet`` (``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``, the
layout of the released Diffusion-DPO checkpoints). ``prefdiff.models.finetuned.apply_trained`` loads either.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefdiff.config import Params, TrainParams
from prefdiff.data.atomic import atomic_dir
from prefdiff.models import lora
from prefdiff.training.checkpoint import load_checkpoint, save_checkpoint

from prefdiff.models.finetuned import FULL_UNET_DIR


@dataclass
class TrainSummary:
    method: str
    steps: int
    epochs: int
    pairs: int
    resumed_from_step: int
    seconds: float
    final: dict[str, float]
    curve: list[dict[str, float]] = field(repr=False, default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {
            "method": self.method, "steps": self.steps, "epochs": self.epochs, "pairs": self.pairs,
            "resumed_from_step": self.resumed_from_step, "seconds": round(self.seconds, 2), **self.extra, **self.final,
        }


def summarize(method: str, curve: list[dict[str, float]], *, step: int, epochs: int, pairs: int, start_step: int,
              began: float, extra: dict[str, Any] | None = None) -> TrainSummary:
    """Final metrics = the mean of every logged key over the last epoch's optimizer steps."""
    last_epoch = curve[-1]["epoch"] if curve else 0
    rows = [r for r in curve if r["epoch"] == last_epoch]
    keys = [k for k in (rows[0] if rows else {}) if k not in ("step", "epoch", "lr")]
    final = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return TrainSummary(method=method, steps=step, epochs=epochs, pairs=pairs, resumed_from_step=start_step,
                        seconds=time.time() - began, final=final, curve=curve, extra=extra or {})


def effective_lr(tp: TrainParams, num_processes: int) -> float:
    """train.lr, times the effective batch when ``scale_lr`` (official Diffusion-DPO ``--scale_lr``)."""
    if not tp.scale_lr:
        return tp.lr
    return tp.lr * tp.batch_size * tp.gradient_accumulation_steps * num_processes


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Constant lr after a linear warmup (diffusers ``constant_with_warmup``): ``step`` is the 1-based
    optimizer step about to be taken, so step 1 uses base_lr * 0 / warmup as the official run does."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step - 1) / warmup_steps)


def warmup_steps(tp: TrainParams, total_steps: int) -> int:
    return math.ceil(tp.lr_warmup_fraction * total_steps)


def make_optimizer(tp: TrainParams, trainable: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if tp.optimizer == "adafactor":
        # Official Diffusion-DPO SDXL: relative_step/scale_parameter off, so the lr schedule is ours.
        from transformers.optimization import Adafactor

        return Adafactor(trainable, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         clip_threshold=1.0, weight_decay=tp.weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, betas=(tp.adam_beta1, tp.adam_beta2),
                             weight_decay=tp.weight_decay, eps=tp.adam_eps)


class TrainableUNet:
    """The pipeline, its UNet prepared for training (LoRA or full), the optimizer and the reference."""

    def __init__(self, params: Params, *, need_reference_copy: bool, progress=print) -> None:
        from accelerate import Accelerator

        from prefdiff.models.loading import load_pipeline

        tp = params.train
        self.tp = tp
        self.accelerator = Accelerator(mixed_precision=tp.mixed_precision)
        self.pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=str(self.accelerator.device),
                                  revision=params.model.revision)
        unet = self.pipe.unet
        if tp.finetune == "lora":
            if tp.init_lora:
                trainable = lora.load_lora_for_training(unet, Path(tp.init_lora))
            else:
                with torch.random.fork_rng(devices=[]):  # LoRA A ~ N(0, 1/r) drawn from train.seed: reproducible
                    torch.manual_seed(tp.seed)
                    trainable = lora.add_lora(unet, rank=tp.lora_rank, alpha=tp.lora_alpha)
        else:
            trainable = []
        # A frozen copy for references that are not "the base with adapters disabled"; taken before any
        # update and before the trainable weights are upcast, so it is exactly the starting model.
        copy_needed = need_reference_copy and (tp.finetune == "full" or tp.reference == "previous_round")
        self.ref_unet = copy.deepcopy(unet).requires_grad_(False).eval() if copy_needed else None
        if tp.finetune == "full":
            unet.to(torch.float32)  # master weights in fp32; mixed precision autocasts the forward
            unet.requires_grad_(True)
            trainable = [p for p in unet.parameters() if p.requires_grad]
        if tp.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers checkpoints activations only in training mode (the UNet has no dropout)
        self.trainable = trainable
        self.num_trainable = sum(p.numel() for p in trainable)
        self.base_lr = effective_lr(tp, self.accelerator.num_processes)
        optimizer = make_optimizer(tp, trainable, self.base_lr)
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.raw_unet = self.accelerator.unwrap_model(self.unet)
        kind = f"LoRA r={tp.lora_rank}" if tp.finetune == "lora" else "full UNet"
        progress(f"training {kind}: {self.num_trainable:,} parameters, {tp.optimizer}, lr {self.base_lr:g}")

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @contextmanager
    def reference(self) -> Iterator[Any]:
        """Yield the reference UNet for no_grad forwards; LoRA adapters are re-enabled on exit."""
        if self.ref_unet is not None:
            with torch.no_grad():
                yield self.ref_unet
        elif self.tp.finetune == "lora" and self.tp.reference == "base":
            with lora.adapters_disabled(self.raw_unet):
                yield self.raw_unet
        else:  # D3PO precomputes before training: the model as it is now is the reference
            with torch.no_grad():
                yield self.raw_unet

    def starting_reference(self):
        """Context for a one-off reference pass before the first update (D3PO's precomputed log-probs)."""
        if self.tp.finetune == "lora" and self.tp.reference == "base":
            return lora.adapters_disabled(self.raw_unet)
        return nullcontext()

    def state(self) -> dict[str, torch.Tensor]:
        """Trainable weights (detached CPU fp32 copies) for checkpoints."""
        if self.tp.finetune == "lora":
            return lora.lora_state_dict(self.raw_unet)
        return {k: v.detach().float().cpu().clone() for k, v in self.raw_unet.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.tp.finetune == "lora":
            lora.set_lora_state_dict(self.raw_unet, state)
        else:
            self.raw_unet.load_state_dict(state, strict=True)

    def set_lr(self, step: int, total_steps: int) -> float:
        lr = lr_at(step, self.base_lr, warmup_steps(self.tp, total_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def optimizer_step(self) -> None:
        self.accelerator.clip_grad_norm_(self.trainable, self.tp.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, out_dir: Path) -> None:
        """Write the trained weights into ``out_dir`` (a LoRA, or the full UNet under ``unet/``)."""
        if self.tp.finetune == "lora":
            lora.save_lora(self.raw_unet, out_dir)
        else:
            self.raw_unet.save_pretrained(out_dir / FULL_UNET_DIR, safe_serialization=True)


def rng(*key: int) -> torch.Generator:
    """A CPU generator that is a pure function of ``key`` (seed, epoch, batch index, ...)."""
    return torch.Generator().manual_seed(hash(key) % (2**62))


def steps_per_epoch(items: int, tp: TrainParams) -> tuple[int, int]:
    """(micro-batches, optimizer steps) per epoch for ``items`` training items (pairs or images)."""
    batches = math.ceil(items / tp.batch_size)
    return batches, math.ceil(batches / tp.gradient_accumulation_steps)


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: its micro-batches as (batch index in the epoch, item rows) and its lr."""

    epoch: int  # 0-based
    step: int  # 1-based, over the whole run
    epoch_done: bool  # the epoch's last optimizer step
    micro_batches: list[tuple[int, torch.Tensor]]
    lr: float


class CheckpointedRun:
    """Resume, per-step bookkeeping (curve, MLflow, snapshots, checkpoints) and the final artifact of a trainer.

    Layout under ``checkpoint_dir``: ``state/`` (the latest resumable checkpoint, replaced atomically) and
    ``snapshots/epoch-NNNN`` (the weights after each snapshot epoch, copied next to the final result).
    ``extra`` is a tensor the trainer wants back on resume (D3PO's precomputed reference log-probs).
    """

    def __init__(self, model: TrainableUNet, checkpoint_dir: Path, fingerprint: str, *, method: str, epochs: int,
                 total_steps: int, items: int, progress: Callable[[str], None] = print,
                 log_metrics: Callable[[dict[str, float], int], None] | None = None,
                 stop_after_steps: int | None = None) -> None:
        self.model, self.fingerprint, self.method = model, fingerprint, method
        self.epochs, self.total_steps, self.items = epochs, total_steps, items
        self.progress, self.log_metrics, self.stop_after_steps = progress, log_metrics, stop_after_steps
        self.state_dir, self.snapshot_dir = checkpoint_dir / "state", checkpoint_dir / "snapshots"
        self.began = time.time()
        state = load_checkpoint(self.state_dir, fingerprint)
        if state is not None:
            model.load_state(state.lora)
            model.optimizer.load_state_dict(state.optimizer)
            self.curve, self.start_step, self.extra = state.curve, state.step, state.ref_logp
            progress(f"resuming from checkpoint at optimizer step {self.start_step}/{total_steps}")
        else:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a stale run's state and snapshots
            self.curve, self.start_step, self.extra = [], 0, None

    def plan(self, items: int) -> Iterator[StepPlan]:
        """The optimizer steps still to run (a resumed run skips those done): each epoch shuffles the items
        with a generator seeded by (train.seed, epoch); a step takes ``gradient_accumulation_steps``
        micro-batches of ``batch_size`` (an epoch's last step may hold fewer)."""
        tp = self.model.tp
        batches, per_epoch = steps_per_epoch(items, tp)
        for epoch in range(tp.epochs):
            order = torch.randperm(items, generator=rng(tp.seed, epoch, -1))
            for opt_index in range(per_epoch):
                step = epoch * per_epoch + opt_index + 1
                if step <= self.start_step:
                    continue
                first = opt_index * tp.gradient_accumulation_steps
                ids = range(first, min(first + tp.gradient_accumulation_steps, batches))
                micro = [(b, order[b * tp.batch_size : (b + 1) * tp.batch_size]) for b in ids]
                yield StepPlan(epoch=epoch, step=step, epoch_done=opt_index + 1 == per_epoch, micro_batches=micro,
                               lr=self.model.set_lr(step, self.total_steps))

    def end_step(self, step: int, epoch: int, epoch_done: bool, metrics: dict[str, float], lr: float,
                 *, extra: torch.Tensor | None = None) -> bool:
        """Record an optimizer step; returns True when the run must stop here (``stop_after_steps``)."""
        row = {"step": step, "epoch": epoch + 1, **metrics, "lr": lr}
        self.curve.append(row)
        if self.log_metrics is not None:
            self.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        self.progress(f"step {step}/{self.total_steps} epoch {epoch + 1}: "
                      + " ".join(f"{k} {v:.5g}" for k, v in metrics.items()))
        tp = self.model.tp
        if epoch_done and ((epoch + 1) % tp.snapshot_every_epochs == 0 or epoch + 1 == tp.epochs):
            with atomic_dir(self.snapshot_dir / f"epoch-{epoch + 1:04d}") as tmp:
                self.model.save(tmp)
        interrupted = self.stop_after_steps is not None and step - self.start_step >= self.stop_after_steps
        if step % tp.checkpoint_every == 0 or step == self.total_steps or interrupted:
            save_checkpoint(self.state_dir, fingerprint=self.fingerprint, step=step, lora_state=self.model.state(),
                            optimizer_state=self.model.optimizer.state_dict(),
                            ref_logp=torch.zeros(0) if extra is None else extra, curve=self.curve)
        self.last_step = step
        return interrupted

    def summary(self, extra: dict[str, Any] | None = None) -> TrainSummary:
        step = getattr(self, "last_step", self.start_step)
        return summarize(self.method, self.curve, step=step, epochs=self.epochs, pairs=self.items,
                         start_step=self.start_step, began=self.began, extra=extra)

    def finish(self, out_dir: Path, extra: dict[str, Any] | None = None) -> TrainSummary:
        """Write the final weights at the top of ``out_dir`` and the epoch snapshots below it, as one unit."""
        with atomic_dir(out_dir) as tmp:
            self.model.save(tmp)
            if self.snapshot_dir.is_dir():
                shutil.copytree(self.snapshot_dir, tmp / "snapshots")
        return self.summary(extra)


__all__ = ["CheckpointedRun", "FULL_UNET_DIR", "StepPlan", "rng", "steps_per_epoch", "TrainSummary", "TrainableUNet", "effective_lr", "lr_at", "make_optimizer", "summarize",
           "warmup_steps"]
