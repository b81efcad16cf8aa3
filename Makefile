# make run   - the whole round (sample -> label -> train -> heldout -> evaluate -> register) on the offline default,
#              as a Prefect flow on Prefect's embedded server, each task a `dvc repro` stage, tracked in MLflow
# make compare - D3PO, Diffusion-DPO, SFT, reward-weighted and DDPO on the same labeled data, each a DVC
#              experiment (compare-<method>); one table
# make rounds - many automatic-judge rounds in one process (rounds.count of params.yaml; ROUNDS=N to change it), each an
#              MLflow child run, every round's data in data/rounds (the DVC stage of pipelines/rounds/dvc.yaml)
# make test  - the test suite
# make label-server - the labeling page for people (label.human; ARGS="--mode tag --annotators alice,bob")
# Both create or update the virtual environment .venv first, from the pinned requirements.lock.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test install repro compare rounds serve human-round label-server mlflow-ui clean

install: $(STAMP)

# torch==2.13.0 in the lock resolves to the local CPU wheel on CPU-only machines and to the CUDA build
# on a GPU machine; torchvision is deliberately absent (it cannot load here and breaks transformers).
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@if $(PY) -m pip show -q torchvision 2>/dev/null; then $(PY) -m pip uninstall -y -q torchvision; fi
	@rm -f $(VENV)/.installed-*; touch $@

run: $(STAMP)
	$(PY) -m flows.round

test: $(STAMP)
	$(PY) -m pytest

# The same pipeline without Prefect (plain DVC; the venv's python must come first on PATH).
repro: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# Every method of compare.methods as a DVC experiment compare-<method> (train + evaluate on the same labeled
# data, the same prompts and seeds): reports/comparison.md from `dvc exp show`, and child MLflow runs side by
# side (flows/compare.py). `dvc exp apply compare-<method>` brings one into the workspace.
compare: $(STAMP)
	$(PY) -m flows.compare

# Many rounds in one process, through the DVC stage `rounds` (flows/rounds.py): `make rounds ROUNDS=50` sets rounds.count.
rounds: $(STAMP)
	$(PY) -m flows.rounds $(if $(ROUNDS),--rounds $(ROUNDS))

# A long-lived process that runs the round on its cron schedule and human rounds on demand (flows/deploy.py).
serve: $(STAMP)
	$(PY) -m flows.deploy

# The labeling page on label.human.host:port (127.0.0.1:8765) for data/trajectories; labels go to label.human.log.
label-server: $(STAMP)
	$(PY) -m prefdiff.labeling.server $(ARGS)

# A human-in-the-loop round (flows/human.py): sample, start the labeling page, wait for labels, then train;
# ROUNDS=N runs N such rounds in one flow run, round r sampling from round r-1's LoRA.
# Resume it with done: `python -m flows.human resume <flow-run-id>` (the command, with its API, is in its log).
human-round: $(STAMP)
	$(PY) -m flows.human --serve-labels $(if $(ROUNDS),--rounds $(ROUNDS))

# The MLflow UI on this repo's store: `make mlflow-ui PORT=5001` (HOST=0.0.0.0 opens it to the network; README
# "Operations on shared servers" runs a tracking server with proxied artifacts instead).
HOST ?= 127.0.0.1
PORT ?= 5000
mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host $(HOST) --port $(PORT)

# Remove the pipeline's data, models, MLflow store and Prefect home (tracked files such as dvc.lock,
# metrics/ and plots/ stay: the next run rewrites them).
clean:
	rm -rf data/trajectories data/preferences data/heldout data/rounds models/trained models/checkpoints models/baseline eval mlflow.db mlartifacts .prefect
