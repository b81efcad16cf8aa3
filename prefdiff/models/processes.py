"""The processes of one run: this process's accelerate state, and objects gathered to the main process.

Under ``accelerate launch`` (``train.num_processes``, ``sample.num_processes``, ``evaluate.num_processes``,
``rounds.num_processes`` > 1) every process runs the same code; training shares every micro-batch
(``prefdiff.training.fit``), sampling and the evaluation's image generation share their batches
(``shared_batches``: ``prefdiff.sampling.dataset``, ``evaluation.evaluate``; the rounds loop uses both), and only
the main process writes. Without a launcher there is one process and nothing
here talks to another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from prefdiff.config import Params


def process_state(params: Params):
    """accelerate's state of this process (``process_index``, ``num_processes``, ``is_main_process``, ``device``):
    the only process, or one of ``accelerate launch``'s. Made once per process, from ``model.device``: on the CPU
    the processes meet over gloo (accelerate's MULTI_CPU needs its cpu flag; without it each launched process
    would work alone), else on the launcher's GPU of each process."""
    from accelerate import PartialState

    from prefdiff.models.loading import resolve_device

    return PartialState(cpu=resolve_device(params.model.device).type == "cpu")


def process_device(params: Params, state) -> str:
    """The device this process loads the model on: ``model.device`` when it is the only process; a launched
    process's own (a GPU each; a CPU process's is "cpu:0", which ``model.device`` does not name)."""
    if state.num_processes == 1:
        return params.model.device
    return "cpu" if state.device.type == "cpu" else str(state.device)


_CPU_GROUP: list[Any] = []  # the gloo group of all processes, made once (every process makes it at the same call)


def cpu_group():
    """A gloo group of all processes: objects on the CPU travel through it whatever the default backend (NCCL
    would copy them to a GPU and back)."""
    import torch.distributed as dist

    if not _CPU_GROUP:
        _CPU_GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _CPU_GROUP[0]


def gather_to_main(obj: Any, state) -> list[Any] | None:
    """Every process's ``obj`` in process order on the main process, None on the others (a collective: every
    process calls it, the same number of times). Objects travel pickled in memory, between the processes of
    this run only; nothing pickled is ever stored."""
    import torch.distributed as dist

    if state.num_processes == 1:
        return [obj]
    gathered = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(obj, gathered, dst=0, group=cpu_group())
    return gathered


def wait_for_everyone(state) -> None:
    """Every process reaches this point before any goes on (the main process has written what it gathered)."""
    import torch.distributed as dist

    if state.num_processes > 1:
        dist.barrier(group=cpu_group())


Batch = TypeVar("Batch")
Result = TypeVar("Result")


def shared_batches(batches: Sequence[Batch], work: Callable[[Batch], Result], state) -> Iterator[list[Result]]:
    """``work`` of every batch, shared by the processes: process r of N runs batches r, r + N, r + 2N, ...; after
    each round of N batches the main process gathers their results (in memory, in process order) and yields them
    as one list, the round's r-th from process r, so the rounds put together are the results in batch order. The
    other processes yield nothing; one process yields every batch's result alone. A collective: every process
    calls it with the same batches, and the main process holds at most N results at a time."""
    n = state.num_processes
    for first in range(0, len(batches), n):
        mine = first + state.process_index
        result = work(batches[mine]) if mine < len(batches) else None  # the last round may leave some idle
        gathered = gather_to_main(result, state)
        if gathered is not None:
            yield gathered[:min(n, len(batches) - first)]


def gather_to_all(obj: Any, state) -> list[Any]:
    """Every process's ``obj`` in process order, on every process (a collective, as ``gather_to_main``): for a
    table every process needs whole after each computed a share of it. Pickled in memory over ``cpu_group``."""
    import torch.distributed as dist

    if state.num_processes == 1:
        return [obj]
    gathered: list[Any] = [None] * state.num_processes
    dist.all_gather_object(gathered, obj, group=cpu_group())
    return gathered
