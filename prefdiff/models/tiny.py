"""The built-in offline base models: tiny Stable-Diffusion-shaped pipelines built deterministically.

No weights can be downloaded on the machines this project must run on, so the default params use this
pipeline. It has every component of SD 1.5 (CLIP tokenizer + text encoder, UNet2DConditionModel with
cross-attention, AutoencoderKL, DDIM scheduler with the SD 1.5 config) at toy size: 64x64 images,
4x8x8 latents (SD's x8 VAE factor), ~0.8 M UNet parameters. Weights are random but seeded: the same torch version builds
the same model bit for bit, and ``model_fingerprint`` records which one made a dataset.

The tokenizer vocabulary is generated here: CLIP's byte-level alphabet (256 symbols, each also with the
end-of-word marker ``</w>``) plus the two special tokens, and no merges — every word is spelled out in
characters, which a 77-token context holds easily for the short prompts the toy uses.

``tiny-sdxl`` is the same idea for SDXL (``StableDiffusionXLPipeline``): two CLIP text encoders (a
``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` whose projected pooled output is SDXL's
``text_embeds``; both use the generated tokenizer), a UNet with ``addition_embed_type="text_time"``
conditioned on the concatenated penultimate hidden states (32 + 32 = 64 wide), the pooled embedding and
the six size/crop time ids, the same tiny x8 VAE (with SDXL's latent scaling factor) and the same DDIM
schedule (SDXL base's schedule has SD 1.5's betas, offset and spacing). ``force_zeros_for_empty_prompt``
is on, as in SDXL base.
"""

from __future__ import annotations

import torch


# SD 1.5's scheduler config (its scheduler_config.json): scaled-linear betas, "leading" spacing with
# steps_offset=1, so 20 DDIM steps visit t = 951, 901, ..., 1.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

# SDXL base's scheduler (an EulerDiscreteScheduler whose config has the same betas, "leading" spacing and
# steps_offset=1); prefdiff samples it with DDIM.
SDXL_SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG)

_TINY_SEED = 20240607
_TEXT_DIM = 32
_SDXL_SEED = 20240901
_SDXL_TEXT_DIMS = (32, 32)  # CLIPTextModel, CLIPTextModelWithProjection hidden sizes
_SDXL_POOLED_DIM = 32  # projection_dim of the second encoder (SDXL base: 1280)
_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim (SDXL base: 256)
SDXL_VAE_SCALING_FACTOR = 0.13025


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map (the base alphabet of the BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout without merges: alphabet, alphabet + "</w>", then the special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def build_tiny_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=max_length)


def _tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_text_config(tokenizer, hidden_size: int, **extra):
    """A 2-layer CLIP text encoder config over ``tokenizer``'s vocabulary and context length."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_pipeline():
    """Build the built-in ``tiny-sd`` StableDiffusionPipeline (fp32, CPU), identical on every call."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    # fork_rng: seeding for the weights must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        torch.manual_seed(_TINY_SEED + 1)
        vae = _tiny_vae()
        torch.manual_seed(_TINY_SEED + 2)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, _TEXT_DIM))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline():
    """Build the built-in ``tiny-sdxl`` StableDiffusionXLPipeline (fp32, CPU), identical on every call."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SDXL_SEED)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            # SDXL's layout: no attention in the highest-resolution block
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=sum(_SDXL_TEXT_DIMS),
            attention_head_dim=8,
            transformer_layers_per_block=1,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_POOLED_DIM,
            norm_num_groups=16,
        )
        torch.manual_seed(_SDXL_SEED + 1)
        vae = _tiny_vae(SDXL_VAE_SCALING_FACTOR)
        torch.manual_seed(_SDXL_SEED + 2)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, _SDXL_TEXT_DIMS[0]))
        torch.manual_seed(_SDXL_SEED + 3)
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(tokenizer, _SDXL_TEXT_DIMS[1], projection_dim=_SDXL_POOLED_DIM)
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
