"""Every path of the pipeline, defined once.

Stages run with the DVC workspace as the current directory, so ``Paths(Path.cwd())`` is what they use;
tests build a ``Paths`` on a temporary directory. ``dvc.yaml`` repeats these relative paths (DVC needs
them literally); ``tests/test_dvc_pipeline.py`` checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # a diffusers-format LoRA dir's weights (prefdiff.models.lora)


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def trajectories(self) -> Path:
        return self.root / "data" / "trajectories"

    @property
    def preferences(self) -> Path:
        return self.root / "data" / "preferences"

    @property
    def labels(self) -> Path:
        """People's label logs (``label.human.log`` lives here): git holds the directory, DVC the log."""
        return self.root / "data" / "labels"

    @property
    def trained(self) -> Path:
        """The trained weights: a diffusers LoRA, or the full UNet under ``unet/``, plus epoch snapshots."""
        return self.root / "models" / "trained"

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "checkpoints"

    @property
    def heldout(self) -> Path:
        """Held-out preference pairs (``trajectories/`` and ``preferences/``) for implicit reward accuracy."""
        return self.root / "data" / "heldout"

    @property
    def baseline(self) -> Path:
        """What the evaluation compares against: the base, or a registry champion named by version and the
        sha256 of its weights (written by the flow before the evaluate stage, a DVC dependency of it)."""
        return self.root / "registry" / "baseline.json"

    @property
    def baseline_weights(self) -> Path:
        """The champion's weights (LoRA or full UNet) when ``baseline`` names one."""
        return self.root / "models" / "baseline"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train.json"

    @property
    def eval_metrics(self) -> Path:
        return self.root / "metrics" / "eval.json"

    @property
    def train_plot(self) -> Path:
        return self.root / "plots" / "train.csv"

    @property
    def reward_curve_plot(self) -> Path:
        return self.root / "plots" / "reward_curve.csv"

    @property
    def winrate_plot(self) -> Path:
        return self.root / "plots" / "win_rate.csv"

    @property
    def scorers_plot(self) -> Path:
        return self.root / "plots" / "scorers.csv"

    @property
    def rounds(self) -> Path:
        """The rounds stage's data: ``round-NNN/{trajectories,preferences,lora,checkpoint}`` and ``round.json``."""
        return self.root / "data" / "rounds"

    @property
    def rounds_metrics(self) -> Path:
        return self.root / "metrics" / "rounds.json"

    @property
    def rounds_plot(self) -> Path:
        """One row per round: the DVC plot of the per-round curves."""
        return self.root / "plots" / "rounds.csv"

    @property
    def rounds_eval_plot(self) -> Path:
        """One row per evaluated round (every rounds.eval_every and the last)."""
        return self.root / "plots" / "rounds_eval.csv"

    @property
    def rounds_figure(self) -> Path:
        return self.root / "plots" / "rounds.png"

    @property
    def decision(self) -> Path:
        return self.root / "registry" / "decision.json"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"
