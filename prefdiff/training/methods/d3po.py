"""D3PO (Yang et al., CVPR 2024): DPO at every denoising step of preferred/dispreferred trajectory pairs (Eq. 14).

Per unit (one micro-batch of pairs at one step of each pair's random permutation, drawn by ``fit``): ONE
batched guided UNet forward of the policy on both images of every pair scores the stored next latent, and
``d3po_loss`` compares it with the reference's log-prob. Faster and leaner than the official loop
(yk7333/d3po scripts/train.py) without changing the math:
- the reference policy never changes during a round, so its log-probs are computed once per (image, step)
  before training, batched, under no_grad (adapters disabled = base, or the round's start adapter for
  "previous_round", or the starting UNet when fine-tuning it fully), instead of once per epoch with a
  deep-copied UNet; they are saved with every checkpoint, so a resumed run does not recompute them; N processes
  (``train.num_processes``) share that pass, batch by batch, and gather the whole table;
- policy forwards batch both images and both guidance branches into one UNet call.
"""

from __future__ import annotations

import torch

from prefdiff.progress import progress_bar
from prefdiff.training.fit import FitContext, Method, Unit
from prefdiff.training.losses import d3po_loss
from prefdiff.training.trajectory import TrajectoryImages, reference_log_probs


# (image, step) pairs per reference forward: the batches one process runs, which N processes share out whole
REFERENCE_BATCH = 64


class D3PO(Method):
    data = "trajectories"
    metrics = ("loss", "implicit_acc", "clip_frac", "mean_log_ratio")

    def __init__(self, ctx: FitContext) -> None:
        super().__init__(ctx)
        self.options = ctx.params.train.method_params
        pairs = ctx.preferences.training_pairs()
        if not pairs:
            raise ValueError(f"{ctx.preferences.root}: no decided preference pairs (all ties?); nothing to train on")
        # Only the images that appear in pairs, kept in memory (fp32 chains).
        image_ids = sorted({i for p in pairs for i in (p.winner, p.loser)})
        row_of = {image_id: row for row, image_id in enumerate(image_ids)}
        self.images = TrajectoryImages.load(ctx.model.pipe, ctx.trajectories, image_ids, ctx.model.device)
        self.winners = torch.tensor([row_of[p.winner] for p in pairs])
        self.losers = torch.tensor([row_of[p.loser] for p in pairs])
        self.items = len(pairs)
        self.timestep_fraction = self.options.timestep_fraction
        self.timestep_window = self.options.timestep_window

    def precompute(self) -> dict[str, torch.Tensor]:
        """log pi_ref [N, W] of every image and trained step (W: the window, else T), from the model as the round
        starts (before any update)."""
        tp, model, images = self.ctx.params.train, self.ctx.model, self.images
        if tp.finetune == "full":
            reference = "starting UNet"
        else:
            reference = "base UNet (adapters disabled)" if tp.reference == "base" else f"start adapter {tp.init_lora}"
        steps = images.timesteps.numel() if self.timestep_window is None else self.timestep_window
        self.ctx.progress(f"reference log-probs for {images.chain.shape[0]} images x {steps} "
                          f"steps from the {reference}")
        sampling = self.ctx.params.sampling
        acc = model.accelerator
        with (model.starting_reference(),
              progress_bar(desc="reference log-probs", total=images.chain.shape[0] * steps, unit="img-step",
                           disable=not acc.is_main_process) as bar):
            ref_logp = reference_log_probs(model.pipe, images.chain, images.timesteps, images.embeds, images.uncond,
                                           sampling, eta=sampling.eta, batch_size=REFERENCE_BATCH,
                                           first_steps=self.timestep_window, bar=bar, processes=acc)
        return {"ref_logp": ref_logp}

    def describe(self) -> str:
        return f"beta {self.options.beta:g}, clip_eps {self.options.clip_eps:g}"

    def loss(self, unit: Unit) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model, idx = self.ctx.model, unit.step_index  # idx [b]: one step per pair, shared by winner and loser
        w, l = self.winners[unit.rows], self.losers[unit.rows]
        b = len(unit.rows)
        # winners and losers, both guidance branches: one UNet call of 4b inputs
        logp = self.images.log_probs(model.unet, model.pipe.scheduler, torch.cat([w, l]), torch.cat([idx, idx]),
                                     self.ctx.params.sampling)
        policy = torch.stack([logp[:b], logp[b:]], dim=1)  # [b, 2] (winner, loser)
        ref_logp = self.precomputed["ref_logp"]
        ref = torch.stack([ref_logp[w, idx], ref_logp[l, idx]], dim=1).to(model.device)
        out = d3po_loss(policy, ref, torch.ones(b, device=model.device), beta=self.options.beta,
                        clip_eps=self.options.clip_eps)
        return out.loss, {k: getattr(out, k).detach() for k in self.metrics}
