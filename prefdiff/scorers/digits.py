"""Judges for the built-in ``digits`` model: prompt alignment by a digit classifier, and stroke (ink) coverage.

Both read the image as a person sees it: grey level, dark ink on light paper. ``ink = 1 - grey / 255``.

* ``digit_alignment`` = the classifier's probability that the image shows the digit its prompt names
  (``prefdiff.prompts.prompted_digit``: "a handwritten seven" and "the digit 7" both name 7). The D3PO paper's
  prompt-image alignment experiment in miniature: this data set's CLIP score. In [0, 1].
* ``stroke_bold`` / ``stroke_thin`` = ``+`` / ``-`` the mean ink of the image in percent (0: blank paper,
  100: all black): a style preference a person can see (bolder or thinner strokes). No prompt.

The classifier (``DigitClassifier``: 8x8 ink levels -> 10 logits, an MLP) is trained by
``python -m prefdiff.models.digits`` on the scikit-learn digits the generator never saw, rendered exactly as
the generator's training images are (``render_digits``), and shipped as
``prefdiff/scorers/assets/digit_classifier.safetensors``. Its input is the image box-filtered back to the
data set's 8x8 grid with ink scaled to the data set's 0..16 levels, so it reads any image size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from prefdiff.prompts import prompted_digit
from prefdiff.scorers.base import Requirement, Scorer, WeightlessScorer

DIGIT_CLASSIFIER = Path(__file__).resolve().parent / "assets" / "digit_classifier.safetensors"
GRID = 8  # scikit-learn digits are 8x8 with ink levels 0..16
INK_LEVELS = 16.0


def render_digits(ink: torch.Tensor, size: int) -> torch.Tensor:
    """Data set digits as the generator's images: ``ink`` [N, 8, 8] in [0, 1] -> [N, 3, size, size] in [-1, 1].

    Bilinear upsampling (a smooth pen stroke rather than 8x8 blocks), dark ink on white paper, grey in RGB.
    """
    import torch.nn.functional as F

    up = F.interpolate(ink[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    paper = 1.0 - up.clamp(0.0, 1.0)
    return (paper * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


def ink_grid(images: list[Image.Image]) -> torch.Tensor:
    """[N, 64] float32: each image as grey, box-filtered to 8x8, ink scaled to 0..16 (the data set's units)."""
    grids = [np.asarray(im.convert("L").resize((GRID, GRID), resample=Image.BOX), dtype=np.float32)
             for im in images]
    ink = (255.0 - np.stack(grids)) / 255.0 * INK_LEVELS
    return torch.from_numpy(ink.reshape(len(images), GRID * GRID))


class DigitClassifier(nn.Module):
    """8x8 ink grid (0..16, flattened [N, 64]) -> logits [N, 10]."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(GRID * GRID, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.net(grid / INK_LEVELS)


def load_digit_classifier(path: str | os.PathLike = DIGIT_CLASSIFIER) -> DigitClassifier:
    from safetensors.torch import load_file

    state = load_file(str(path))
    model = DigitClassifier(hidden=int(state["net.0.weight"].shape[0]))
    model.load_state_dict(state, strict=True)
    return model.eval()


class DigitAlignmentScorer(Scorer):
    """P(image shows the prompted digit) under the shipped digit classifier."""

    name = "digit_alignment"
    needs_prompt = True

    def __init__(self, classifier: str | os.PathLike = DIGIT_CLASSIFIER, **kw: Any) -> None:
        kw.setdefault("device", "cpu")
        super().__init__(**kw)
        self.classifier_path = str(classifier)
        self.classifier: DigitClassifier | None = None

    def requirements(self) -> list[Requirement]:
        return [Requirement("digit classifier (python -m prefdiff.models.digits writes it)", "file",
                            self.classifier_path, "classifier")]

    def _load(self) -> None:
        self.classifier = load_digit_classifier(self.classifier_path).to(self.device)

    @classmethod
    def from_components(cls, classifier: DigitClassifier, **kw: Any) -> "DigitAlignmentScorer":
        scorer = cls(**kw)
        scorer.classifier_path = "from_components"
        scorer.classifier = classifier.eval().to(scorer.device)
        return scorer._mark_loaded()

    def digit_probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 10] float32 class probabilities of each image."""
        self.load()
        with torch.inference_mode():
            return torch.softmax(self.classifier(ink_grid(images).to(self.device)).float(), dim=-1).cpu()

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        digits = torch.tensor([prompted_digit(p) for p in prompts])
        return self.digit_probabilities(images).gather(1, digits[:, None]).squeeze(1)

    def params(self) -> dict[str, Any]:
        """The classifier by content (its sha256), so clones in other directories share one evaluation
        protocol; a classifier handed over in memory, or a file not there yet, by name."""
        path = Path(self.classifier_path)
        if not path.is_file():
            return {"classifier": self.classifier_path}
        import hashlib

        return {"classifier_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def ink_coverage_percent(images: list[Image.Image]) -> torch.Tensor:
    """[N] float64: mean ink (1 - grey/255) over every pixel, in percent."""
    return torch.tensor([100.0 * (1.0 - np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0)
                         for im in images], dtype=torch.float64)


class StrokeScorer(WeightlessScorer):
    """``sign`` x ink coverage in percent: ``stroke_bold`` (+1) prefers bolder strokes, ``stroke_thin`` (-1) thinner."""

    needs_prompt = False

    def __init__(self, name: str, sign: float, **kw: Any) -> None:
        kw.setdefault("device", "cpu")
        super().__init__(**kw)
        self.name = name
        self.sign = float(sign)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> torch.Tensor:
        return self.sign * ink_coverage_percent(images)


class StrokeBoldScorer(StrokeScorer):
    name = "stroke_bold"

    def __init__(self, **kw: Any) -> None:
        super().__init__("stroke_bold", +1.0, **kw)


class StrokeThinScorer(StrokeScorer):
    name = "stroke_thin"

    def __init__(self, **kw: Any) -> None:
        super().__init__("stroke_thin", -1.0, **kw)
