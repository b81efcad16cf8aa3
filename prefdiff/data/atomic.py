"""Atomic file and directory writes, and streamed sha256.

Every file a later pipeline step reads is written to a temporary sibling and moved into place with
``os.replace`` (atomic on POSIX within one filesystem), so a crash leaves either the old file or the new
one, never a half-written one. Directories get the same treatment through :func:`atomic_dir`: the whole
dataset is built in ``<final>.tmp-<pid>`` and swapped in only when complete.

A killed process leaves its ``<name>.tmp-<pid>`` (and, killed between the two renames of
:func:`commit_dir`, its ``<name>.old-<pid>``) behind: GBs of latents on a real model. The first atomic write
of a process into a directory therefore removes the temp siblings there whose pid no longer runs (and puts
an orphaned ``.old`` back where its final name is missing); a live pid's are left alone, since that process
may still be writing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20  # 1 MiB: bounded memory when hashing multi-GB shards
# What tmp_sibling names: <name>.<tag>-<pid>; ".<name>.tmp-<pid>" (older PNG writes) matches too.
_SIBLING = re.compile(r"^(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>[0-9]+)$")
# Directories this process has swept already: one listdir per directory per process, not per file written
# (a dataset writes thousands of PNGs into one directory).
_swept: set[Path] = set()


def tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    """``<path>.<tag>-<pid>`` in the same directory (same filesystem, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{tag}-{os.getpid()}")


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal belongs to another
    user: it exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(directory: Path) -> list[Path]:
    """Remove the ``<name>.tmp-<pid>`` / ``<name>.old-<pid>`` entries of ``directory`` whose pid is not running.

    An ``.old`` sibling whose ``<name>`` is missing is the previous dataset of a process killed inside
    :func:`commit_dir`: it is renamed back instead of removed. Each action is reported in one line on stderr.
    Returns the entries removed or restored. Runs once per directory per process.
    """
    directory = Path(directory)
    key = directory.resolve()
    if key in _swept:
        return []
    _swept.add(key)
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    acted: list[Path] = []
    for entry in entries:
        match = _SIBLING.match(entry.name)
        if match is None or pid_running(int(match["pid"])):
            continue
        final = entry.with_name(match["name"])
        why = f"left by process {match['pid']}, which is no longer running"
        if match["tag"] == "old" and not final.exists():
            with contextlib.suppress(FileNotFoundError):  # another process restored it first
                os.replace(entry, final)
                _note(f"restored {final} from {entry.name} ({why}: killed while replacing it)")
                acted.append(entry)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        _note(f"removed stale {entry} ({why})")
        acted.append(entry)
    return acted


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk, so a rename never publishes a file whose bytes are lost."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory entry table (makes renames durable); ignored where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``<name>.tmp-<pid>`` + fsync + ``os.replace``."""
    atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: Path, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    """:func:`atomic_write_bytes` of the concatenated ``chunks``, without concatenating them in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path.parent)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Pretty JSON (sorted keys are NOT used: key order is part of how humans read the index)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def prepare_tmp_dir(final_dir: Path) -> Path:
    """Create an empty ``<final>.tmp-<pid>`` (removing a stale one left by this same pid, and dead
    processes' temp siblings: :func:`remove_stale_siblings`)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final_dir.parent)
    tmp = tmp_sibling(final_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a completed ``tmp_dir`` into ``final_dir``.

    Two renames (old aside, new in) then delete the old one: a directory cannot be ``os.replace``-d over a
    non-empty directory. The window between the renames is two syscalls; a crash there leaves the old data
    intact under ``<final>.old-<pid>``.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = tmp_sibling(final_dir, "old")
    if old.exists():
        shutil.rmtree(old)
    had_old = final_dir.exists()
    if had_old:
        os.replace(final_dir, old)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if had_old:  # put the previous dataset back
            os.replace(old, final_dir)
        raise
    fsync_dir(final_dir.parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def discard_dir(tmp_dir: Path) -> None:
    """Remove a temporary directory (after a failure); missing is fine."""
    shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: Path) -> Iterator[Path]:
    """Yield a temp sibling dir; on success it replaces ``final_dir``, on exception it is deleted.

    >>> with atomic_dir(Path("data/preferences")) as tmp:   # doctest: +SKIP
    ...     (tmp / "pairs.jsonl").write_text("...")
    """
    final_dir = Path(final_dir)
    tmp = prepare_tmp_dir(final_dir)
    try:
        yield tmp
    except BaseException:
        discard_dir(tmp)
        raise
    try:
        commit_dir(tmp, final_dir)
    except BaseException:
        discard_dir(tmp)
        raise
