"""Full fine-tuning with the UNet sharded across processes (FSDP2, ``deploy/accelerate/fsdp_full.yaml``).

Under accelerate's FSDP2 (``fully_shard``) each process holds a slice of every weight, gradient and AdamW moment
(torch ``DTensor``s); a forward or backward gathers the weights it needs from every process, so every process
must run every one. What prefdiff writes stays the one-process format: the weights and the optimizer state are
gathered to full tensors on every process (one tensor at a time: the device holds one unsharded weight beyond
its shards) before the main process writes them, and a checkpoint read by every process is sliced back into
each process's shards. A checkpoint or a trained UNet is therefore the same files whether it was written by one
process, by DDP or by FSDP, and any of them resumes or loads it.

Only ``train.finetune: full`` with AdamW is sharded (``fsdp_refusal`` says why the rest is not).
"""

from __future__ import annotations

import os

import torch

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` for a config with distributed_type: FSDP


def fsdp_requested(environ=os.environ) -> bool:
    return environ.get(FSDP_ENV, "false").lower() == "true"


def fsdp_refusal(accelerator, finetune: str, optimizer: str) -> str | None:
    """Why this run cannot train under the FSDP config it was launched with (None: it can, or no FSDP config)."""
    from accelerate.utils import DistributedType

    if not fsdp_requested():
        return None
    if accelerator.distributed_type != DistributedType.FSDP:
        # accelerate's AcceleratorState turns ACCELERATE_USE_FSDP into DistributedType.FSDP only for GPU-like
        # process groups (MULTI_GPU, MULTI_NPU, ...; state.py), never for MULTI_CPU: on the CPU the processes
        # would silently train DDP replicas instead of shards
        return (f"the accelerate config asks for FSDP but accelerate runs {accelerator.distributed_type.value} here "
                f"(accelerate shards only across GPUs, not CPU processes); with model.device cpu use "
                f"train.num_processes without PREFDIFF_ACCELERATE_CONFIG (DDP over gloo)")
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        return ("the accelerate config sets fsdp_version 1; prefdiff gathers and restores sharded weights as FSDP2 "
                "DTensors: set fsdp_version: 2 (deploy/accelerate/fsdp_full.yaml)")
    if finetune != "full":
        return ("train.finetune lora under an FSDP accelerate config: a LoRA's gradients and AdamW state are a few "
                "MB, so sharding saves nothing DDP does not, and prefdiff reads and writes LoRA weights unsharded; "
                "use deploy/accelerate/multi_gpu.yaml for LoRA, or train.finetune: full")
    if optimizer != "adamw":
        return (f"train.optimizer {optimizer} under FSDP: Adafactor's factored row/column statistics are not "
                f"sharded like the weights, so prefdiff cannot gather and restore them; use train.optimizer adamw")
    return None


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it, in the same order), else the tensor."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the full ``value``, laid out as ``like`` (every process holds the whole value, so
    each keeps its own slice: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``module`` as a detached fp32 CPU tensor, gathered when sharded (on every process)."""
    return {k: full(v.detach()).float().cpu().clone() for k, v in module.state_dict().items()}


def load_full_state_dict(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full weights (``full_state_dict``'s) into ``module``, sharded or not."""
    local = module.state_dict()
    module.load_state_dict({k: shard_like(v, local[k]) if k in local and is_sharded(local[k]) else v
                            for k, v in weights.items()}, strict=True)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered (on every process): the one-process layout,
    parameters numbered in the optimizer's order."""
    state = optimizer.state_dict()
    return {"state": {i: {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a ``full_optimizer_state`` (or a one-process state dict): each moment is sliced like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sliced = {}
    for index, per_param in state["state"].items():
        param = params[int(index)]
        sliced[index] = {k: shard_like(v, param) if is_sharded(param) and torch.is_tensor(v)
                         and v.shape == param.shape else v for k, v in per_param.items()}
    optimizer.load_state_dict({"state": sliced, "param_groups": state["param_groups"]})
