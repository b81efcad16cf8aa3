"""Failures of a long run said in one line that names what to change, and the progress bar of every long phase.

``RunError`` is what sampling and training raise when a run cannot usefully go on (non-finite numbers, a
policy that learns nothing, out of memory); its message is one line naming the params keys to change, and
the stages print it as ``error: <message>`` with exit status 2, no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class RunError(RuntimeError):
    """A run stopped for a reason the user can fix: the message names the keys to change."""


class NumericsError(RunError):
    """Non-finite log-probs, losses or gradients, or a training run whose policy did not change."""


class OutOfMemory(RunError):
    """The accelerator (or the host) ran out of memory; the message lists the knobs that use less."""


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), or a RuntimeError of an allocator that could not allocate."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextmanager
def memory_knobs(where: str, knobs: Sequence[str]) -> Iterator[None]:
    """Turn an out-of-memory error raised inside into ``OutOfMemory`` naming ``where`` it happened and the
    ``knobs`` (params keys with their current values and what to set) that reduce memory."""
    try:
        yield
    except RunError:
        raise
    except (RuntimeError, MemoryError) as err:
        if not (isinstance(err, MemoryError) or is_out_of_memory(err)):
            raise
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise OutOfMemory(f"out of memory {where} ({first}); to use less memory: {'; '.join(knobs)}") from err


def progress_bar(total: int, desc: str, unit: str, *, initial: int = 0):
    """A tqdm bar on stderr with rate and ETA, readable in a log too: on a terminal it redraws at most twice
    a second; elsewhere (a Prefect or DVC log, where every redraw becomes a line) at most every 30 s, at a
    fixed width. ``TQDM_DISABLE=1`` turns every bar off."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5 if tty else 30.0,
                dynamic_ncols=tty, ncols=None if tty else 100, ascii=not tty)


@contextmanager
def above_bars() -> Iterator[None]:
    """Print a line above the progress bars: on a terminal they are cleared first and redrawn below it
    (elsewhere every redraw is a line of its own anyway)."""
    if not sys.stderr.isatty():
        yield
        return
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        yield


__all__ = ["NumericsError", "OutOfMemory", "RunError", "above_bars", "is_out_of_memory", "memory_knobs", "progress_bar"]
