"""PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, text)`` with the PickScore_v1 CLIP-H.

As in the official README: model ``yuvalkirstain/PickScore_v1``, processor (image preprocessing + tokenizer)
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (224 px, bicubic shortest side, center crop, OpenAI mean/std;
text ``padding=True, truncation=True, max_length=77``). The value is the per-pair logit (about 18-23 for real
images); a softmax over candidates of one prompt gives preference probabilities. ``logit_scale`` is read from
the checkpoint and applied in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from prefdiff.scorers.clip_score import CLIPFamilyScorer

DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScorer(CLIPFamilyScorer):
    name = "pickscore"

    def __init__(self, model: str = DEFAULT_PICKSCORE, processor: str | None = DEFAULT_PICKSCORE_PROCESSOR, *,
                 max_length: int = 77, **kw: Any) -> None:
        super().__init__(model, processor, max_length=max_length, **kw)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        return self.model.logit_scale.float().exp() * self.cosine(images, prompts)
