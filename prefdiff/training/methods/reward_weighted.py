"""Reward-weighted denoising (Lee et al. 2023, the D3PO paper's "Reward Weighted" row) on both images of a pair:
each image's MSE weighted by batch * softmax(judge score / temperature)."""

from __future__ import annotations

import torch

from prefdiff.training.fit import Unit
from prefdiff.training.images import ImagePairMethod
from prefdiff.training.methods.shares import own_batch
from prefdiff.training.losses import reward_weighted_loss


class RewardWeighted(ImagePairMethod):
    metrics = ("loss", "model_mse", "winner_weight")

    def describe(self) -> str:
        return f"temperature {self.ctx.params.train.method_params.temperature:g}"

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = self.mse(self.ctx.model.unet, own_batch(self, unit))  # [2b]: this share's winners, then losers
        # The softmax spans the whole micro-batch (every process's rows), the loss this share's images.
        batch = [self.pairs[int(i)] for i in unit.micro_batch]
        rewards = torch.tensor([p.winner_score for p in batch] + [p.loser_score for p in batch], device=mse.device)
        out = reward_weighted_loss(mse, rewards, temperature=self.ctx.params.train.method_params.temperature,
                                   rows=unit.own(torch.arange(2 * len(batch)), copies=2))
        return out.loss, {"loss": out.loss.detach(), "model_mse": mse.detach().mean(),
                          "winner_weight": out.weights[: len(unit.rows)].mean()}
