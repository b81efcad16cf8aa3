"""CLIP score (torchmetrics definition, per sample) and the raw CLIP cosine.

* ``clip_score``: ``max(100 * cos(E_I, E_C), 0)`` **per sample** - the formula torchmetrics documents for one
  pair. torchmetrics' ``CLIPScore`` metric itself averages ``100 * cos`` over the samples and clamps the
  *mean* (``max(mean, 0)``). Per-sample clamping only differs from that when some cosine is negative (never
  seen with real CLIP on real prompt/image pairs, where cos is about 0.15-0.4). To reproduce torchmetrics'
  number exactly, use ``CLIPScorer(clamp="none")`` values and ``torchmetrics_mean`` (average, then clamp);
  ``torchmetrics_clip_score(scorer)`` builds torchmetrics' own metric around the same loaded model.
* ``clip_cosine``: raw ``cos(E_I, E_C)`` with no scale or clamp (ImageReward's ``CLIPScore`` and
  Diffusion-DPO's convention).

Default model ``openai/clip-vit-large-patch14`` (torchmetrics' default; the HF port of OpenAI ViT-L/14),
preprocessing by its ``CLIPImageProcessorPil`` (224, bicubic shortest side, center crop, OpenAI mean/std) and
text truncated by the tokenizer to 77 tokens (EOS kept; torchmetrics slices ids instead, which can drop EOS
on over-long captions).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from prefdiff.scorers.base import Requirement, Scorer, clip_pixel_values, l2_normalize, to_pil_images

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class CLIPFamilyScorer(Scorer):
    """Shared machinery for scorers built on a transformers ``CLIPModel`` (CLIP score, PickScore, HPSv2)."""

    def __init__(self, model: str, processor: str | None = None, *, max_length: int = 77, **kw: Any) -> None:
        super().__init__(**kw)
        self.model_source = str(model)
        self.processor_source = str(processor) if processor is not None else self.model_source
        self.max_length = max_length
        self.model: Any = None
        self.image_processor: Any = None
        self.tokenizer: Any = None

    def requirements(self) -> list[Requirement]:
        return [Requirement("CLIP model", "model", self.model_source, "model"),
                Requirement("image processor", "image_processor", self.processor_source, "processor"),
                Requirement("tokenizer", "tokenizer", self.processor_source, "processor")]

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        kw = self._from_pretrained_kwargs()
        model = CLIPModel.from_pretrained(self.model_source, dtype=torch.float32, **kw)
        self._setup(model, CLIPImageProcessorPil.from_pretrained(self.processor_source, **kw),
                    AutoTokenizer.from_pretrained(self.processor_source, **kw))

    def _setup(self, model: nn.Module, image_processor: Any, tokenizer: Any) -> None:
        model = model.eval().to(self.device)
        dtype = self.backbone_dtype
        # Only the transformer towers go to half precision; projections and logit_scale stay fp32.
        model.vision_model.to(dtype)
        model.text_model.to(dtype)
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer

    @classmethod
    def from_components(cls, model: nn.Module, image_processor: Any, tokenizer: Any, **kw: Any) -> "CLIPFamilyScorer":
        """A loaded scorer around a prebuilt ``CLIPModel``, a PIL image processor and a CLIP tokenizer."""
        scorer = cls(**kw)
        scorer.model_source = scorer.processor_source = "from_components"
        scorer._setup(model, image_processor, tokenizer)
        return scorer._mark_loaded()

    # ---- embeddings (projected, not normalised, fp32)
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return clip_pixel_values(self.image_processor, images)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.model.vision_model
        dtype = next(vm.parameters()).dtype
        pooled = vm(pixel_values=pixel_values.to(self.device, dtype)).pooler_output.float()
        return self.model.visual_projection(pooled)

    def text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.text_model(input_ids=input_ids.to(self.device),
                                    attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        return self.model.text_projection(out.pooler_output.float())

    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        img = l2_normalize(self.image_features(self.pixel_values(images)))
        txt = l2_normalize(self.text_features(**self.text_inputs(prompts)))
        return (img * txt).sum(dim=-1)

    def params(self) -> dict[str, Any]:
        return {"model": self.model_source, "processor": self.processor_source, "max_length": self.max_length}


class CLIPScorer(CLIPFamilyScorer):
    """``scale * cos(image, text)``, clamped at 0 per sample (``clamp="per_sample"``) or not (``"none"``)."""

    name = "clip_score"

    def __init__(self, model: str = DEFAULT_CLIP, processor: str | None = None, *, scale: float = 100.0,
                 clamp: str = "per_sample", max_length: int = 77, **kw: Any) -> None:
        if clamp not in ("per_sample", "none"):
            raise ValueError(f"clamp={clamp!r}: must be 'per_sample' or 'none' (torchmetrics clamps the mean; "
                             "use clamp='none' and torchmetrics_mean for that)")
        super().__init__(model, processor, max_length=max_length, **kw)
        self.scale = float(scale)
        self.clamp = clamp

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        values = self.scale * self.cosine(images, prompts)
        return values.clamp_min(0.0) if self.clamp == "per_sample" else values

    def params(self) -> dict[str, Any]:
        return {**super().params(), "scale": self.scale, "clamp": self.clamp}


class CLIPCosineScorer(CLIPScorer):
    """Raw cosine similarity of the CLIP image and text embeddings (no scale, no clamp)."""

    name = "clip_cosine"

    def __init__(self, model: str = DEFAULT_CLIP, processor: str | None = None, *, max_length: int = 77,
                 **kw: Any) -> None:
        super().__init__(model, processor, scale=1.0, clamp="none", max_length=max_length, **kw)


def torchmetrics_mean(values: torch.Tensor) -> torch.Tensor:
    """torchmetrics' aggregate from unclamped per-sample ``100*cos`` values: ``max(mean, 0)``."""
    mean = values.double().mean()
    return torch.clamp_min(mean, 0.0).to(torch.float32)


class _TorchmetricsModel(nn.Module):
    """Adapter so torchmetrics' ``CLIPScore`` runs on transformers 5: ``get_*_features`` return tensors
    (transformers 5 returns ``BaseModelOutputWithPooling``, torchmetrics 1.9 calls ``.norm`` on it)."""

    def __init__(self, scorer: CLIPFamilyScorer) -> None:
        super().__init__()
        self.clip = scorer.model
        self.config = scorer.model.config
        self._scorer = scorer

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._scorer.image_features(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._scorer.text_features(input_ids, attention_mask)


class _TorchmetricsProcessor:
    """Processor adapter: tensors -> uint8 PIL -> the scorer's exact pixel pipeline; text via its tokenizer."""

    def __init__(self, scorer: CLIPFamilyScorer) -> None:
        self._scorer = scorer

    def __call__(self, text: Any = None, images: Any = None, return_tensors: str = "pt", padding: Any = True,
                 **_: Any) -> dict[str, torch.Tensor]:
        if images is not None:
            return {"pixel_values": self._scorer.pixel_values(to_pil_images(list(images)))}
        return self._scorer.text_inputs(list(text))


def torchmetrics_clip_score(scorer: CLIPFamilyScorer) -> Any:
    """torchmetrics' ``CLIPScore`` metric built around ``scorer``'s loaded model and preprocessing.

    ``metric.update(images, prompts)`` takes [N,3,H,W] uint8 tensors (or a list of [3,H,W]) and captions;
    ``metric.compute()`` is ``max(mean(100*cos), 0)``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    scorer.load()
    model, processor = _TorchmetricsModel(scorer), _TorchmetricsProcessor(scorer)
    return CLIPScore(model_name_or_path=lambda: (model, processor))
