"""A labeling workspace and a real labeling server process, shared by the server and browser tests.

``make_label_workspace`` writes params.yaml (the repo's, with ``label.human`` overrides) and a small trajectory
store through the real ``TrajectoryWriter`` (zero latents; each PNG a coloured square with its image id, so a
screenshot shows which image is which). ``LabelServer`` runs ``python -m prefdiff.labeling.server`` on
127.0.0.1 with ``--port 0`` and reads the URL it prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import yaml
from PIL import Image, ImageDraw

from prefdiff.profile import merged

REPO = Path(__file__).resolve().parents[1]
PALETTE = [(214, 69, 65), (52, 152, 219), (46, 160, 67), (243, 156, 18), (142, 68, 173), (26, 188, 156),
           (127, 140, 141)]


def id_image(image_id: int, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), PALETTE[image_id % len(PALETTE)])
    ImageDraw.Draw(im).text((3, 3), str(image_id), fill=(255, 255, 255))
    return im


def write_store(out: Path, num_groups: int, group_size: int) -> None:
    import torch

    from prefdiff.data.trajectories import TrajectoryGroup, TrajectoryWriter

    with TrajectoryWriter(out, shard_size=64, model={"source": "test"}, params={}) as w:
        for g in range(num_groups):
            w.add_group(TrajectoryGroup(
                prompt=f"a handwritten digit {g % 10}", seed=g,
                latents=torch.zeros(group_size, 3, 4, 2, 2), log_probs=torch.zeros(group_size, 2),
                timesteps=torch.tensor([500, 0]),
                images=[id_image(g * group_size + k) for k in range(group_size)],
            ))


def make_label_workspace(root: Path, *, num_groups: int, group_size: int = 2, human: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = merged(yaml.safe_load((REPO / "params.yaml").read_text()), {"label": {"human": human or {}}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_store(root / "data" / "trajectories", num_groups, group_size)
    return root


class LabelServer:
    """``python -m prefdiff.labeling.server --workspace ws --port 0 ...`` as a child process."""

    def __init__(self, workspace: Path, *args: str, token: str | None = None, startup_s: float = 90.0) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env.pop("PREFDIFF_LABEL_TOKEN", None)
        if token is not None:
            env["PREFDIFF_LABEL_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefdiff.labeling.server", "--workspace", str(workspace), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self.url = ""
        ready = threading.Event()

        def pump_stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("labeling page: "):
                    self.url = line.split()[2].rstrip("/")
                    ready.set()
            ready.set()

        def pump_stderr() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line.rstrip("\n"))

        threading.Thread(target=pump_stdout, daemon=True).start()
        threading.Thread(target=pump_stderr, daemon=True).start()
        if not ready.wait(startup_s) or not self.url:
            self.kill()
            raise RuntimeError(f"label server did not start; stdout {self.lines}; stderr {self.stderr[-20:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the crash the durability guarantee is about)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_server_expecting_failure(workspace: Path, *args: str, env_extra: dict | None = None,
                                 timeout: float = 90.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PREFDIFF_LABEL_TOKEN", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "prefdiff.labeling.server", "--workspace", str(workspace), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False
