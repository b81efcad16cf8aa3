"""DDPO baseline (Black et al. 2023, as in kvablack/ddpo-pytorch and D3PO's ``rm/train_ddpo.py``).

A policy-gradient method that needs the reward itself, not only preferences: every judged image's score
becomes a per-prompt normalised advantage, and each denoising step of its stored trajectory is trained
with the PPO clipped surrogate against the SAMPLING-TIME log-prob stored by the sample stage (no reference
model, no KL term). The per-step log-prob is D3PO's (``TrajectoryImages.log_probs``), so the two methods
differ only in the objective.

Rewards come from the preference dataset (each image's ``winner_score``/``loser_score``, ties included: their
scores are still rewards), so DDPO trains on exactly the samples and judge the other methods see.
"""

from __future__ import annotations

import torch

from prefdiff.training.fit import FitContext, Method, Unit
from prefdiff.training.losses import ddpo_loss, per_prompt_advantages
from prefdiff.training.trajectory import TrajectoryImages


class DDPO(Method):
    data = "trajectories"
    metrics = ("loss", "clip_frac", "approx_kl")
    item_name = "images"

    def __init__(self, ctx: FitContext) -> None:
        super().__init__(ctx)
        self.options = ctx.params.train.method_params
        rewards: dict[int, float] = {}
        for p in ctx.preferences.pairs:
            rewards[p.winner], rewards[p.loser] = p.winner_score, p.loser_score
        if not rewards:
            raise ValueError(f"{ctx.preferences.root}: no judged images; nothing to train on")
        image_ids = sorted(rewards)
        self.images = TrajectoryImages.load(ctx.model.pipe, ctx.trajectories, image_ids, ctx.model.device)
        # Per-prompt normalisation (DDPO's stat tracker over this round's samples), then PPO's +-clip.
        self.advantages = per_prompt_advantages(torch.tensor([rewards[i] for i in image_ids]), self.images.prompts)
        self.items = len(image_ids)
        self.timestep_fraction = self.options.timestep_fraction
        self.timestep_window = self.options.timestep_window

    def describe(self) -> str:
        return f"clip_range {self.options.clip_range:g}, adv_clip_max {self.options.adv_clip_max:g}"

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model, rows, idx = self.ctx.model, unit.rows, unit.step_index
        logp = self.images.log_probs(model.unet, model.pipe.scheduler, rows, idx, self.ctx.params.sampling)
        out = ddpo_loss(logp, self.images.sampled_logp[rows, idx].to(logp.device), self.advantages[rows].to(logp.device),
                        clip_range=self.options.clip_range, adv_clip_max=self.options.adv_clip_max)
        return out.loss, {k: getattr(out, k).detach() for k in self.metrics}
