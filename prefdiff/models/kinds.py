"""What kind of pipeline a loaded model is (SD 1.5-shaped or SDXL-shaped), from its components' configs."""

from __future__ import annotations


def config_get(config, key, default=None):
    """``config[key]`` for a dict or an attribute config (diffusers' FrozenDict, transformers' configs)."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def is_sdxl(pipe) -> bool:
    """An SDXL pipeline: two text encoders and a UNet conditioned on pooled text + time ids."""
    unet = getattr(pipe.unet, "module", pipe.unet)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return True
    return config_get(unet.config, "addition_embed_type") == "text_time"
