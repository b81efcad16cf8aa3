"""Debris of killed writers: a dead process's ``<name>.tmp-<pid>`` (directory or file) is removed by the next
atomic write into that directory, a live process's is left alone, and a dataset moved aside by a writer
killed inside ``commit_dir`` is put back."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prefdiff.data.atomic import atomic_dir, atomic_write_json

from conftest import REPO

# A writer that builds <out>.tmp-<pid>/ (as every dataset writer does), reports the path, then waits to be killed.
_WRITER = """
import sys, time
from pathlib import Path
from prefdiff.data.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "shard-00000.safetensors").write_bytes(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(600)
"""


def _start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir() and tmp.name == f"{out.name}.tmp-{proc.pid}"
    return proc, tmp


def test_next_write_removes_a_killed_writers_temp_dir_and_keeps_a_live_ones(tmp_path, capsys):
    out = tmp_path / "data/trajectories"
    alive, live_tmp = _start_writer(out)  # another process still writing (its own temp dir)
    killed, dead_tmp = _start_writer(out)
    killed.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs
    killed.wait()
    dead_file = tmp_path / "data" / f"index.json.tmp-{killed.pid}"  # a file-level temp of the same dead writer
    dead_file.write_text("{")
    try:
        assert dead_tmp.is_dir()  # the kill left it
        with atomic_dir(out) as tmp:  # the next run's write
            (tmp / "index.json").write_text("{}")
        assert (out / "index.json").read_text() == "{}"
        assert not dead_tmp.exists() and not dead_file.exists()
        assert live_tmp.is_dir() and (live_tmp / "shard-00000.safetensors").stat().st_size == 4096
        lines = capsys.readouterr().err.splitlines()
        assert sorted(lines) == sorted(f"removed stale {p} (left by process {killed.pid}, which is no longer running)"
                                       for p in (dead_tmp, dead_file))
    finally:
        alive.kill()
        alive.wait()


def test_file_writes_remove_dead_temp_files(tmp_path, capsys):
    """metrics/eval.json.tmp-<pid> of a killed evaluate goes with the next metrics write; a live pid's stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    stale = metrics / f"eval.json.tmp-{dead_pid}"
    stale.write_text('{"win_rate": 0.5')
    hidden = metrics / f".grid.png.tmp-{dead_pid}"  # the PNG temp name evaluation/grid.py used before
    hidden.write_bytes(b"\x89PNG")
    live = metrics / f"train.json.tmp-{os.getppid()}"  # the process that started pytest is running
    live.write_text("{")
    atomic_write_json(metrics / "eval.json", {"win_rate": 0.75})
    assert not stale.exists() and not hidden.exists() and live.exists()
    assert len(capsys.readouterr().err.splitlines()) == 2
    assert (metrics / "eval.json").read_text() == '{\n  "win_rate": 0.75\n}\n'


def test_a_dataset_moved_aside_by_a_killed_commit_is_restored(tmp_path, capsys):
    """Killed between commit_dir's two renames: <out> is missing and <out>.old-<pid> holds the last dataset."""
    from prefdiff.data.atomic import remove_stale_siblings

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    data = tmp_path / "data"
    aside = data / f"preferences.old-{pid}"
    aside.mkdir(parents=True)
    (aside / "pairs.jsonl").write_text('{"pair": 1}\n')
    (data / f"preferences.tmp-{pid}").mkdir()  # the half-committed new one
    assert remove_stale_siblings(data) == [aside, data / f"preferences.tmp-{pid}"]
    assert (data / "preferences/pairs.jsonl").read_text() == '{"pair": 1}\n'
    assert sorted(p.name for p in data.iterdir()) == ["preferences"]
    err = capsys.readouterr().err
    assert re.search(rf"^restored {re.escape(str(data / 'preferences'))} from preferences.old-{pid} ", err, re.M)


@pytest.mark.parametrize("name", ["trajectories.tmp-", "trajectories.tmp-x1", "notes.tmp", "run.tmp-12a"])
def test_names_that_are_not_temp_siblings_are_kept(tmp_path, name):
    from prefdiff.data.atomic import remove_stale_siblings

    (tmp_path / name).write_text("keep")
    assert remove_stale_siblings(tmp_path) == [] and (tmp_path / name).read_text() == "keep"
