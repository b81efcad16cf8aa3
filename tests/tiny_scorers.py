"""Tiny random-weight models, tokenizers and images for the scorer tests, plus independent reference forwards
of the ORIGINAL layouts (open_clip ViT/text transformer, BLIP's timm-style ViT) computed straight from an
original-format state dict - so the converter tests check the key maps' meaning, not just map∘inverse = id.

Tiny configs of each architecture, checked to build and run on transformers 5.23.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PROMPTS = ["a cat on a mat", "red sky", "the quick brown fox jumps over the lazy dog again and again", "zz top",
           "an owl", "x"]
IMAGE_SIZES = [(40, 40), (48, 64), (64, 48), (37, 53), (33, 32), (32, 32)]  # (h, w); odd ones included


def images(n: int = 6, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Image.Image]:
    """Random RGB images with some structure (smooth gradients + noise) of varied sizes."""
    rng = np.random.default_rng(seed)
    sizes = sizes or IMAGE_SIZES
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 3)) % 256, (yy * (2 * i + 5)) % 256, ((xx + yy) * 7) % 256], axis=-1)
        noise = rng.integers(0, 64, size=(h, w, 3))
        out.append(Image.fromarray(((base + noise) % 256).astype(np.uint8)))
    return out


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to EVERY parameter (LayerNorm weights/biases included) so swapped keys change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


# ------------------------------------------------------------------------------------------------ tokenizers


def clip_tokenizer(directory: Path):
    """CLIPTokenizer over {a..z, a</w>..z</w>, <|startoftext|>, <|endoftext|>} with no merges."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": i + 26 for i, c in enumerate(string.ascii_lowercase)})
    vocab["<|startoftext|>"] = 52
    vocab["<|endoftext|>"] = 53
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def bert_tokenizer(directory: Path):
    """BertTokenizer over a small word-piece vocab + BLIP's [DEC] / [ENC] specials."""
    from transformers import BertTokenizer

    from prefdiff.scorers.image_reward import add_blip_special_tokens

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase), "a", "cat", "on", "mat", "red", "sky", "the", "fox", "owl"]
    words = list(dict.fromkeys(words))
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return add_blip_special_tokens(BertTokenizer(str(directory / "vocab.txt")))


# ------------------------------------------------------------------------------------------------ CLIP


def clip_config(vocab_size: int = 54, projection_dim: int = 16, hidden_act: str = "quick_gelu", image_size: int = 32):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=52, eos_token_id=53, pad_token_id=53,
                hidden_act=hidden_act, projection_dim=projection_dim)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act=hidden_act, projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def clip_model(seed: int = 0, **kw):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(**kw))
    perturb(model, seed + 1)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # exp = 9.97: not the init value, so PickScore's scale is really read
    return model.eval()


def clip_processor(size: int = 32):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ------------------------------------------------------------------------------------------------ BLIP


def blip_config(tokenizer, image_text_hidden_size: int = 16):
    from transformers import BlipConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
                bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=image_text_hidden_size)


def blip_retrieval(tokenizer, seed: int = 0):
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    return perturb(BlipForImageTextRetrieval(blip_config(tokenizer)), seed + 1)


def blip_processor(size: int = 32):
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": size, "width": size})


def imagereward_model(tokenizer, seed: int = 0):
    from prefdiff.scorers.image_reward import ImageRewardModel

    cfg = blip_config(tokenizer)
    torch.manual_seed(seed)
    return perturb(ImageRewardModel(cfg.vision_config, cfg.text_config), seed + 1)


# ------------------------------------------------------------------------------------------------ references


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _attention(x, q, k, v, heads, mask=None):
    b, n, d = x.shape
    hd = d // heads

    def split(t):
        return t.reshape(b, -1, heads, hd).transpose(1, 2)

    att = (split(q) * hd ** -0.5) @ split(k).transpose(-1, -2)
    if mask is not None:
        att = att + mask
    return (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def _open_clip_block(x, sd, p, heads, mask=None, eps=1e-5):
    h = _ln(x, sd, p + "ln_1", eps)
    qkv = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"])
    q, k, v = qkv.chunk(3, dim=-1)
    x = x + F.linear(_attention(h, q, k, v, heads, mask), sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
    h = _ln(x, sd, p + "ln_2", eps)
    return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def open_clip_image_features(sd, pixel_values, layers: int, heads: int):
    """open_clip ``VisionTransformer.forward`` (no patch dropout / attn pool), from the original state dict."""
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre", 1e-5)
    for i in range(layers):
        x = _open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    return _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]


def open_clip_text_features(sd, input_ids, layers: int, heads: int):
    """open_clip ``CLIP.encode_text``: causal mask, pooled at argmax(token id) (the end-of-text token)."""
    n = input_ids.shape[1]
    x = sd["token_embedding.weight"][input_ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(layers):
        x = _open_clip_block(x, sd, f"transformer.resblocks.{i}.", heads, mask)
    x = _ln(x, sd, "ln_final", 1e-5)
    return x[torch.arange(x.shape[0]), input_ids.argmax(dim=-1)] @ sd["text_projection"]


def blip_vit_features(sd, pixel_values, layers: int, heads: int, prefix: str = "visual_encoder.", eps: float = 1e-6):
    """BLIP ``vit.py`` VisionTransformer (timm style) from the original state dict: all tokens after ``norm``."""
    w = sd[prefix + "patch_embed.proj.weight"]
    x = F.conv2d(pixel_values, w, sd[prefix + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[prefix + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[prefix + "pos_embed"]
    for i in range(layers):
        p = f"{prefix}blocks.{i}."
        h = _ln(x, sd, p + "norm1", eps)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(_attention(h, q, k, v, heads), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = _ln(x, sd, p + "norm2", eps)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return _ln(x, sd, prefix + "norm", eps)


# ------------------------------------------------------------------------------------------------ PIL reference

MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def clip_reference_pixels(image: Image.Image, n: int) -> torch.Tensor:
    """The OpenAI/torchvision pipeline by hand with PIL: Resize(n) shortest side bicubic (torchvision's size
    rule ``int(n * long / short)``), CenterCrop(n) (``round((size - n) / 2)``), ToTensor (/255), Normalize."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != n:
        new_long = int(n * long / short)
        image = image.resize((n, new_long) if w <= h else (new_long, n), Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - n) / 2.0)), int(round((w - n) / 2.0))
    image = image.crop((left, top, left + n, top + n))
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy((a - MEAN) / STD).permute(2, 0, 1)


def blip_reference_pixels(image: Image.Image, n: int) -> torch.Tensor:
    """torchvision ``Resize((n, n), bicubic)`` on PIL + ToTensor + Normalize (BLIP's HF retrieval pipeline)."""
    a = np.asarray(image.convert("RGB").resize((n, n), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy((a - MEAN) / STD).permute(2, 0, 1)
