# The prefdiff environment for GPU work pools (deploy/prefect-gpu.yaml): Python 3.11 and requirements.lock, with
# torch's CUDA build (torch==2.13.0 from PyPI on Linux x86_64 is the CUDA 12 build and brings its CUDA libraries;
# the host needs only the NVIDIA driver and nvidia-container-toolkit). The image carries the code at /opt/prefdiff
# for `prefdiff doctor` and one-off runs; a deployment runs the flow in the DVC workspace mounted at /workspace.
#
#   docker build -t prefdiff:latest .
#   docker run --rm --gpus all -v prefdiff-hf-cache:/cache/huggingface prefdiff:latest prefdiff doctor
#
# Not built or run in this project's CI (no Docker there); README "Operations on shared servers".
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1

# git: DVC and the lineage tags; tini reaps the stage subprocesses
RUN apt-get update && apt-get install -y --no-install-recommends git tini && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/prefdiff
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY prefdiff ./prefdiff
COPY evaluation ./evaluation
COPY stages ./stages
COPY flows ./flows
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

ENTRYPOINT ["tini", "--"]
CMD ["prefdiff", "--help"]
