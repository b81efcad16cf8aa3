"""SFT on the preferred images (official Diffusion-DPO ``--sft``): the plain denoising MSE of the winners."""

from __future__ import annotations

import torch

from prefdiff.training.fit import Unit
from prefdiff.training.images import ImagePairMethod
from prefdiff.training.methods.shares import own_batch
from prefdiff.training.losses import sft_loss


class SFT(ImagePairMethod):
    metrics = ("loss", "model_mse")
    both = False

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = self.mse(self.ctx.model.unet, own_batch(self, unit))  # [b] winners only
        loss = sft_loss(mse)
        return loss, {"loss": loss.detach(), "model_mse": mse.detach().mean()}
