"""The JPEG-size judges of the first round (DDPO/D3PO compressibility task) behind the scorer interface.

``jpeg_compressibility`` = ``-kB`` and ``jpeg_incompressibility`` = ``+kB`` of the image saved as RGB JPEG at
quality 95 (1 kB = 1000 bytes); higher is better for both. The byte count comes from
``prefdiff.labeling.judges.jpeg_size_kb``, so the numbers are the label stage's (returned as float32: sizes
are multiples of 0.001 kB and float32 keeps distinct sizes distinct below 8 MB). No weights, no prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from evaluation.scorers.base import Scorer
from prefdiff.labeling.judges import _check_quality, jpeg_size_kb


class JpegSizeScorer(Scorer):
    needs_prompt = False

    def __init__(self, name: str, sign: float, quality: int = 95, **kw: Any) -> None:
        kw.setdefault("device", "cpu")
        super().__init__(**kw)
        self.name = name
        self.sign = float(sign)
        self.quality = _check_quality(quality)

    def _load(self) -> None:
        pass

    @classmethod
    def from_components(cls, **kw: Any) -> "JpegSizeScorer":
        """No components to inject (no weights); for interface uniformity."""
        return cls(**kw)._mark_loaded()

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        return torch.tensor([self.sign * jpeg_size_kb(im, self.quality) for im in images], dtype=torch.float64)

    def params(self) -> dict[str, Any]:
        return {"quality": self.quality, "sign": self.sign}


class JpegCompressibilityScorer(JpegSizeScorer):
    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95, **kw: Any) -> None:
        super().__init__("jpeg_compressibility", -1.0, quality, **kw)


class JpegIncompressibilityScorer(JpegSizeScorer):
    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95, **kw: Any) -> None:
        super().__init__("jpeg_incompressibility", +1.0, quality, **kw)
