"""What the trajectory methods (D3PO, DDPO) share: the stored chains in memory and their per-step log-probs.

The per-step log-prob is the guided DDIM Gaussian of the sampler (``ddim_step_with_logprob``), so a policy
scored here is the policy that sampled the chain; D3PO and DDPO differ only in their objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.models.processes import gather_to_all
from prefdiff.sampling.ddim import check_log_probs_defined, ddim_step_with_logprob
from prefdiff.sampling.guidance import Conditioning, guided_noise_pred
from prefdiff.training.fit import PromptTable


def step_log_probs(unet, scheduler, chain, timesteps, embeds, uncond, rows, step_index, *, guidance: float, eta: float):
    """log pi(x_{j+1} | x_j) of images ``rows`` [n] at step indices ``step_index`` [n]: ONE guided UNet call.

    chain [N, T+1, C, H, W] fp32 (CPU), timesteps [T], embeds a ``Conditioning`` of N rows (SD or SDXL),
    uncond a 1-row ``Conditioning``. Differentiable through the UNet (the policy); wrap in no_grad /
    adapters_disabled for the reference.
    """
    device = getattr(unet, "module", unet).device
    x = chain[rows, step_index].to(device)
    nxt = chain[rows, step_index + 1].to(device)
    t = timesteps[step_index].to(device)
    cond = embeds[rows].to(device)
    eps = guided_noise_pred(unet, x, t, cond, uncond.to(device).expand_as(cond), guidance)
    return ddim_step_with_logprob(scheduler, eps, t, x, eta=eta, prev_sample=nxt).log_prob


@torch.no_grad()
def reference_log_probs(pipe, chain, timesteps, embeds, uncond, cfg, *, eta: float, batch_size: int,
                        first_steps: int | None = None, bar=None, processes=None) -> torch.Tensor:
    """log pi_ref(x_{j+1} | x_j) for every image and step [N, T], with whatever adapter state ``pipe`` is in.

    chain [N, T+1, C, H, W] fp32, timesteps [T], embeds a ``Conditioning`` of N rows, uncond of 1 row.
    ``first_steps`` W: only the chain's first W steps, [N, W] (what a ``timestep_window`` trains on).
    ``bar``: the caller's progress bar (``prefdiff.progress``), advanced by the (image, step) pairs done.
    ``processes``: the accelerate state of the run's processes when several share the pass. The (image, step)
    pairs are cut into the batches of ``batch_size`` one process runs, process r of P runs batches r, r + P, ...
    and every process gets the whole table (``gather_to_all``): each batch holds what it holds in one process,
    so with the same kernels the table is the one-process table bit for bit.
    """
    n, steps = chain.shape[0], (chain.shape[1] - 1 if first_steps is None else first_steps)
    flat = [(i, j) for i in range(n) for j in range(steps)]
    starts = range(0, len(flat), batch_size)
    rank, count = (0, 1) if processes is None else (processes.process_index, processes.num_processes)

    def batch(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([i for i, _ in flat[start : start + batch_size]]),
                torch.tensor([j for _, j in flat[start : start + batch_size]]))

    mine: dict[int, torch.Tensor] = {}
    own, calls = starts[rank::count], -(-len(starts) // count)
    # Every process makes the same number of UNet calls: an FSDP-sharded UNet gathers its weights in each call,
    # a collective all processes must join, so a process one batch short reruns the pass's first batch and
    # drops the result.
    for call in range(calls):
        ii, jj = batch(own[call] if call < len(own) else starts[0])
        values = step_log_probs(pipe.unet, pipe.scheduler, chain, timesteps, embeds, uncond, ii, jj,
                                guidance=cfg.guidance_scale, eta=eta).cpu()
        if call < len(own):
            mine[own[call]] = values
            if bar is not None:
                bar.update(len(ii))
    out = torch.empty(n, steps)
    shares = [mine] if count == 1 else gather_to_all(mine, processes)
    for r, share in enumerate(shares):
        for start, values in share.items():
            ii, jj = batch(start)
            out[ii, jj] = values
            if bar is not None and r != rank:  # the other processes' pairs: the bar ends with the whole table
                bar.update(len(ii))
    return out


def check_timesteps(pipe, trajectories: TrajectoryStore, device) -> None:
    """Set the scheduler to the trajectories' step count and refuse a mismatch (another scheduler config) or a
    step whose log-prob is undefined."""
    pipe.scheduler.set_timesteps(trajectories.num_steps, device=device)
    check_log_probs_defined(pipe.scheduler)
    if not torch.equal(pipe.scheduler.timesteps.cpu().long(), trajectories.timesteps):
        raise ValueError(
            f"{trajectories.root}: trajectories were sampled at timesteps {trajectories.timesteps.tolist()[:4]}..., "
            f"the scheduler gives {pipe.scheduler.timesteps.tolist()[:4]}...; re-run the sample stage"
        )


@dataclass(frozen=True)
class TrajectoryImages:
    """The stored chains of some images, in memory, with their prompts' conditioning."""

    chain: torch.Tensor  # [N, T+1, C, H, W] fp32, CPU
    sampled_logp: torch.Tensor  # [N, T] log-probs at sampling time
    timesteps: torch.Tensor  # [T]
    embeds: Conditioning  # N rows, CPU
    uncond: Conditioning  # 1 row: the unconditional branch of guidance
    prompts: list[str]  # N

    @classmethod
    def load(cls, pipe, store: TrajectoryStore, image_ids: Sequence[int], device) -> TrajectoryImages:
        check_timesteps(pipe, store, device)
        chain, sampled_logp = store.load(list(image_ids))
        prompts = [store.prompt_of(i) for i in image_ids]
        table = PromptTable(pipe, prompts)
        return cls(chain, sampled_logp, store.timesteps, table.cond[table.rows(prompts)], table.empty, prompts)

    def log_probs(self, unet, scheduler, rows: torch.Tensor, step_index: torch.Tensor, sampling) -> torch.Tensor:
        """``step_log_probs`` of these images under ``unet`` with the sampling params' guidance and eta."""
        return step_log_probs(unet, scheduler, self.chain, self.timesteps, self.embeds, self.uncond, rows, step_index,
                              guidance=sampling.guidance_scale, eta=sampling.eta)


__all__ = ["TrajectoryImages", "reference_log_probs", "step_log_probs"]
