"""LoRA on the UNet attention projections via peft, saved and loaded in the diffusers format.

The D3PO paper (appendix E) trains LoRA on the attention q/k/v projections; the official code also
adapts the output projection, as the issue asks: targets ``to_q, to_k, to_v, to_out.0``. Initialisation
is peft's "gaussian" (A ~ N(0, 1/r), B = 0), the same as the diffusers-0.17 LoRAAttnProcessor the official
code used, so at initialisation the adapted UNet computes exactly the base UNet.

The reference policy of D3PO and Diffusion-DPO is this same UNet with its adapters disabled
(``adapters_disabled``): no second UNet in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from prefdiff.paths import LORA_WEIGHT_NAME

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"


def add_lora(unet, *, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Attach a fresh trainable adapter; returns its parameters (fp32, requires_grad=True)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    unet.add_adapter(config, adapter_name=ADAPTER)
    return _trainable_lora_params(unet)


def load_lora_for_training(unet, lora_dir: Path) -> list[torch.nn.Parameter]:
    """Attach the adapter saved in ``lora_dir`` (diffusers format) as the trainable adapter."""
    _check_lora_dir(lora_dir)
    unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER)
    unet.set_adapter(ADAPTER)
    return _trainable_lora_params(unet)


def _trainable_lora_params(unet) -> list[torch.nn.Parameter]:
    # Base weights stay frozen (and may be half precision); LoRA weights train in fp32, as the
    # official code does, so small updates are not lost to fp16 rounding.
    params = []
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
        else:
            param.requires_grad_(False)
    if not params:
        raise RuntimeError("no LoRA parameters found on the UNet after attaching the adapter")
    return params


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """Run the base UNet (the reference policy) under no_grad; adapters are re-enabled on exit.

    Re-enabling matters: peft's disable also stops gradients to the LoRA weights, so a backward pass
    after a reference forward would otherwise silently train nothing.
    """
    unet.disable_adapters()
    try:
        with torch.no_grad():
            yield
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (detached CPU fp32 copies), for checkpoints."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(unet).items()}


def set_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights in peft naming (from ``lora_state_dict``) into the attached adapter."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA state has keys the UNet adapter does not: {unexpected[:5]}")


def save_lora(unet, out_dir: Path) -> Path:
    """Write the adapter in the diffusers format (``pipe.load_lora_weights(out_dir)`` loads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    )
    config = unet.peft_config[ADAPTER]
    metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=metadata
    )
    canonicalize_safetensors(out_dir / LORA_WEIGHT_NAME)
    (out_dir / "lora_info.json").write_text(json.dumps({**metadata, "format": "diffusers"}, indent=2))
    return out_dir / LORA_WEIGHT_NAME


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a safetensors header as sorted JSON so equal tensors give equal bytes in every process.

    The header's metadata entries come out in a per-process hash order, so the same adapter saved
    twice had different bytes: DVC then saw a changed output and the registry a new fingerprint.
    Format: u64 little-endian header length, JSON header (padded with spaces to 8 bytes), data; data
    offsets are relative to the end of the header, so only the header is rewritten.
    """
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = Path(path).with_name(Path(path).name + ".canonical")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    tmp.replace(path)


def load_lora_weights(pipe, lora_dir: Path) -> None:
    """Load a diffusers-format LoRA into a pipeline for inference (what users do with our output)."""
    _check_lora_dir(lora_dir)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER)


def _check_lora_dir(lora_dir: Path) -> None:
    if not (Path(lora_dir) / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{lora_dir}: no {LORA_WEIGHT_NAME}; expected a LoRA written by prefdiff's train stage")
