"""The trainable UNet (LoRA or full) of every method: its reference, optimizer, lr schedule and saved output.

Methods (``methods/``) differ only in their data and loss; model setup, the reference policy, the optimizer
(AdamW or Adafactor), the warmup schedule, the checkpointed weights and the saved artifact are this one
class, so a choice such as ``train.finetune: full`` works for every method.

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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from prefdiff.config import Params, TrainParams
from prefdiff.models import lora
from prefdiff.models.finetuned import FULL_UNET_DIR
from prefdiff.models.processes import process_state
from prefdiff.training import sharding


def effective_lr(tp: TrainParams) -> float:
    """train.lr, times the optimizer step's batch when ``scale_lr`` (official Diffusion-DPO ``--scale_lr``).

    The step's batch is batch_size x gradient_accumulation_steps items whatever the process count: processes
    share each micro-batch (``fit.accumulate``), so the official 16 GPUs x 1 x 128 is batch_size 16 x 128 here."""
    if not tp.scale_lr:
        return tp.lr
    return tp.lr * tp.batch_size * tp.gradient_accumulation_steps


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

    def __init__(self, params: Params, *, need_reference_copy: bool, progress=print, pipe=None) -> None:
        """``pipe``: the base pipeline of ``params.model`` already loaded (the rounds loop keeps one for every
        round), else it is loaded here."""
        from accelerate import Accelerator

        from prefdiff.models.loading import DeviceError, load_pipeline

        tp = params.train
        self.tp = tp
        self.accelerator = Accelerator(mixed_precision=tp.mixed_precision, cpu=process_state(params).device.type == "cpu")
        refusal = sharding.fsdp_refusal(self.accelerator, tp.finetune, tp.optimizer)
        if refusal is not None:
            raise DeviceError(refusal)
        if pipe is None:
            device = self.accelerator.device  # a launched CPU process's is "cpu:0", which model.device does not name
            pipe = load_pipeline(params.model.source, dtype=params.model.dtype,
                                 device="cpu" if device.type == "cpu" else str(device),
                                 revision=params.model.revision)
        self.pipe = pipe.to(self.accelerator.device)
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
        self.base_lr = effective_lr(tp)
        optimizer = make_optimizer(tp, trainable, self.base_lr)
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.raw_unet = self.accelerator.unwrap_model(self.unet)
        # The methods' training forwards go through ``unet``: compiled with ``train.compile``, whose gradients
        # ``fit`` first checks against this eager module's (``check_compiled``). Reference passes, sampling and
        # saving use ``raw_unet`` and stay eager.
        self.eager_unet = self.unet
        if tp.compile is not None:
            self.unet = torch.compile(self.unet, backend=tp.compile)
        # FSDP (``sharding``) replaces every parameter by its shard: clipping must see the prepared parameters
        self.sharded = any(sharding.is_sharded(p) for p in self.raw_unet.parameters())
        if tp.finetune == "full":
            self.trainable = list(self.raw_unet.parameters())
        kind = f"LoRA r={tp.lora_rank}" if tp.finetune == "lora" else "full UNet"
        progress(f"training {kind}: {self.num_trainable:,} parameters, {tp.optimizer}, lr {self.base_lr:g}")

    @contextmanager
    def training_unet(self, unet) -> Iterator[None]:
        """The methods' training forwards go through ``unet`` inside the block (the eager or the compiled module)."""
        kept, self.unet = self.unet, unet
        try:
            yield
        finally:
            self.unet = kept

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

    def refresh_reference(self) -> None:
        """A ``previous_round`` reference copy becomes the policy as it is now: the start of the next round of
        many in one process (D3PO Sec. 5.2: each round's model is the next round's reference)."""
        if self.ref_unet is None or self.tp.finetune != "lora" or self.tp.reference != "previous_round":
            return
        lora.set_lora_state_dict(self.ref_unet, lora.lora_state_dict(self.raw_unet))

    def starting_reference(self):
        """Context for a one-off reference pass before the first update (D3PO's precomputed log-probs)."""
        if self.tp.finetune == "lora" and self.tp.reference == "base":
            return lora.adapters_disabled(self.raw_unet)
        return nullcontext()

    def weights(self) -> dict[str, torch.Tensor]:
        """Trainable weights (LoRA, or every UNet weight; detached CPU fp32 copies) for checkpoints. Sharded
        (FSDP): gathered whole on every process, a collective every process calls."""
        if self.tp.finetune == "lora":
            return lora.lora_state_dict(self.raw_unet)
        return sharding.full_state_dict(self.raw_unet)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.tp.finetune == "lora":
            lora.set_lora_state_dict(self.raw_unet, weights)
        else:
            sharding.load_full_state_dict(self.raw_unet, weights)

    def optimizer_state(self) -> dict:
        """The optimizer's state dict for checkpoints; sharded (FSDP): gathered whole, a collective."""
        return sharding.full_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        sharding.load_full_optimizer_state(self.optimizer, state)

    def set_lr(self, step: int, total_steps: int) -> float:
        lr = lr_at(step, self.base_lr, warmup_steps(self.tp, total_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to ``max_grad_norm``; returns their norm before clipping as a device tensor (the
        caller reads it with the step's metrics, in one transfer)."""
        return torch.as_tensor(sharding.full(self.accelerator.clip_grad_norm_(self.trainable, self.tp.max_grad_norm)))

    def optimizer_step(self, *, take: bool) -> None:
        """Step unless ``take`` is False (a non-finite loss or gradient norm), then zero the gradients.

        Skipped because clipping by an infinite norm zeroes every gradient (an overflow silently becomes "no
        update") and a NaN one spreads to every weight. Under fp16 mixed precision the grad scaler gets every
        step call: it skips a step with non-finite gradients itself and lowers its scale.
        """
        if self.accelerator.scaler is not None or take:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, out_dir: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trained weights into ``out_dir`` (a LoRA, or the full UNet under ``unet/``). ``weights``: the
        full UNet's ``weights()``, gathered by every process when sharded (the main process alone writes)."""
        if self.tp.finetune == "lora":
            lora.save_lora(self.raw_unet, out_dir)
        else:  # the layout of save_pretrained, from the gathered weights (a sharded module's are slices)
            from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
            from safetensors.torch import save_file

            unet_dir = out_dir / FULL_UNET_DIR
            self.raw_unet.save_config(unet_dir)
            save_file(self.weights() if weights is None else weights, str(unet_dir / SAFETENSORS_WEIGHTS_NAME),
                      metadata={"format": "pt"})


__all__ = ["TrainableUNet", "effective_lr", "lr_at"]
