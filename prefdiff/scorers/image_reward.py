"""ImageReward (Xu et al. 2023) on transformers: BLIP ViT-L + BERT with cross-attention + MLP head.

``r = (MLP(text_encoder(ids, cross-attention to the ViT tokens).last_hidden_state[:, 0]) - mean) / std`` with
the published ``mean = 0.16717362830052426`` and ``std = 1.0333394966054072`` (``ImageReward/ImageReward.py``).

* Vision: ``BlipVisionModel`` (ViT-L/16 @ 224: width 1024, 24 layers, 16 heads, LayerNorm eps 1e-6, exact GELU).
* Text: ``BlipTextModel(add_pooling_layer=False)`` = BLIP's ``med.py`` BERT-base (vocab 30524, 12 x 768) with
  cross-attention to the 1024-wide image tokens; the image attention mask is all ones. The first token stays
  ``[CLS]`` (ImageReward does not swap in ``[ENC]``).
* Head: ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` linear layers with dropout only (eval mode: affine), fp32.
* Text: ``bert-base-uncased`` tokenizer plus ``[DEC]`` (bos) and ``[ENC]`` specials (as BLIP's
  ``init_tokenizer``), ``padding="max_length", truncation=True, max_length=35``.
* Images: the OpenAI CLIP 224 pipeline (bicubic shortest side 224, center crop, /255, OpenAI mean/std).

Sources (``source=``): a directory written by ``scripts/convert_imagereward.py`` (``config.json`` with
``"model_type": "image_reward"`` + ``model.safetensors`` [+ tokenizer]), the original ``ImageReward.pt``
(converted in memory by ``convert_imagereward_state_dict``; optional ``med_config=`` json), or a hub repo id
holding ``ImageReward.pt`` and ``med_config.json`` (default ``THUDM/ImageReward``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from prefdiff.scorers.base import (MLPHead, Requirement, Scorer, clip_image_processor, clip_pixel_values,
                                   hub_cached_file, looks_like_path)
from prefdiff.scorers.convert import (ConversionReport, convert_imagereward_state_dict, load_checkpoint_file,
                                      load_strict, unwrap_state_dict)

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
DEFAULT_IMAGEREWARD = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_BERT_TOKENIZER = "bert-base-uncased"
MODEL_TYPE = "image_reward"


def blip_vit_large_config(image_size: int = 224) -> Any:
    """BLIP ``vit='large'``: ViT-L/16, 24 layers, width 1024, 16 heads, MLP 4096, LayerNorm eps 1e-6."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=image_size, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")


def blip_text_config(med_config: dict | None = None, encoder_width: int = 1024) -> Any:
    """BLIP's ``med_config.json`` (BERT-base + cross-attention) as a ``BlipTextConfig``; ``encoder_width`` is
    overridden by the vision width, as BLIP does."""
    from transformers import BlipTextConfig

    med = dict(med_config or {})
    return BlipTextConfig(
        vocab_size=med.get("vocab_size", 30524), hidden_size=med.get("hidden_size", 768),
        intermediate_size=med.get("intermediate_size", 3072), num_hidden_layers=med.get("num_hidden_layers", 12),
        num_attention_heads=med.get("num_attention_heads", 12),
        max_position_embeddings=med.get("max_position_embeddings", 512), hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), encoder_hidden_size=encoder_width,
        pad_token_id=med.get("pad_token_id", 0), is_decoder=True,  # is_decoder=True builds the cross-attention
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.0))


class ImageRewardModel(nn.Module):
    """``vision_model`` (BlipVisionModel) + ``text_encoder`` (BlipTextModel) + ``mlp`` (MLPHead) + mean/std."""

    def __init__(self, vision_config: Any, text_config: Any, mean: float = IMAGEREWARD_MEAN,
                 std: float = IMAGEREWARD_STD) -> None:
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError(f"text encoder_hidden_size {text_config.encoder_hidden_size} != vision width "
                             f"{vision_config.hidden_size}")
        self.vision_config, self.text_config = vision_config, text_config
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = MLPHead(text_config.hidden_size)
        self.mean, self.std = float(mean), float(std)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor) -> torch.Tensor:
        """The ``[CLS]`` hidden state of the text encoder cross-attending to the image tokens (fp32)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.text_features(input_ids, attention_mask, pixel_values)
        return ((self.mlp(feats) - self.mean) / self.std).squeeze(-1)

    # ---- persistence (config.json + model.safetensors)
    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, "vision_config": self.vision_config.to_dict(),
                  "text_config": self.text_config.to_dict(), "mean": self.mean, "std": self.std, **(extra or {})}
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageRewardModel":
        from safetensors.torch import load_file
        from transformers import BlipTextConfig, BlipVisionConfig

        path = Path(directory)
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path}/config.json: model_type {config.get('model_type')!r}, expected {MODEL_TYPE!r} "
                             "(write it with scripts/convert_imagereward.py)")
        model = cls(BlipVisionConfig.from_dict(config["vision_config"]),
                    BlipTextConfig.from_dict(config["text_config"]), config["mean"], config["std"])
        load_strict(model, load_file(str(path / "model.safetensors")))
        return model.eval()


def load_imagereward_checkpoint(path: str | os.PathLike, *, med_config: dict | str | None = None,
                                vision_config: Any = None, text_config: Any = None,
                                extra_unused: tuple[str, ...] = ()) -> tuple[ImageRewardModel, ConversionReport]:
    """Build an ``ImageRewardModel`` from the original ``ImageReward.pt`` with strict key accounting."""
    if isinstance(med_config, (str, os.PathLike)):
        med_config = json.loads(Path(med_config).read_text())
    vision_config = vision_config or blip_vit_large_config()
    text_config = text_config or blip_text_config(med_config, encoder_width=vision_config.hidden_size)
    model = ImageRewardModel(vision_config, text_config)
    sd = unwrap_state_dict(load_checkpoint_file(path))
    converted, report = convert_imagereward_state_dict(sd, model.state_dict(), extra_unused=extra_unused,
                                                       source=str(path))
    load_strict(model, converted)
    return model.eval(), report


def blip_tokenizer(source: str, **kw: Any) -> Any:
    """BLIP's ``init_tokenizer``: BERT tokenizer + ``[DEC]`` bos + ``[ENC]`` (no-ops when already present)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, **kw)
    return add_blip_special_tokens(tok)


def add_blip_special_tokens(tok: Any) -> Any:
    vocab = tok.get_vocab()
    if "[DEC]" not in vocab:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in vocab:
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _has_tokenizer(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "vocab.txt"))


class ImageRewardScorer(Scorer):
    name = "image_reward"

    def __init__(self, source: str = DEFAULT_IMAGEREWARD, *, tokenizer: str = DEFAULT_BERT_TOKENIZER,
                 med_config: str | None = None, max_length: int = 35, **kw: Any) -> None:
        super().__init__(**kw)
        self.source = str(source)
        self.tokenizer_source = str(tokenizer)
        self.med_config = med_config
        self.max_length = max_length
        self.model: ImageRewardModel | None = None
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.conversion: dict | None = None

    def _source_kind(self) -> str:
        if looks_like_path(self.source):
            return "dir" if Path(os.path.expanduser(self.source)).is_dir() else "file"
        return "hub"

    def _tokenizer_from_source_dir(self) -> bool:
        return self._source_kind() == "dir" and _has_tokenizer(Path(os.path.expanduser(self.source)))

    def requirements(self) -> list[Requirement]:
        hint = "or convert ImageReward.pt once with scripts/convert_imagereward.py and pass source=<output dir>"
        kind = self._source_kind()
        if kind == "hub":
            reqs = [Requirement("ImageReward checkpoint", "hub_file", self.source, "source", IMAGEREWARD_FILE, hint),
                    Requirement("ImageReward med_config", "hub_file", self.source, "source", MED_CONFIG_FILE, hint)]
        elif kind == "dir":
            reqs = [Requirement("converted ImageReward dir", "model", self.source, "source", None, hint)]
        else:
            reqs = [Requirement("ImageReward checkpoint", "file", self.source, "source", None, hint)]
        if self.med_config:
            reqs.append(Requirement("ImageReward med_config", "file", self.med_config, "med_config"))
        if not self._tokenizer_from_source_dir():
            reqs.append(Requirement("BERT tokenizer", "tokenizer", self.tokenizer_source, "tokenizer"))
        return reqs

    def _load(self) -> None:
        kind = self._source_kind()
        kw = self._from_pretrained_kwargs()
        if kind == "dir":
            model = ImageRewardModel.from_pretrained(os.path.expanduser(self.source))
        else:
            med = self.med_config
            if kind == "hub":
                from huggingface_hub import hf_hub_download

                ckpt = hf_hub_download(self.source, IMAGEREWARD_FILE, **kw)
                med = med or (hub_cached_file(self.source, MED_CONFIG_FILE)
                              or hf_hub_download(self.source, MED_CONFIG_FILE, **kw))
            else:
                ckpt = os.path.expanduser(self.source)
            model, report = load_imagereward_checkpoint(ckpt, med_config=med)
            self.conversion = report.to_dict()
        tok_src = os.path.expanduser(self.source) if self._tokenizer_from_source_dir() else self.tokenizer_source
        self._setup(model, blip_tokenizer(tok_src, **kw), None)

    def _setup(self, model: ImageRewardModel, tokenizer: Any, image_processor: Any) -> None:
        model = model.eval().to(self.device)
        dtype = self.backbone_dtype
        model.vision_model.to(dtype)
        model.text_encoder.to(dtype)
        model.mlp.float()
        self.model, self.tokenizer = model, tokenizer
        self.image_processor = image_processor or clip_image_processor(model.vision_config.image_size)

    @classmethod
    def from_components(cls, model: ImageRewardModel, tokenizer: Any, image_processor: Any = None,
                        **kw: Any) -> "ImageRewardScorer":
        scorer = cls(**kw)
        scorer.source = scorer.tokenizer_source = "from_components"
        scorer._setup(model, tokenizer, image_processor)
        return scorer._mark_loaded()

    def text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        dtype = next(self.model.vision_model.parameters()).dtype
        pixels = clip_pixel_values(self.image_processor, images).to(self.device, dtype)
        text = {k: v.to(self.device) for k, v in self.text_inputs(prompts).items()}
        return self.model(text["input_ids"], text["attention_mask"], pixels)

    def params(self) -> dict[str, Any]:
        mean = self.model.mean if self.model is not None else IMAGEREWARD_MEAN
        std = self.model.std if self.model is not None else IMAGEREWARD_STD
        return {"source": self.source, "tokenizer": self.tokenizer_source, "max_length": self.max_length,
                "mean": mean, "std": std}
