"""Operations on shared servers, run for real on loopback: an MLflow tracking server with proxied artifacts, a DVC
remote that a fresh clone pulls from, a Prefect process work pool whose worker runs the project's deployment,
and the Docker / Kubernetes work-pool job templates validated by the workers' own configuration classes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from conftest import REPO, dvc, git, isolated_mlflow, make_workspace, venv_env
from stages._common import free_port

BIN = Path(sys.executable).parent


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:2]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def server(cmd: list[str], health: str, cwd: Path, log: Path,
           env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``cmd`` running in its own process group until the block ends (then the whole group is stopped)."""
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or venv_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_http(health, proc)
            yield proc
        except BaseException:
            print(log.read_text()[-3000:])
            raise
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()


# -- MLflow: tracking server with proxied artifacts ---------------------------------------------------------------

def mlflow_server_cmd(store: Path, artifacts: Path, port: int) -> list[str]:
    """The README's server command on loopback: runs and registry in ``store``, artifacts proxied by the server
    into ``artifacts`` (clients see only mlflow-artifacts:/ URIs and never write to that directory themselves)."""
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}", "--serve-artifacts",
            "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def _uris(store: Path) -> dict[str, list[str]]:
    """Every location the store records: experiments, runs, logged models and model versions."""
    db = sqlite3.connect(store)
    try:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
        columns = {"experiments": ["artifact_location"], "runs": ["artifact_uri"],
                   "model_versions": ["source", "storage_location"], "logged_models": ["artifact_location"]}
        return {f"{t}.{c}": [r[0] for r in db.execute(f"select {c} from {t}") if r[0]]
                for t, cols in columns.items() if t in tables for c in cols}
    finally:
        db.close()


def test_mlflow_server_proxies_artifacts_and_stores_no_local_paths(tmp_path):
    """A run logged and a model registered through `mlflow server --serve-artifacts` land in the server's
    artifact store, the tracking store holds only server-relative URIs, and the champion downloads back."""
    from prefdiff.gate import GateRule
    from prefdiff.registry import register_model, resolve_baseline

    host_dir, client_dir = tmp_path / "server", tmp_path / "client"
    host_dir.mkdir()
    ws = make_workspace(client_dir / "ws")  # a git workspace: registration records its lineage
    lora = ws / "models" / "trained"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"lora-weights")
    port = free_port()
    cmd = mlflow_server_cmd(host_dir / "mlflow.db", host_dir / "artifacts", port)
    with server(cmd, f"http://127.0.0.1:{port}/health", host_dir, tmp_path / "mlflow-server.log"):
        with isolated_mlflow(f"http://127.0.0.1:{port}"):
            import mlflow

            reg = register_model(root=ws, weights_dir=lora, eval_metrics={"trained_mean": 1.0, "base_mean": 0.5,
                                                                          "protocol_fingerprint": "p" * 64},
                                 model_config={"base_source": "builtin:tiny-sd"}, model_name="served-model",
                                 rule=GateRule("trained_mean", "base_mean", 0.0), experiment="ops")
            assert (reg.version, reg.alias) == (1, "champion")
            client = mlflow.MlflowClient()
            mv = client.get_model_version("served-model", "1")
            run = client.get_run(mv.run_id)
            assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
            # the champion comes back through the server's proxy into the workspace
            ref, _ = resolve_baseline(ws, "champion", "served-model")
            assert ref.version == 1
            assert (ws / "models/baseline/pytorch_lora_weights.safetensors").read_bytes() == b"lora-weights"

    uris = _uris(host_dir / "mlflow.db")
    assert uris["experiments.artifact_location"] and uris["runs.artifact_uri"] and uris["model_versions.source"]
    machine_paths = (str(tmp_path), str(REPO), str(Path.home()), "file:")
    for column, values in uris.items():
        for value in values:
            assert not value.startswith("/") and not any(p in value for p in machine_paths), (column, value)
            assert value.startswith(("mlflow-artifacts:/", "models:/")), (column, value)
    # the artifacts are on the server's side, the client's directory holds none
    assert [p.name for p in (host_dir / "artifacts").rglob("MLmodel")] == ["MLmodel"]
    assert list((host_dir / "artifacts").rglob("pytorch_lora_weights.safetensors"))
    assert not (client_dir / "mlartifacts").exists() and not list(client_dir.rglob("MLmodel"))


# -- DVC: a local-directory remote -------------------------------------------------------------------------------

def test_dvc_remote_push_then_a_fresh_clone_pulls_and_repro_is_a_noop(tmp_path, mlflow_uri):
    """The round's first two stages (the project's own sample and label, tiny), pushed to a directory remote;
    a clone of the git repo pulls and finds every stage up to date: it re-runs nothing."""
    ws = make_workspace(tmp_path / "ws", {"model": {"source": "builtin:tiny-sd"}, "sampling": {"num_steps": 4},
                                         "train": {"d3po": {"timestep_window": 2}},
                                         "sample": {"num_prompts": 2, "groups_per_prompt": 1, "images_per_group": 2}})
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())
    spec["stages"] = {name: spec["stages"][name] for name in ("sample", "label")}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (ws / ".dvcignore").write_text((REPO / ".dvcignore").read_text())  # bytecode never enters a code dep's hash
    remote = tmp_path / "remote"
    dvc(ws, "remote", "add", "-d", "local", str(remote))
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "two stages, local remote")

    ran = dvc(ws, "repro")
    assert "Running stage 'sample'" in ran and "Running stage 'label'" in ran
    pushed = dvc(ws, "push")
    assert "pushed" in pushed and any(remote.rglob("*"))
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "round")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws), str(clone))
    assert not (clone / "data/trajectories").exists()
    dvc(clone, "pull")
    for path in ("data/trajectories/index.json", "data/preferences/index.json"):
        assert (clone / path).read_bytes() == (ws / path).read_bytes(), path
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    again = dvc(clone, "repro")
    assert "Running stage" not in again
    assert "'sample' didn't change, skipping" in again and "'label' didn't change, skipping" in again


# -- Prefect: a process work pool and a worker running the project's deployment ------------------------------------

def _prefect(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout + proc.stderr


async def _run_deployment(pool: str, deployment: str, parameters: dict, worker: list[str], env: dict[str, str],
                          log: Path, timeout: float = 480):
    """Create a run of ``deployment``, start the worker command, wait until the run is final, stop the worker;
    returns the final flow run."""
    from prefect import get_client

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        run = await client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        with log.open("w") as out:
            proc = subprocess.Popen(worker, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                deadline = time.time() + timeout
                while time.time() < deadline:
                    run = await client.read_flow_run(run.id)
                    if run.state is not None and run.state.is_final():
                        return run
                    assert proc.poll() is None, log.read_text()[-3000:]
                    await asyncio.sleep(2)
                raise TimeoutError(f"flow run {run.id} not final after {timeout} s: {run.state}\n"
                                   + log.read_text()[-3000:])
            finally:
                os.killpg(proc.pid, 2)  # Ctrl-C: the worker stops polling and exits
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()


def test_process_work_pool_worker_runs_the_projects_deployment(prefect_harness, tmp_path, mlflow_uri):
    """prefect.yaml's nightly-round, deployed by `prefect deploy` to a process work pool; the worker started as the
    README says (`prefect worker start --pool prefdiff-local --limit 1`) picks up a run of it, which runs the
    sample stage in a tiny workspace and logs into MLflow."""
    import mlflow
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    ws = make_workspace(tmp_path / "ws", {"model": {"source": "builtin:tiny-sd"}, "sampling": {"num_steps": 4},
                                         "train": {"d3po": {"timestep_window": 2}},
                                         "sample": {"num_prompts": 2, "groups_per_prompt": 1, "images_per_group": 2}})
    env = venv_env({"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect-cli"),
                    "PYTHONPATH": str(REPO)})
    pool = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)

    asyncio.run(create_pool())
    deployed = _prefect(["--no-prompt", "deploy", "--name", "nightly-round"], env)
    assert "preference-round/nightly-round" in deployed
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"]
    run = asyncio.run(_run_deployment(pool, "preference-round/nightly-round",
                                      {"repo": str(ws), "stages": ["sample"], "run_name": "from-the-worker"},
                                      worker, env, tmp_path / "worker.log"))
    worker_log = (tmp_path / "worker.log").read_text()
    assert (run.state.type.value, run.work_pool_name) == ("COMPLETED", pool), worker_log[-3000:]
    assert (ws / "data/trajectories/index.json").is_file()  # the stage ran in the workspace the run was given
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("prefdiff").experiment_id])
    assert [(r.info.run_name, r.data.tags.get("prefect.flow_run_id")) for r in runs] == [
        ("from-the-worker", str(run.id))]


# -- Docker / Kubernetes GPU work pools: templates, deployments, image ---------------------------------------------

def test_gpu_job_templates_render_with_the_workers_own_configuration(prefect_harness):
    """deploy/*.json are what deploy/make_job_templates.py writes from the installed workers' defaults, and each
    renders through its worker's configuration class into a job that asks for the GPU."""
    import asyncio

    import docker.types
    from prefect_docker.worker import DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import make_job_templates
    finally:
        sys.path.remove(str(REPO / "deploy"))
    docker_t = json.loads((REPO / "deploy/docker-gpu.json").read_text())
    k8s_t = json.loads((REPO / "deploy/kubernetes-gpu.json").read_text())
    assert docker_t == make_job_templates.docker_template() and k8s_t == make_job_templates.kubernetes_template()

    docker_cfg = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(docker_t, {}))
    assert docker_cfg.image == "prefdiff:latest" and docker_cfg.env["HF_HUB_OFFLINE"] == "1"
    request = docker.types.DeviceRequest(**docker_cfg.container_create_kwargs["device_requests"][0])
    assert (request.driver, request.count, request.capabilities) == ("nvidia", -1, [["gpu"]])  # = docker run --gpus all
    assert docker_cfg.volumes == ["prefdiff-workspace:/workspace", "prefdiff-hf-cache:/cache/huggingface"]

    k8s_cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        k8s_t, {"gpu_count": 2, "image": "registry.example.com/prefdiff:1"}))
    pod = k8s_cfg.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/prefdiff:1"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2 == resources["requests"]["nvidia.com/gpu"]
    assert {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]} == {
        "workspace": "prefdiff-workspace", "hf-cache": "prefdiff-hf-cache", "dshm": None}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/workspace", "/cache/huggingface", "/dev/shm"}
    default = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(k8s_t, {}))
    (default_container,) = default.job_manifest["spec"]["template"]["spec"]["containers"]
    assert default_container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_gpu_deployments_target_the_gpu_pools_and_the_image_installs_the_lock():
    """deploy/prefect-gpu.yaml parses as Prefect's deploy configuration and runs the round in the mounted workspace;
    the Dockerfile installs requirements.lock and copies every package the flow imports (not built here: no Docker)."""
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "deploy/prefect-gpu.yaml").read_text()))
    assert [(d.name, d.entrypoint, d.work_pool.name) for d in spec.deployments] == [
        ("nightly-round-docker-gpu", "flows/round.py:preference_round", "prefdiff-docker-gpu"),
        ("nightly-round-k8s-gpu", "flows/round.py:preference_round", "prefdiff-k8s-gpu")]
    assert spec.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/workspace"}}]
    k8s_vars = json.loads((REPO / "deploy/kubernetes-gpu.json").read_text())["variables"]["properties"]
    assert set(spec.deployments[1].work_pool.job_variables) <= set(k8s_vars)

    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.lock" in dockerfile
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    packages = tomllib_packages()
    assert packages <= copied and {"stages", "flows"} <= copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data", "models", "mlflow.db"} <= set(ignored)


def tomllib_packages() -> set[str]:
    """Top-level packages pyproject installs (prefdiff, evaluation)."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return {p.rstrip("*") for p in include}


# -- Prefect: an API that is down --------------------------------------------------------------------------------

def test_a_prefect_api_that_goes_away_is_named_in_one_line_and_the_round_continues_once_it_is_back(tmp_path):
    """A real `prefect server start` on loopback. Stopped during a round: the running stage finishes and is
    committed, the command ends with one line naming PREFECT_API_URL. While it is down: the round's CLI stops
    within seconds with one line, nothing started. Restarted on the same database: the round runs and DVC skips
    the stage that finished."""
    ws = make_workspace(tmp_path / "ws", {"model": {"source": "builtin:tiny-sd"}, "sampling": {"num_steps": 4},
                                         "train": {"d3po": {"timestep_window": 2}},
                                         "sample": {"num_prompts": 2, "groups_per_prompt": 1, "images_per_group": 2}})
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = venv_env({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_CLIENT_MAX_RETRIES": "1",  # the client's own retries only add minutes here
                    "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    start = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    round_cli = [sys.executable, "-m", "flows.round", "--repo", str(ws), "--stages", "sample"]
    log = tmp_path / "prefect-server.log"

    def runs() -> int:
        with sqlite3.connect(tmp_path / "mlflow.db") as con:
            return con.execute("select count(*) from runs").fetchone()[0]

    with server(start, f"{api}/health", REPO, log, env) as api_server:
        flow = subprocess.Popen(round_cli, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # Prefect's log lines go to stderr
        assert flow.stdout is not None
        lines, killed = [], False
        for line in flow.stdout:
            lines.append(line)
            if "Running stage 'sample'" in line:
                os.killpg(api_server.pid, 9)  # the API dies while the stage runs
                api_server.wait(timeout=60)
                killed = True
                break
        rest, _ = flow.communicate(timeout=900)
        err = "".join(lines) + rest
    assert killed and flow.returncode == 1, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error:")]  # Prefect's own warnings go on after it
    assert len(ours) == 1 and re.fullmatch(
        rf"error: d3po_round: the Prefect API at {re.escape(api)} \(PREFECT_API_URL\) stopped answering during the "
        r"run \((connection refused|cannot connect: .*)\); the stages that finished are committed in dvc.lock and "
        r"logged in MLflow: when the API is back, run the same command \(DVC skips those stages\)", ours[0]), err[-3000:]
    lock = (ws / "dvc.lock").read_bytes()
    assert b"data/trajectories" in lock  # the stage ran to its end and DVC committed it
    assert runs() == 1

    began = time.time()
    down = subprocess.run(round_cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.time() - began
    errors = [line for line in down.stderr.splitlines() if line.startswith("error:")]
    assert down.returncode == 1, down.stdout[-3000:] + down.stderr[-3000:]
    assert errors == [f"error: Prefect API at {api} (PREFECT_API_URL) is unreachable (connection refused); tried 3 "
                      "times; nothing was started: start it (`prefect server start`) or unset PREFECT_API_URL to run on "
                      "a temporary local server, then run the same command again"], down.stderr
    assert "Traceback" not in down.stdout + down.stderr
    assert seconds < 60, f"took {seconds:.0f} s to give up (3 probes, 2 s and 4 s apart, plus Python start-up)"
    assert runs() == 1 and (ws / "dvc.lock").read_bytes() == lock  # nothing started

    with server(start, f"{api}/health", REPO, log, env):
        back = subprocess.run(round_cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
        assert "Stage 'sample' didn't change, skipping" in back.stdout + back.stderr
    assert runs() == 2
