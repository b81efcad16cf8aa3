"""An image method's batch for one process's share of a micro-batch, with the draws of the whole micro-batch."""

from __future__ import annotations

from dataclasses import replace

import torch

from prefdiff.training.fit import Unit


def own_batch(method, unit: Unit):
    """(x_t, t, target, cond) of ``unit.rows`` of an ``ImagePairMethod`` (winners, then losers when it scores both).

    The builder draws the posterior noise, eps, t and caption dropout for the whole micro-batch in one sequence
    from the micro-batch's generator, so each process builds all of it and keeps its share: N processes train
    on the draws one process does (the VAE encodes the whole micro-batch on every process; the UNet, forward
    and backward, runs on the share only).
    """
    if len(unit.rows) == len(unit.micro_batch):  # the only process: its share is the whole micro-batch
        return method.batch(unit)
    x_t, t, target, cond = method.batch(replace(unit, rows=unit.micro_batch))
    index = unit.own(torch.arange(len(t)), copies=2 if method.both else 1).to(x_t.device)
    return x_t[index], t[index], target[index], cond[index]
