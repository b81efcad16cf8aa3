"""Load what the train stage wrote — a diffusers-format LoRA or a fully fine-tuned UNet — into a pipeline.

The train stage writes either ``pytorch_lora_weights.safetensors`` (LoRA, ``train.finetune: lora``) or a
whole UNet under ``unet/`` (``train.finetune: full``; the layout of the released Diffusion-DPO checkpoints,
``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``). Evaluation, the reward curve and the
served model all go through :func:`trained_weights`, so both kinds work everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefdiff.models import lora

FULL_UNET_DIR = "unet"


def is_full_unet(path: Path) -> bool:
    return (Path(path) / FULL_UNET_DIR / "config.json").is_file()


def apply_trained(pipe, path: Path):
    """Put the trained weights in ``path`` into ``pipe``; returns a function that restores the base."""
    path = Path(path)
    if is_full_unet(path):
        from diffusers import UNet2DConditionModel

        base = pipe.unet
        pipe.unet = UNet2DConditionModel.from_pretrained(path / FULL_UNET_DIR, torch_dtype=base.dtype).to(base.device)
        pipe.unet.eval()

        def restore() -> None:
            pipe.unet = base

        return restore
    lora.load_lora_weights(pipe, path)
    return pipe.unload_lora_weights


@contextmanager
def trained_weights(pipe, path: Path) -> Iterator[None]:
    """``with trained_weights(pipe, dir): ...`` samples with the trained model, then the base again."""
    restore = apply_trained(pipe, path)
    try:
        yield
    finally:
        restore()


__all__ = ["FULL_UNET_DIR", "apply_trained", "is_full_unet", "trained_weights"]
