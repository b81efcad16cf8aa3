"""MLflow as a service: a real `mlflow server` on 127.0.0.1 that the test stops and restarts.

With the server down a stage still runs, says so in one line naming the URI (within seconds, not MLflow's
~250 s of retries) and keeps what it logs in the workspace's pending store; registration retries, then
fails naming the URI with the weights untouched. With the server back, the next stage start re-logs the
pending run into the round's run, and registration succeeds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on loopback with a SQLite store and proxied artifacts, started and stopped at will."""

    def __init__(self, root: Path):
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        import requests

        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "server-artifacts")]
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - the server process owns it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     # the job runner is not needed here and costs ~10 s of start-up
                                     env={**os.environ, "MLFLOW_TRACKING_URI": "",
                                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} did not start in {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture()
def server(tmp_path, monkeypatch):
    import mlflow

    srv = MlflowServer(tmp_path)
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri("")


def test_stages_run_while_mlflow_is_down_and_are_relogged_when_it_is_back(server, tmp_path, capsys):
    import mlflow

    from prefdiff import tracking
    from prefdiff.data.baseline import tree_sha256
    from prefdiff.gate import GateRule
    from prefdiff.registry import register_model

    ws = tmp_path / "ws"
    ws.mkdir()
    exp_id = tracking.ensure_experiment("svc", ws)
    parent = mlflow.start_run(experiment_id=exp_id, run_name="round").info.run_id  # the flow's round run
    mlflow.end_run()
    os.environ["MLFLOW_RUN_ID"] = parent
    (ws / "grid.txt").write_text("a grid")
    capsys.readouterr()

    server.stop()
    began = time.time()
    with tracking.stage_run("sample", ws, "svc"):
        mlflow.log_params({"sample.num_prompts": 3})
        for step, value in enumerate((0.5, 0.25)):
            mlflow.log_metric("sample/loss", value, step=step)
        mlflow.log_artifact(str(ws / "grid.txt"), artifact_path="eval")
    # MLflow's defaults retry a dead server for ~250 s per call; here the probe is refused at once (what takes
    # time on a loaded machine is creating the pending SQLite store)
    assert time.time() - began < 60
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: MLflow at " + server.uri + " is unreachable")
    assert "connection refused" in err[0] and str(tracking.pending_dir(ws)) in err[0]
    assert os.environ["MLFLOW_RUN_ID"] == parent and os.environ["MLFLOW_TRACKING_URI"] == server.uri
    assert (tracking.pending_dir(ws) / "mlflow.db").is_file()
    for key, value in tracking.HTTP_DEFAULTS.items():
        assert os.environ[key] == value

    weights = ws / "models" / "trained"
    weights.mkdir(parents=True)
    (weights / "pytorch_lora_weights.safetensors").write_bytes(b"trained")
    before = tree_sha256(weights)
    metrics = {"trained_mean": 1.0, "base_mean": 0.0, "protocol_fingerprint": "p" * 64}

    def register():
        return register_model(root=ws, weights_dir=weights, eval_metrics=metrics,
                              model_config={"base_source": "builtin:tiny-sd"}, model_name="svc-model",
                              rule=GateRule("trained_mean", "base_mean"), experiment="svc", attempts=2,
                              retry_delay_s=0.5)

    began = time.time()
    with pytest.raises(tracking.TrackingUnavailable, match=f"MLflow at {server.uri} is unreachable .*tried 2 times"):
        register()
    assert time.time() - began < 60 and tree_sha256(weights) == before
    with pytest.raises(tracking.TrackingUnavailable, match=server.uri):
        tracking.require_server(ws, attempts=2, delay_s=0.2)

    server.start()
    capsys.readouterr()
    with tracking.stage_run("train", ws, "svc"):
        mlflow.log_metric("train/loss", 0.1)
    assert "logged 1 run(s) kept in" in capsys.readouterr().out
    assert not tracking.pending_dir(ws).exists()
    got = mlflow.MlflowClient().get_run(parent)
    assert got.data.params == {"sample.num_prompts": "3"}
    assert [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(parent, "sample/loss")] == \
        [(0, 0.5), (1, 0.25)]
    assert got.data.metrics["train/loss"] == 0.1
    assert got.data.tags["prefdiff.stage.sample"] == "done" and got.data.tags["prefdiff.stage.train"] == "done"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(parent, "eval")] == ["eval/grid.txt"]

    os.environ.pop("MLFLOW_RUN_ID")
    done = register()
    assert (done.version, done.alias) == (1, "champion")
    assert mlflow.MlflowClient().get_model_version_by_alias("svc-model", "champion").version == "1"
