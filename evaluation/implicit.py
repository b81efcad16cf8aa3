"""Implicit reward accuracy: does the trained model's implicit reward rank held-out preference pairs right?

DPO-style training defines a reward through the trained model and its reference (the base), so a trained
model can be scored as a preference classifier on pairs it never saw (Diffusion-DPO paper, Table 2).

- ``elbo_implicit_accuracy`` (Diffusion-DPO, Eq. 14): for each pair, K draws of (t, eps) shared by winner
  and loser; z_k = -(beta/2)[(m_w - m_l) - (r_w - r_l)] with m = ||eps - eps_trained(x_t)||^2 and r the
  base's, both means over C,H,W. The pair's implicit reward margin is the mean of z over the K draws; it
  counts as correct when > 0, half when exactly 0 (the sign does not depend on beta).
- ``trajectory_implicit_accuracy`` (D3PO): for each image, the summed per-step log-ratio
  sum_t [log pi_trained(x_{t-1}|x_t) - log pi_base(x_{t-1}|x_t)] over its stored trajectory (guided, as
  sampled); correct when the winner's sum is larger, half on equality.

Both are computed for a trained model whatever method trained it, so methods compare on one footing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.stats import wilson_interval
from prefdiff.progress import progress_bar


@dataclass(frozen=True)
class ImplicitAccuracy:
    kind: str  # "elbo" | "trajectory"
    pairs: int
    accuracy: float  # ties count half
    low: float  # Wilson interval on the accuracy
    high: float
    mean_margin: float  # mean implicit reward margin (z for elbo, summed log-ratio difference for trajectory)

    def as_dict(self) -> dict[str, float | int]:
        k = f"implicit_acc_{self.kind}"
        return {k: self.accuracy, f"{k}_low": self.low, f"{k}_high": self.high,
                f"{k}_pairs": self.pairs, f"{k}_mean_margin": self.mean_margin}


def _summarise(kind: str, margins: np.ndarray) -> ImplicitAccuracy:
    correct = float(np.sum(margins > 0) + 0.5 * np.sum(margins == 0))
    n = len(margins)
    ci = wilson_interval(correct, n)
    return ImplicitAccuracy(kind=kind, pairs=n, accuracy=correct / n if n else float("nan"),
                            low=ci[0], high=ci[1], mean_margin=float(np.mean(margins)) if n else float("nan"))


@torch.no_grad()
def _pair_mses(pipe, builder, rows: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Per-sample MSE [draws, 2B] (winners then losers) of ``pipe.unet`` under fixed (t, eps) draws."""
    from prefdiff.sampling.guidance import noise_pred
    from prefdiff.training.fit import rng
    from prefdiff.training.losses import per_sample_mse

    out = []
    for k in range(draws):
        gen = rng(seed, int(rows[0]), k)  # the same (t, eps) draws for base and trained, on any machine
        x_t, t, target, cond = builder.build(rows, gen, both=True)
        out.append(per_sample_mse(noise_pred(pipe.unet, x_t, t, cond), target).cpu())
    return torch.stack(out)


def elbo_implicit_accuracy(pipe, trained: Path, pairs: Sequence, *, beta: float = 5000.0, draws: int = 4,
                           seed: int = 0, batch_size: int = 8) -> ImplicitAccuracy:
    """Diffusion-DPO implicit accuracy of the model in ``trained`` (LoRA or full UNet) against ``pipe``'s base.

    ``pairs``: ImagePair list (winner first). Every draw's inputs come from a generator seeded by (seed, pair
    batch, draw), so the trained and base passes see identical x_t, t and eps.
    """
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.training.images import PairBatchBuilder

    builder = PairBatchBuilder(pipe, pairs, device=pipe.unet.device, empty_prompt_prob=0.0)
    batches = [torch.arange(i, min(i + batch_size, len(pairs))) for i in range(0, len(pairs), batch_size)]
    with progress_bar(desc="implicit accuracy (ELBO): base, then trained", total=2 * len(pairs), unit="pair") as bar:
        def mses(rows: torch.Tensor) -> torch.Tensor:
            out = _pair_mses(pipe, builder, rows, draws, seed)
            bar.update(len(rows))
            return out

        ref = [mses(rows) for rows in batches]
        with trained_weights(pipe, trained):
            pol = [mses(rows) for rows in batches]
    margins = []
    for m, r, rows in zip(pol, ref, batches):
        b = len(rows)
        z = -0.5 * beta * ((m[:, :b] - m[:, b:]) - (r[:, :b] - r[:, b:]))  # [draws, b]
        margins.append(z.double().mean(0))
    return _summarise("elbo", torch.cat(margins).numpy())


def trajectory_implicit_accuracy(pipe, trained: Path, trajectories, pairs: Sequence, *, guidance: float, eta: float,
                                 batch_size: int = 64) -> ImplicitAccuracy:
    """D3PO implicit accuracy: summed per-step log-ratio (trained vs base) of winner minus loser.

    ``pairs``: PreferencePair list of decided pairs over ``trajectories`` (a TrajectoryStore).
    """
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.sampling.guidance import encode_prompts
    from prefdiff.sampling.sampler import SamplingConfig
    from prefdiff.training.trajectory import reference_log_probs

    ids = sorted({i for p in pairs for i in (p.winner, p.loser)})
    row = {image_id: r for r, image_id in enumerate(ids)}
    chain, _ = trajectories.load(ids)
    prompts = [trajectories.prompt_of(i) for i in ids]
    unique = sorted(set(prompts))
    position = {p: i for i, p in enumerate(unique)}
    embeds = encode_prompts(pipe, unique)[torch.tensor([position[p] for p in prompts])].cpu()
    uncond = encode_prompts(pipe, [""])
    pipe.scheduler.set_timesteps(trajectories.num_steps, device=pipe.unet.device)
    cfg = SamplingConfig(num_steps=trajectories.num_steps, eta=eta, guidance_scale=guidance)

    # reference_log_probs batches the flat (image, step) list by batch_size; chunks of `per_chunk` images span
    # a multiple of batch_size transitions, so chunk by chunk forms the very same batches (the same numbers)
    # while the bar moves.
    per_chunk = math.lcm(batch_size, trajectories.num_steps) // trajectories.num_steps
    bar = progress_bar(desc="implicit accuracy (trajectory): base, then trained", total=2 * len(ids), unit="img")

    def summed() -> torch.Tensor:
        parts = []
        for start in range(0, len(ids), per_chunk):
            rows = slice(start, start + per_chunk)
            parts.append(reference_log_probs(pipe, chain[rows], trajectories.timesteps, embeds[rows], uncond, cfg,
                                             eta=eta, batch_size=batch_size).double().sum(1))
            bar.update(len(parts[-1]))
        return torch.cat(parts)

    with bar:
        base = summed()
        with trained_weights(pipe, trained):
            tuned = summed()
    return accuracy_of_log_ratios(tuned - base, row, pairs)  # [N] summed log pi_trained / pi_base per image


def accuracy_of_log_ratios(ratio: torch.Tensor, row_of: dict[int, int], pairs: Sequence) -> ImplicitAccuracy:
    """D3PO implicit accuracy from each image's summed per-step log-ratio ``ratio`` [N] (a policy against the
    base; ``row_of``: image id -> row): a pair is right when its winner's ratio is larger, half on equality."""
    margins = np.array([float(ratio[row_of[p.winner]] - ratio[row_of[p.loser]]) for p in pairs])
    return _summarise("trajectory", margins)


__all__ = ["ImplicitAccuracy", "accuracy_of_log_ratios", "elbo_implicit_accuracy", "trajectory_implicit_accuracy"]
