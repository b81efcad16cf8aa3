"""Write deploy/docker-gpu.json and deploy/kubernetes-gpu.json: Prefect work-pool base job templates for GPU rounds.

Each starts from the worker's own default template (prefect-docker's ``DockerWorker``, prefect-kubernetes'
``KubernetesWorker``) and adds what a prefdiff round needs: the project image, one GPU per flow run, the DVC
workspace on a persistent volume (code + data + DVC cache: a round reads and writes it like a checkout) and the
Hugging Face cache on another (weights are never downloaded at run time). Re-run after upgrading the workers:

    .venv/bin/python deploy/make_job_templates.py

tests/test_operations.py renders both with the workers' configuration classes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = "prefdiff:latest"
WORKSPACE = "/workspace"  # a git clone of the project with its DVC cache: the deployment's working directory
HF_CACHE = "/cache/huggingface"
ENV = {"HF_HUB_OFFLINE": "1", "HF_HOME": HF_CACHE, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": WORKSPACE}


def _variable(template: dict, name: str, default, **schema) -> None:
    template["variables"]["properties"][name] = {"default": default, **schema}


def docker_template() -> dict:
    from prefect_docker.worker import DockerWorker

    t = copy.deepcopy(DockerWorker.get_default_base_job_template())
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    props["env"]["default"] = ENV
    props["volumes"]["default"] = [f"prefdiff-workspace:{WORKSPACE}", f"prefdiff-hf-cache:{HF_CACHE}"]
    props["auto_remove"]["default"] = True
    # docker run --gpus all: docker-py's DeviceRequest (count -1 = every GPU of the host); the DataLoader and
    # torch's shared-memory tensors need more than Docker's 64 MB /dev/shm.
    props["container_create_kwargs"]["default"] = {
        "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}],
        "shm_size": "8g",
    }
    return t


def kubernetes_template() -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    t = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    props["env"]["default"] = ENV
    for name, value in (("cpu_request", "4"), ("cpu_limit", "8"), ("memory_request", "32Gi"), ("memory_limit", "64Gi")):
        props[name]["default"] = value
    _variable(t, "gpu_count", 1, type="integer", minimum=1, title="GPUs",
              description="nvidia.com/gpu requested (and limited) per flow run")
    _variable(t, "workspace_claim", "prefdiff-workspace", type="string", title="Workspace PVC",
              description=f"PersistentVolumeClaim holding the DVC workspace, mounted at {WORKSPACE}")
    _variable(t, "hf_cache_claim", "prefdiff-hf-cache", type="string", title="Hugging Face cache PVC",
              description=f"PersistentVolumeClaim holding the Hugging Face cache, mounted at {HF_CACHE}")
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["resources"]["requests"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["volumeMounts"] = [{"name": "workspace", "mountPath": WORKSPACE},
                                 {"name": "hf-cache", "mountPath": HF_CACHE},
                                 {"name": "dshm", "mountPath": "/dev/shm"}]
    pod["volumes"] = [{"name": "workspace", "persistentVolumeClaim": {"claimName": "{{ workspace_claim }}"}},
                      {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "{{ hf_cache_claim }}"}},
                      {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    # GPU nodes are usually tainted so that only pods asking for a GPU land there
    pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return t


def main() -> None:
    for name, template in (("docker-gpu.json", docker_template()), ("kubernetes-gpu.json", kubernetes_template())):
        (HERE / name).write_text(json.dumps(template, indent=2, sort_keys=False) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
