"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

Layout of ``checkpoint_dir`` (replaced atomically on every save):
- ``state.safetensors``: ``weights.<key>`` (the trainable weights: LoRA or the full UNet),
  ``optim.<param index>.<state key>``, ``precomputed.<name>`` (tensors a method computed before training,
  such as D3PO's reference log-probs [N, T])
- ``state.json``: fingerprint of the inputs, optimizer step, optimizer param_groups, curve so far

A checkpoint whose fingerprint does not match the current inputs is ignored (and later overwritten),
so changing a param or a dataset never resumes a stale run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefdiff.data.atomic import atomic_dir

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


@dataclass
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict
    precomputed: dict[str, torch.Tensor]
    curve: list[dict[str, float]]


def _with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}


def _under(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def save_checkpoint(
    checkpoint_dir: Path, *, fingerprint: str, step: int, weights: dict[str, torch.Tensor],
    optimizer_state: dict, precomputed: dict[str, torch.Tensor], curve: list[dict[str, float]],
) -> None:
    tensors = _with_prefix("weights", weights) | _with_prefix("precomputed", precomputed)
    scalars: dict[str, dict[str, float]] = {}
    for index, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"fingerprint": fingerprint, "step": step, "param_groups": optimizer_state["param_groups"],
            "optim_scalars": scalars, "curve": curve}
    with atomic_dir(checkpoint_dir) as tmp:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta))


def load_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint for these inputs, or None when there is none or it belongs to other inputs."""
    meta_path, tensor_path = checkpoint_dir / STATE_JSON, checkpoint_dir / STATE_TENSORS
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        return None
    tensors = load_file(str(tensor_path))
    state: dict[int, dict] = {}
    for key, value in _under("optim", tensors).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["optim_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer = {"state": state, "param_groups": meta["param_groups"]}
    return Checkpoint(step=meta["step"], weights=_under("weights", tensors), optimizer=optimizer,
                      precomputed=_under("precomputed", tensors), curve=meta["curve"])
