"""Progress bars for long phases: count, rate and ETA, readable in a terminal and in a log.

The stages run under ``dvc repro``, often inside a Prefect flow that logs the stage's output line by line
(``flows.round.stream_command``). In a terminal a bar redraws in place twice a second; anywhere else (a
pipe, a log file, Prefect) it redraws at most every ``LOG_INTERVAL_S`` seconds, each redraw one line of
ASCII at a fixed width (``_LogLines``), so a long phase gives a readable log line with its rate and ETA
every few seconds instead of thousands of fragments. The last redraw (on close)
always shows the final count, the elapsed time and the mean rate.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

TERMINAL_INTERVAL_S = 0.5
LOG_INTERVAL_S = 10.0
LOG_WIDTH = 100  # characters of a bar's log line


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 **options: Any):
    """A ``tqdm`` bar on stderr (rate and ETA in its line), redrawn as described in the module docstring.

    ``with progress_bar(desc="evaluate: sampling", total=n, unit="img") as bar: ... bar.update(k)``, or
    iterate ``progress_bar(items, desc=...)``. ``options`` go to tqdm unchanged (``postfix``, ``leave``, ...).
    """
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    settings: dict[str, Any] = {"desc": desc, "total": total, "unit": unit,
                                "file": sys.stderr if terminal else _LogLines(sys.stderr),
                                "mininterval": TERMINAL_INTERVAL_S if terminal else LOG_INTERVAL_S,
                                "dynamic_ncols": terminal, "ascii": not terminal}
    if not terminal:
        settings["ncols"] = LOG_WIDTH
    return tqdm(iterable, **(settings | options))


class _LogLines:
    """tqdm's output for a log: each redraw one line ending in ``\n`` (tqdm starts a frame with ``\r`` and
    ends it with nothing, so a line printed next, to stdout, would otherwise continue the bar's line)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        frame = text.replace("\r", "").rstrip()  # tqdm pads a shorter frame with spaces; a bare "\n" closes
        if frame:
            self.stream.write(frame + "\n")

    def flush(self) -> None:
        self.stream.flush()


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


__all__ = ["LOG_INTERVAL_S", "TERMINAL_INTERVAL_S", "above_bars", "progress_bar"]
