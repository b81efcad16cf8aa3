"""Diffusion-DPO (Wallace et al., CVPR 2024, Eq. 14) on pairs of final images.

Winner and loser share eps and t (``PairBatchBuilder``); the per-sample MSE over C,H,W in fp32 of the policy
and of the reference (adapters disabled, or a frozen copy of the starting UNet) feed ``diffusion_dpo_loss``
with beta in the official convention (``train.diffusion_dpo.official_beta``).
"""

from __future__ import annotations

import torch

from prefdiff.training.fit import Unit
from prefdiff.training.images import ImagePairMethod
from prefdiff.training.methods.shares import own_batch
from prefdiff.training.losses import diffusion_dpo_loss


class DiffusionDPO(ImagePairMethod):
    metrics = ("loss", "implicit_acc", "model_mse", "ref_mse", "margin")
    needs_reference_copy = True

    def describe(self) -> str:
        return f"beta {self.ctx.params.train.method_params.official_beta:g} (official convention)"

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model, batch, b = self.ctx.model, own_batch(self, unit), len(unit.rows)
        mse = self.mse(model.unet, batch)  # [2B]: winners, then losers
        with model.reference() as ref_unet:
            ref_mse = self.mse(ref_unet, batch)
        out = diffusion_dpo_loss(mse[:b], mse[b:], ref_mse[:b], ref_mse[b:],
                                 beta=self.ctx.params.train.method_params.official_beta)
        return out.loss, {k: getattr(out, k).detach() for k in self.metrics}
