"""Reward-weighted denoising (Lee et al. 2023, the D3PO paper's "Reward Weighted" row) on both images of a pair:
each image's MSE weighted by batch * softmax(judge score / temperature)."""

from __future__ import annotations

import torch

from prefdiff.training.fit import Unit
from prefdiff.training.images import ImagePairMethod
from prefdiff.training.losses import reward_weighted_loss


class RewardWeighted(ImagePairMethod):
    metrics = ("loss", "model_mse", "winner_weight")

    def describe(self) -> str:
        return f"temperature {self.ctx.params.train.method_params.temperature:g}"

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, float]]:
        mse = self.mse(self.ctx.model.unet, self.batch(unit))  # [2B]: winners, then losers
        batch = [self.pairs[int(i)] for i in unit.rows]
        rewards = torch.tensor([p.winner_score for p in batch] + [p.loser_score for p in batch], device=mse.device)
        out = reward_weighted_loss(mse, rewards, temperature=self.ctx.params.train.method_params.temperature)
        return out.loss, {"loss": float(out.loss.detach()), "model_mse": float(mse.detach().mean()),
                          "winner_weight": float(out.weights[: len(batch)].mean())}
