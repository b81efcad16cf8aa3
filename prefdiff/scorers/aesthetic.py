"""LAION aesthetic score: the improved-aesthetic-predictor MLP on L2-normalised CLIP ViT-L/14 image embeddings.

``score = MLP(e / ||e||)`` with ``e = visual_projection(CLIP ViT-L/14 pooled output)`` - the DDPO/D3PO
``AestheticScorer`` (HF ``openai/clip-vit-large-patch14`` + its processor) and Diffusion-DPO's aesthetic
metric. Prompts are not used. The head ``sac+logos+ava1-l14-linearMSE.pth`` (3.7 MB, sha256 21dd590f...)
ships in ``prefdiff/scorers/assets/``; it is a plain state dict (``layers.{0,2,4,6,7}``), loaded with
``torch.load(weights_only=True)`` and strict key accounting, and, having no nonlinearities, is one affine map.
The CLIP backbone is still needed (``openai/clip-vit-large-patch14``, ~1.7 GB): the head alone is not enough.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from prefdiff.scorers.base import MLPHead, Requirement, Scorer, clip_pixel_values, l2_normalize
from prefdiff.scorers.clip_score import DEFAULT_CLIP
from prefdiff.scorers.convert import StateDictAccountingError, load_checkpoint_file

AESTHETIC_HEAD = Path(__file__).resolve().parent / "assets" / "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
AESTHETIC_HEAD_KEYS = frozenset(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


def load_aesthetic_head(path: str | os.PathLike = AESTHETIC_HEAD) -> MLPHead:
    """The aesthetic MLP from ``path`` (weights_only load; exactly the keys ``layers.{0,2,4,6,7}.{weight,bias}``)."""
    sd = load_checkpoint_file(path)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a plain state dict of tensors")
    unknown, missing = set(sd) - AESTHETIC_HEAD_KEYS, AESTHETIC_HEAD_KEYS - set(sd)
    if unknown or missing:
        raise StateDictAccountingError(f"aesthetic head {path}", unknown, missing)
    head = MLPHead(int(sd["layers.0.weight"].shape[1]))
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(head.state_dict()[k].shape)}" for k, v in sd.items()
                  if tuple(v.shape) != tuple(head.state_dict()[k].shape)]
    if mismatched:
        raise StateDictAccountingError(f"aesthetic head {path}", mismatched=mismatched)
    head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return head.eval()


def _local_or_hub(source: str) -> str:
    expanded = os.path.expanduser(source)
    return expanded if os.path.isdir(expanded) else source


class LaionAestheticScorer(Scorer):
    name = "laion_aesthetic"
    needs_prompt = False

    def __init__(self, clip: str = DEFAULT_CLIP, head: str | os.PathLike = AESTHETIC_HEAD, *,
                 processor: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.clip_source = str(clip)
        self.processor_source = str(processor) if processor is not None else self.clip_source
        self.head_path = str(head)
        self.vision: Any = None
        self.head: MLPHead | None = None
        self.image_processor: Any = None

    def requirements(self) -> list[Requirement]:
        return [Requirement("CLIP ViT-L/14 vision model", "model", self.clip_source, "clip"),
                Requirement("CLIP image processor", "image_processor", self.processor_source, "processor"),
                Requirement("aesthetic MLP head", "file", self.head_path, "head")]

    def _load(self) -> None:
        from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

        kw = self._from_pretrained_kwargs()
        vision = CLIPVisionModelWithProjection.from_pretrained(_local_or_hub(self.clip_source), dtype=torch.float32,
                                                               **kw)
        processor = CLIPImageProcessorPil.from_pretrained(_local_or_hub(self.processor_source), **kw)
        self._setup(vision, processor, load_aesthetic_head(self.head_path))

    def _setup(self, vision: nn.Module, image_processor: Any, head: MLPHead) -> None:
        vision = vision.eval().to(self.device)
        vision.vision_model.to(self.backbone_dtype)  # visual_projection and the head stay fp32
        proj_dim = vision.visual_projection.out_features
        if proj_dim != head.input_size:
            raise ValueError(f"{self.name}: CLIP projection dim {proj_dim} != aesthetic head input {head.input_size}")
        self.vision, self.image_processor, self.head = vision, image_processor, head.eval().float().to(self.device)

    @classmethod
    def from_components(cls, vision_model: nn.Module, image_processor: Any,
                        head: MLPHead | str | os.PathLike | None = None, **kw: Any) -> "LaionAestheticScorer":
        """``vision_model``: a ``CLIPVisionModelWithProjection`` or ``CLIPModel`` (anything with ``vision_model``
        and ``visual_projection``); ``head``: an ``MLPHead`` or a head file (default: the shipped asset)."""
        scorer = cls(**kw)
        scorer.clip_source = scorer.processor_source = "from_components"
        if not isinstance(head, MLPHead):
            scorer.head_path = str(head or AESTHETIC_HEAD)
            head = load_aesthetic_head(scorer.head_path)
        else:
            scorer.head_path = "from_components"
        scorer._setup(vision_model, image_processor, head)
        return scorer._mark_loaded()

    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised projected CLIP image embeddings, fp32."""
        vm = self.vision.vision_model
        pixels = clip_pixel_values(self.image_processor, images).to(self.device, next(vm.parameters()).dtype)
        pooled = vm(pixel_values=pixels).pooler_output.float()
        return l2_normalize(self.vision.visual_projection(pooled))

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        return self.head(self.image_embeddings(images)).squeeze(-1)

    def params(self) -> dict[str, Any]:
        return {"clip": self.clip_source, "processor": self.processor_source, "head": self.head_path}
