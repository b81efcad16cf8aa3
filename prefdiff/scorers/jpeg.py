"""JPEG size: the DDPO/D3PO "compressibility" task (Black et al. 2023, sec. 6.1), the first round's judges.

The reward is the size of the image saved as RGB JPEG at ``quality`` (default 95, the official code's),
``buf.tell() / 1000`` in decimal kB. Both scorers are oriented so that a HIGHER score is better:
``jpeg_incompressibility`` = ``+kB`` (prefer detailed images), ``jpeg_compressibility`` = ``-kB`` (prefer simple,
flat images). No weights, no prompt.

Sizes are multiples of 0.001 kB. Returned as float32 (the interface's dtype) they stay distinct and recover
their exact decimal value (``scores_as_decimals``) while the float32 spacing is below 0.001, i.e. below
2**14 kB = 16.384 MB; larger sizes are refused rather than silently merged.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from prefdiff.scorers.base import WeightlessScorer

# float32 spacing reaches 2**-10 kB (< 0.001) just below 2**14 kB and 2**-9 (> 0.001) above it.
MAX_EXACT_KB = 2.0**14


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (1 kB = 1000 bytes) of ``image`` as RGB JPEG at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def _check_quality(quality: Any) -> int:
    # PIL accepts 1..95 as meaningful (above 95 disables parts of the compressor); bool is not a quality.
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"JPEG scorer quality={quality!r}: must be an int in 1..95")
    return quality


class JpegSizeScorer(WeightlessScorer):
    """Score = ``sign`` * JPEG size (kB): ``sign=+1`` incompressibility, ``sign=-1`` compressibility."""

    needs_prompt = False

    def __init__(self, name: str, sign: float, quality: int = 95, **kw: Any) -> None:
        kw.setdefault("device", "cpu")
        super().__init__(**kw)
        self.name = name
        self.sign = float(sign)
        self.quality = _check_quality(quality)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        sizes = [jpeg_size_kb(im, self.quality) for im in images]
        too_big = [s for s in sizes if s >= MAX_EXACT_KB]
        if too_big:
            raise ValueError(f"{self.name}: JPEG size {too_big[0]} kB >= {MAX_EXACT_KB:.0f} kB, where float32 no "
                             "longer keeps sizes 0.001 kB apart distinct")
        return torch.tensor([self.sign * s for s in sizes], dtype=torch.float64)

    def params(self) -> dict[str, Any]:
        # the sign is the name's (compressibility / incompressibility)
        return {"quality": self.quality}


class JpegCompressibilityScorer(JpegSizeScorer):
    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95, **kw: Any) -> None:
        super().__init__("jpeg_compressibility", -1.0, quality, **kw)


class JpegIncompressibilityScorer(JpegSizeScorer):
    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95, **kw: Any) -> None:
        super().__init__("jpeg_incompressibility", +1.0, quality, **kw)
