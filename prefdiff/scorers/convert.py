"""Key-remapping converters from the original checkpoints to transformers modules, with strict key accounting.

Every source key is either mapped onto a key of the target model, or matched by an explicit allow-list of keys
known to be unused by the score (BLIP momentum encoders, queues and the caption decoder; ImageReward's
projection/ITM heads; open_clip's ``attn_mask`` buffer), or it is an error. Every target key must be produced
(one exception: BLIP's ``itm_head`` may be zero-filled for the ITC score, which never reads it, and only when
asked). Shapes must match. The result then loads with ``load_state_dict(strict=True)`` with zero missing and
zero unexpected keys. Inverse maps (``*_to_original``) rebuild the original layout; the tests use them to
write tiny models in the original format and convert them back.

Maps (the same as transformers' ``convert_blip_original_pytorch_to_hf.py``):

* BLIP ViT (``visual_encoder.``, timm style) -> ``BlipVisionModel``: ``cls_token`` -> ``embeddings.class_embedding``,
  ``pos_embed`` -> ``embeddings.position_embedding``, ``patch_embed.proj`` -> ``embeddings.patch_embedding``,
  ``blocks.N.`` -> ``encoder.layers.N.``, ``norm1/norm2`` -> ``layer_norm1/layer_norm2``, ``attn.qkv`` ->
  ``self_attn.qkv``, ``attn.proj`` -> ``self_attn.projection``, ``mlp.fc1/fc2`` unchanged, ``norm`` ->
  ``post_layernorm``. BERT text encoder keys are unchanged (``embeddings.position_ids`` dropped).
* ImageReward (``ImageReward.pt``): strip ``blip.``; ``visual_encoder.`` -> ``vision_model.`` (ViT map),
  ``text_encoder.`` unchanged, ``mlp.layers.{0,2,4,6,7}`` -> the reward head.
* open_clip CLIP (HPSv2) -> ``CLIPModel``: ``visual.conv1`` -> ``vision_model.embeddings.patch_embedding``,
  ``visual.class_embedding`` -> ``...class_embedding``, ``visual.positional_embedding`` ->
  ``...position_embedding.weight``, ``visual.ln_pre`` -> ``vision_model.pre_layrnorm``, ``visual.ln_post`` ->
  ``vision_model.post_layernorm``, ``visual.proj`` -> ``visual_projection.weight`` (transposed),
  ``token_embedding`` -> ``text_model.embeddings.token_embedding``, ``positional_embedding`` ->
  ``text_model.embeddings.position_embedding.weight``, ``ln_final`` -> ``text_model.final_layer_norm``,
  ``text_projection`` -> ``text_projection.weight`` (transposed), ``logit_scale`` unchanged; per residual block
  ``ln_1/ln_2`` -> ``layer_norm1/2``, ``attn.in_proj_{weight,bias}`` split in three -> ``self_attn.{q,k,v}_proj``,
  ``attn.out_proj`` -> ``self_attn.out_proj``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


class StateDictAccountingError(ValueError):
    """Source keys that map nowhere, target keys nobody provides, or shape mismatches."""

    def __init__(self, what: str, unknown: Iterable[str] = (), missing: Iterable[str] = (),
                 mismatched: Iterable[str] = ()) -> None:
        self.unknown, self.missing, self.mismatched = sorted(unknown), sorted(missing), sorted(mismatched)
        parts = []
        if self.unknown:
            parts.append(f"{len(self.unknown)} unknown source keys (neither mapped nor in the allow-list of unused "
                         f"keys): {', '.join(self.unknown)}")
        if self.missing:
            parts.append(f"{len(self.missing)} target keys missing from the source: {', '.join(self.missing)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatches: {', '.join(self.mismatched)}")
        super().__init__(f"{what}: " + "; ".join(parts))


@dataclass
class ConversionReport:
    source: str
    source_keys: int
    mapped: int
    dropped: list[str] = field(default_factory=list)  # allow-listed, known unused
    filled: list[str] = field(default_factory=list)  # target keys zero-filled (explicitly allowed only)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_keys": self.source_keys, "mapped": self.mapped,
                "dropped": self.dropped, "filled": self.filled}


# ------------------------------------------------------------------------------------------------ loading


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` (or safetensors); refuses pickles that need arbitrary code."""
    path = os.fspath(os.path.expanduser(path))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {err}). "
                         "Only plain tensor checkpoints are accepted; re-save its state dict on a trusted machine "
                         "with torch.save(state_dict)") from err


def unwrap_state_dict(obj: Any, wrappers: Iterable[str] = ("state_dict", "model", "module")) -> dict[str, Tensor]:
    """The tensor mapping inside a checkpoint: ``obj`` itself, or ``obj[w]`` for a wrapper key; a common
    ``module.`` (DDP) prefix is stripped."""
    wrappers = tuple(wrappers)
    while isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        for w in wrappers:
            if w in obj and isinstance(obj[w], Mapping):
                obj = obj[w]
                break
        else:
            non_tensor = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
            raise ValueError(f"checkpoint is not a state dict and has none of the wrapper keys {wrappers}; "
                             f"non-tensor entries: {non_tensor[:20]}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------------ accounting


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def _apply_rules(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", repl, key)
    return None


def account(what: str, source_keys: int, mapped: dict[str, Tensor], unknown: list[str], dropped: list[str],
            expected: Mapping[str, Tensor], fillable: Iterable[str] = (),
            source: str = "") -> tuple[dict, ConversionReport]:
    """Check ``mapped`` against the target's ``expected`` state dict; zero-fill allowed ``fillable`` keys."""
    extra = sorted(set(mapped) - set(expected))
    unknown = sorted(set(unknown) | {f"{k} (mapped, but the target has no such key)" for k in extra})
    missing = sorted(set(expected) - set(mapped))
    filled = [k for k in missing if _matches(k, fillable)]
    missing = [k for k in missing if k not in filled]
    mismatched = [f"{k}: source {tuple(v.shape)} vs target {tuple(expected[k].shape)}"
                  for k, v in mapped.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if unknown or missing or mismatched:
        raise StateDictAccountingError(what, unknown, missing, mismatched)
    out = {k: mapped[k] for k in expected if k in mapped}
    for k in filled:
        out[k] = torch.zeros_like(expected[k])
    return out, ConversionReport(source, source_keys, len(mapped), sorted(dropped), filled)


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """``load_state_dict(strict=True)``, asserting zero missing and zero unexpected keys."""
    result = model.load_state_dict(state_dict, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; belt and braces
        raise StateDictAccountingError(type(model).__name__, result.unexpected_keys, result.missing_keys)


# ------------------------------------------------------------------------------------------------ BLIP ViT

_VIT_RULES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]
_VIT_INVERSE = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
]


def _map_blip_common(key: str) -> str | None:
    """BLIP (pretrain) layout key without prefix -> BlipForImageTextRetrieval-style key, or None."""
    if key.startswith("visual_encoder."):
        inner = _apply_rules(key[len("visual_encoder."):], _VIT_RULES)
        return None if inner is None else "vision_model." + inner
    if key.startswith("text_encoder."):
        return key
    return None


def _inverse_blip_common(key: str) -> str | None:
    if key.startswith("vision_model."):
        inner = _apply_rules(key[len("vision_model."):], _VIT_INVERSE)
        return None if inner is None else "visual_encoder." + inner
    if key.startswith("text_encoder."):
        return key
    return None


# ------------------------------------------------------------------------------------------------ ImageReward

IMAGEREWARD_UNUSED = (
    r"blip\.itm_head\.(weight|bias)",  # not part of the ImageReward model
    r"blip\.vision_proj\.(weight|bias)",  # BLIP ITC projections: unused by the reward
    r"blip\.text_proj\.(weight|bias)",
    r"blip\.text_encoder\.embeddings\.position_ids",  # a buffer, recomputed
)


def convert_imagereward_state_dict(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], *,
                                   extra_unused: Iterable[str] = (), source: str = "") -> tuple[dict, ConversionReport]:
    """``ImageReward.pt`` -> ``ImageRewardModel`` state dict (``vision_model.*``, ``text_encoder.*``, ``mlp.*``)."""
    unused = (*IMAGEREWARD_UNUSED, *extra_unused)
    mapped, unknown, dropped = {}, [], []
    for key, value in sd.items():
        if _matches(key, unused):
            dropped.append(key)
            continue
        target = None
        if key.startswith("blip."):
            target = _map_blip_common(key[len("blip."):])
        elif re.fullmatch(r"mlp\.layers\.(0|2|4|6|7)\.(weight|bias)", key):
            target = key
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    return account("ImageReward checkpoint", len(sd), mapped, unknown, dropped, expected, source=source)


def imagereward_to_original(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse map: ``ImageRewardModel`` state dict -> the ``ImageReward.pt`` layout."""
    out = {}
    for key, value in hf_sd.items():
        if key.startswith("mlp."):
            out[key] = value
            continue
        orig = _inverse_blip_common(key)
        if orig is None:
            raise KeyError(f"no original-layout name for {key}")
        out["blip." + orig] = value
    return out


# ------------------------------------------------------------------------------------------------ BLIP pretrain

BLIP_PRETRAIN_UNUSED = (
    r"visual_encoder_m\..+", r"text_encoder_m\..+", r"vision_proj_m\..+", r"text_proj_m\..+",  # momentum encoders
    r"text_decoder\..+",  # captioning decoder (LM loss)
    r"temp", r"image_queue", r"text_queue", r"idx_queue", r"queue_ptr", r"ptr_queue",  # ITC temperature + queues
    r"text_encoder\.embeddings\.position_ids",
)
BLIP_ITC_FILLABLE = (r"itm_head\.(weight|bias)",)


def convert_blip_pretrain_state_dict(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], *,
                                     allow_missing_itm_head: bool = True, extra_unused: Iterable[str] = (),
                                     source: str = "") -> tuple[dict, ConversionReport]:
    """BLIP pre-train checkpoint (``model_large.pth``'s ``model``) -> ``BlipForImageTextRetrieval`` state dict.

    ``itm_head`` is mapped when present (the pre-train checkpoint has one); when absent it is zero-filled only if
    ``allow_missing_itm_head`` (the ITC score never reads it) and the report lists it under ``filled``.
    """
    unused = (*BLIP_PRETRAIN_UNUSED, *extra_unused)
    mapped, unknown, dropped = {}, [], []
    for key, value in sd.items():
        if _matches(key, unused):
            dropped.append(key)
            continue
        if re.fullmatch(r"(vision_proj|text_proj|itm_head)\.(weight|bias)", key):
            target = key
        else:
            target = _map_blip_common(key)
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    return account("BLIP pre-train checkpoint", len(sd), mapped, unknown, dropped, expected,
                   fillable=BLIP_ITC_FILLABLE if allow_missing_itm_head else (), source=source)


def blip_retrieval_to_original(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse map: ``BlipForImageTextRetrieval`` state dict -> the BLIP pre-train layout (no momentum/queues)."""
    out = {}
    for key, value in hf_sd.items():
        if re.fullmatch(r"(vision_proj|text_proj|itm_head)\.(weight|bias)", key):
            out[key] = value
            continue
        orig = _inverse_blip_common(key)
        if orig is None:
            raise KeyError(f"no original-layout name for {key}")
        out[orig] = value
    return out


# ------------------------------------------------------------------------------------------------ open_clip

OPEN_CLIP_UNUSED = (r"attn_mask", r"text\.attn_mask", r"visual\.attn_mask")

_OC_BLOCK = [
    (r"ln_1\.(weight|bias)", r"layer_norm1.\1"),
    (r"ln_2\.(weight|bias)", r"layer_norm2.\1"),
    (r"attn\.out_proj\.(weight|bias)", r"self_attn.out_proj.\1"),
    (r"mlp\.c_fc\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.c_proj\.(weight|bias)", r"mlp.fc2.\1"),
]
_OC_TOP = [
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"logit_scale", "logit_scale"),
]
_OC_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_OC_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
              ("transformer.resblocks.", "text_model.encoder.layers."))


def convert_open_clip_state_dict(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], *,
                                 extra_unused: Iterable[str] = (), source: str = "") -> tuple[dict, ConversionReport]:
    """open_clip ``CLIP`` (ViT towers, e.g. HPSv2's ViT-H-14) state dict -> transformers ``CLIPModel`` state dict."""
    unused = (*OPEN_CLIP_UNUSED, *extra_unused)
    mapped, unknown, dropped = {}, [], []
    for key, value in sd.items():
        if _matches(key, unused):
            dropped.append(key)
            continue
        if key in _OC_TRANSPOSED:
            mapped[_OC_TRANSPOSED[key]] = value.t().contiguous()
            continue
        target = _apply_rules(key, _OC_TOP)
        if target is None:
            for src_prefix, dst_prefix in _OC_TOWERS:
                m = re.fullmatch(re.escape(src_prefix) + r"(\d+)\.(.+)", key)
                if not m:
                    continue
                layer, rest = m.group(1), m.group(2)
                base = f"{dst_prefix}{layer}."
                ip = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
                if ip:
                    if value.shape[0] % 3:
                        unknown.append(f"{key} (in_proj first dim {value.shape[0]} not divisible by 3)")
                        target = ""
                        break
                    for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                        mapped[f"{base}self_attn.{name}.{ip.group(1)}"] = chunk.contiguous()
                    target = ""
                else:
                    inner = _apply_rules(rest, _OC_BLOCK)
                    target = None if inner is None else base + inner
                break
        if target is None:
            unknown.append(key)
        elif target:
            mapped[target] = value
    return account("open_clip checkpoint", len(sd), mapped, unknown, dropped, expected, source=source)


def open_clip_to_original(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse map: transformers ``CLIPModel`` state dict -> open_clip ``CLIP`` layout (q/k/v re-fused, transposed)."""
    inv_top = {}
    for pattern, repl in _OC_TOP:
        for suffix in ("weight", "bias"):
            src = re.sub(r"\(weight\|bias\)", suffix, pattern).replace("\\", "")
            dst = repl.replace(r"\1", suffix)
            inv_top[dst] = src
    inv_block = {}
    for pattern, repl in _OC_BLOCK:
        for suffix in ("weight", "bias"):
            inv_block[repl.replace(r"\1", suffix)] = re.sub(r"\(weight\|bias\)", suffix, pattern).replace("\\", "")
    inv_transposed = {v: k for k, v in _OC_TRANSPOSED.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in hf_sd.items():
        if key in inv_transposed:
            out[inv_transposed[key]] = value.t().contiguous()
            continue
        if key in inv_top:
            out[inv_top[key]] = value
            continue
        for src_prefix, dst_prefix in _OC_TOWERS:
            m = re.fullmatch(re.escape(dst_prefix) + r"(\d+)\.(.+)", key)
            if not m:
                continue
            base = f"{src_prefix}{m.group(1)}."
            rest = m.group(2)
            p = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if p:
                qkv.setdefault((base, p.group(2)), {})[p.group(1)] = value
            elif rest in inv_block:
                out[base + inv_block[rest]] = value
            else:
                raise KeyError(f"no open_clip name for {key}")
            break
        else:
            raise KeyError(f"no open_clip name for {key}")
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ------------------------------------------------------------------------------------------------ script helpers


def write_json(path: str | os.PathLike, obj: dict) -> None:
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    from pathlib import Path

    from prefdiff.data.atomic import sha256_file

    return sha256_file(Path(os.path.expanduser(path)))


def save_tokenizer(load: Any, source: str, out: str | os.PathLike, offline: bool) -> str | None:
    """Bundle a tokenizer with converted weights so the directory is self-contained. Returns ``source``, or None
    (with a warning on stderr) when it is not available here; the scorer then needs ``tokenizer=`` at load."""
    import sys

    try:
        tok = load(source, local_files_only=offline)
    except Exception as err:  # not cached / no network
        print(f"warning: tokenizer {source!r} not available ({type(err).__name__}: {err}); the output has no "
              "tokenizer, pass tokenizer=<dir or hub id> to the scorer", file=sys.stderr)
        return None
    tok.save_pretrained(os.fspath(out))
    return source
