"""Failures of a long run said in one line that names what to change.

``RunError`` is what sampling and training raise when a run cannot usefully go on (non-finite numbers, a
policy that learns nothing, out of memory); its message is one line naming the params keys to change, and
the stages print it as ``error: <message>`` with exit status 2, no traceback.
"""

from __future__ import annotations

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


__all__ = ["NumericsError", "OutOfMemory", "RunError", "is_out_of_memory", "memory_knobs"]
