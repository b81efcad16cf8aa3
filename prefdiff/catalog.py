"""The names of every pluggable part and where each lives: ``name -> "module:attribute"``.

A new model family, scorer or training method is one module plus one line here. The table imports nothing,
so ``prefdiff.config`` validates names (and errors list what is allowed) without importing torch, diffusers or
transformers; ``resolve`` imports the named module only when the part is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN_PREFIX = "builtin:"

# model.source = builtin:<name>: pipelines prefdiff builds itself (no download).
BUILTIN_MODELS: dict[str, str] = {
    "tiny-sd": "prefdiff.models.tiny:build_tiny_pipeline",
    "tiny-sdxl": "prefdiff.models.tiny:build_tiny_sdxl_pipeline",
}


# train.method = <name>: a ``prefdiff.training.fit.Method`` subclass (its options: train.<name>, see config).
TRAIN_METHODS: dict[str, str] = {
    "d3po": "prefdiff.training.methods.d3po:D3PO",
    "diffusion_dpo": "prefdiff.training.methods.diffusion_dpo:DiffusionDPO",
    "sft": "prefdiff.training.methods.sft:SFT",
    "reward_weighted": "prefdiff.training.methods.reward_weighted:RewardWeighted",
    "ddpo": "prefdiff.training.methods.ddpo:DDPO",
}


def resolve(spec: str) -> Any:
    """The object a ``"module:attribute"`` entry names (imports the module)."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = ["BUILTIN_MODELS", "BUILTIN_PREFIX", "TRAIN_METHODS", "resolve"]
