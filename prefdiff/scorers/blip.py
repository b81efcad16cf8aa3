"""BLIP image-text scores: ITC cosine (the report's "BLIP score") and ITM probability.

``blip_itc`` (registry alias ``blip``) - **the "BLIP score" the report uses**: ImageReward's toolkit
``RM.load_score("BLIP")`` (``ImageReward/models/BLIPScore.py``), the most likely definition behind the D3PO
paper's BLIP numbers (the exact variant is not stated in public text; this is an inference):

* weights: the BLIP *pre-train* checkpoint ``model_large.pth`` (ViT-L/16, 224 px), whose ``model`` state dict is
  converted by key remap into ``BlipForImageTextRetrieval`` (vision LayerNorm eps 1e-6, ITC path only;
  ``convert_blip_pretrain_state_dict``: momentum encoders, queues, ``temp`` and the caption decoder are
  known-unused and dropped);
* ``cos = normalize(text_proj(text_encoder(ids)[:, 0])) . normalize(vision_proj(ViT(img)[:, 0]))`` - text
  encoded alone (no cross-attention), first token ``[CLS]``, no temperature; range [-1, 1];
* images: the OpenAI CLIP 224 pipeline (bicubic shortest side, center crop, OpenAI mean/std);
* text: ``bert-base-uncased`` + ``[DEC]``/``[ENC]`` specials, ``padding="max_length", truncation=True,
  max_length=35``.

Default source: ``~/.cache/ImageReward/model_large.pth`` (where ImageReward's toolkit downloads it). Also
accepted: a directory saved by ``scripts/convert_blip_itc.py`` (``BlipForImageTextRetrieval.save_pretrained``
+ tokenizer), or another local ``.pth``.

``blip_itm``: ``softmax(itm_head(text_encoder(ids, cross-attention to ViT tokens)[:, 0]))[:, 1]`` with the
HF retrieval checkpoints (default ``Salesforce/blip-itm-large-coco``), preprocessing by the checkpoint's
``BlipImageProcessorPil`` (384x384 bicubic resize, no crop, OpenAI mean/std) and tokenizer
(``max_length=35``). The first token is ``[CLS]`` as transformers feeds it (``first_token="cls"``); the
original BLIP code replaces it by ``[ENC]`` for ITM - ``first_token="enc"`` does that when the tokenizer has
an ``[ENC]`` token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from prefdiff.scorers.base import (Requirement, Scorer, clip_image_processor, clip_pixel_values, l2_normalize,
                                   looks_like_path)
from prefdiff.scorers.convert import (ConversionReport, convert_blip_pretrain_state_dict, load_checkpoint_file,
                                      load_strict, unwrap_state_dict)
from prefdiff.scorers.image_reward import (DEFAULT_BERT_TOKENIZER, _has_tokenizer, blip_text_config,
                                           blip_tokenizer, blip_vit_large_config)

DEFAULT_MODEL_LARGE = "~/.cache/ImageReward/model_large.pth"
MODEL_LARGE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"
DEFAULT_BLIP_ITM = "Salesforce/blip-itm-large-coco"


def blip_large_itc_config(med_config: dict | None = None, image_size: int = 224) -> Any:
    """``BLIP_Pretrain(image_size=224, vit='large')`` as a ``BlipConfig`` (embed_dim 256)."""
    from transformers import BlipConfig

    vision = blip_vit_large_config(image_size)
    text = blip_text_config(med_config, encoder_width=vision.hidden_size)
    return BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_text_hidden_size=256)


def load_blip_pretrain_checkpoint(path: str | os.PathLike, *, config: Any = None,
                                  allow_missing_itm_head: bool = True) -> tuple[Any, ConversionReport]:
    """``BlipForImageTextRetrieval`` from a BLIP pre-train checkpoint (``model_large.pth``), strictly accounted."""
    from transformers import BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval(config or blip_large_itc_config())
    sd = unwrap_state_dict(load_checkpoint_file(path))
    converted, report = convert_blip_pretrain_state_dict(sd, model.state_dict(),
                                                         allow_missing_itm_head=allow_missing_itm_head,
                                                         source=str(path))
    load_strict(model, converted)
    return model.eval(), report


class _BlipScorer(Scorer):
    def __init__(self, source: str, *, max_length: int = 35, **kw: Any) -> None:
        super().__init__(**kw)
        self.source = str(source)
        self.max_length = max_length
        self.model: Any = None
        self.tokenizer: Any = None
        self.image_processor: Any = None

    def _setup(self, model: Any, tokenizer: Any, image_processor: Any) -> None:
        model = model.eval().to(self.device)
        dtype = self.backbone_dtype
        model.vision_model.to(dtype)
        model.text_encoder.to(dtype)  # projections and the ITM head stay fp32
        self.model, self.tokenizer = model, tokenizer
        self.image_processor = image_processor or clip_image_processor(model.config.vision_config.image_size)

    @classmethod
    def from_components(cls, model: Any, tokenizer: Any, image_processor: Any = None, **kw: Any) -> "_BlipScorer":
        """A loaded scorer around a ``BlipForImageTextRetrieval``, a BERT tokenizer and (optionally) an image
        processor (default for ITC: the CLIP pipeline at the model's image size)."""
        scorer = cls(**kw)
        scorer.source = "from_components"
        scorer._setup(model, tokenizer, image_processor)
        return scorer._mark_loaded()

    def text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def image_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        vm = self.model.vision_model
        pixels = clip_pixel_values(self.image_processor, images).to(self.device, next(vm.parameters()).dtype)
        return vm(pixel_values=pixels).last_hidden_state


class BlipITCScorer(_BlipScorer):
    name = "blip_itc"

    def __init__(self, source: str = DEFAULT_MODEL_LARGE, *, tokenizer: str = DEFAULT_BERT_TOKENIZER,
                 max_length: int = 35, **kw: Any) -> None:
        super().__init__(source, max_length=max_length, **kw)
        self.tokenizer_source = str(tokenizer)
        self.conversion: dict | None = None

    def _kind(self) -> str:
        if looks_like_path(self.source):
            return "dir" if Path(os.path.expanduser(self.source)).is_dir() else "file"
        return "hub"

    def _tokenizer_in_source(self) -> bool:
        return self._kind() == "dir" and _has_tokenizer(Path(os.path.expanduser(self.source)))

    def requirements(self) -> list[Requirement]:
        hint = (f"model_large.pth is at {MODEL_LARGE_URL} (download it where there is network); or convert it once "
                "with scripts/convert_blip_itc.py and pass source=<output dir>")
        kind = self._kind()
        if kind == "file":
            reqs = [Requirement("BLIP model_large.pth", "file", self.source, "source", None, hint)]
        else:
            reqs = [Requirement("BLIP retrieval model", "model", self.source, "source", None, hint)]
        if kind == "hub":
            reqs.append(Requirement("BLIP tokenizer", "tokenizer", self.source, "source"))
        elif not self._tokenizer_in_source():
            reqs.append(Requirement("BERT tokenizer", "tokenizer", self.tokenizer_source, "tokenizer"))
        return reqs

    def _load(self) -> None:
        from transformers import BlipForImageTextRetrieval

        kw = self._from_pretrained_kwargs()
        kind = self._kind()
        if kind == "file":
            model, report = load_blip_pretrain_checkpoint(os.path.expanduser(self.source))
            self.conversion = report.to_dict()
        else:
            src = os.path.expanduser(self.source) if kind == "dir" else self.source
            model = BlipForImageTextRetrieval.from_pretrained(src, dtype=torch.float32, **kw)
        if kind == "hub":
            tok_src = self.source
        else:
            tok_src = os.path.expanduser(self.source) if self._tokenizer_in_source() else self.tokenizer_source
        self._setup(model, blip_tokenizer(tok_src, **kw), None)

    def embeddings(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised image features, normalised text features), fp32."""
        img = l2_normalize(self.model.vision_proj(self.image_tokens(images)[:, 0, :].float()))
        text = self.text_inputs(prompts)
        hidden = self.model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        txt = l2_normalize(self.model.text_proj(hidden.last_hidden_state[:, 0, :].float()))
        return img, txt

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        img, txt = self.embeddings(images, prompts)
        return (img * txt).sum(dim=-1)

    def params(self) -> dict[str, Any]:
        return {"source": self.source, "tokenizer": self.tokenizer_source, "max_length": self.max_length,
                "definition": "ITC cosine, BLIP model_large.pth @224 (ImageReward toolkit BLIPScore)"}


class BlipITMScorer(_BlipScorer):
    name = "blip_itm"

    def __init__(self, source: str = DEFAULT_BLIP_ITM, *, first_token: str = "cls", max_length: int = 35,
                 **kw: Any) -> None:
        if first_token not in ("cls", "enc"):
            raise ValueError(f"first_token={first_token!r}: must be 'cls' (transformers) or 'enc' (original BLIP ITM)")
        super().__init__(source, max_length=max_length, **kw)
        self.first_token = first_token

    def requirements(self) -> list[Requirement]:
        return [Requirement("BLIP retrieval model", "model", self.source, "source"),
                Requirement("BLIP image processor", "image_processor", self.source, "source"),
                Requirement("BLIP tokenizer", "tokenizer", self.source, "source")]

    def _load(self) -> None:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessorPil

        kw = self._from_pretrained_kwargs()
        src = os.path.expanduser(self.source) if looks_like_path(self.source) else self.source
        model = BlipForImageTextRetrieval.from_pretrained(src, dtype=torch.float32, **kw)
        self._setup(model, AutoTokenizer.from_pretrained(src, **kw), BlipImageProcessorPil.from_pretrained(src, **kw))

    def text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = super().text_inputs(prompts)
        if self.first_token == "enc":
            enc_id = self.tokenizer.convert_tokens_to_ids("[ENC]")
            if enc_id is None or enc_id == self.tokenizer.unk_token_id:
                raise ValueError(f"{self.name}: first_token='enc' but the tokenizer has no [ENC] token")
            enc["input_ids"] = enc["input_ids"].clone()
            enc["input_ids"][:, 0] = enc_id
        return enc

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        image_embeds = self.image_tokens(images)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_inputs(prompts)
        out = self.model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=atts)
        logits = self.model.itm_head(out.last_hidden_state[:, 0, :].float())
        return F.softmax(logits, dim=-1)[:, 1]

    def params(self) -> dict[str, Any]:
        return {"source": self.source, "max_length": self.max_length, "first_token": self.first_token,
                "definition": "ITM probability softmax(itm_head)[:,1], HF BLIP retrieval checkpoint"}
