#!/usr/bin/env bash
# The GPU benchmarks in one run, for a box with one GPU and no network (sized for one H200: under ~8 minutes).
#
# Runs from the repository root with the box's python (torch, transformers, peft, accelerate, torchvision, timm
# already there). Installs the carried wheels first (no index, no dependency resolution: nothing can replace
# the image's torch), then, each part under its own timeout so that one failure does not stop the rest:
#   sampling      (a) prefdiff's sampler with chain + log-probs vs the stock diffusers pipeline, sd15 and sdxl
#   d3po_step     (b) one D3PO update vs the official-style loop, sd15 and sdxl
#   dpo_step      (c) one Diffusion-DPO step vs the diffusers example's step, sd15 and sdxl
#   crosscheck    scripts/crosscheck_scorers.py (our scorers vs open_clip / ImageReward), when present
# all in bf16 (weights bf16, training steps under bf16 autocast) on random-weight full-size architectures
# (benchmarks/common.py), each side in a fresh process: absolute times (median, min, max), peak
# torch.cuda.max_memory_allocated, MFU against the dense bf16 peak (H200: 989 TFLOP/s), and the ratios.
# Each part's output goes to $BENCH_OUT/<part>.log (default $OUT when set, as on the device runner, else
# benchmarks/results/gpu); the SUMMARY lines are JSON.
#
# Before going offline, download the wheels next to the repo (exact versions: requirements.lock for diffusers
# and pydantic; open_clip_torch, image-reward and ftfy are the optional `crosscheck` extra, not in the lock):
#   pip download --no-deps -d wheels diffusers==0.42.1 pydantic==2.14.3 pydantic_core==2.50.4 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 open_clip_torch==3.3.0 image-reward==1.5 ftfy==6.3.1 \
#       wcwidth==0.9.4
#   (pydantic_core is a compiled wheel: add --platform manylinux2014_x86_64 --python-version <the box's 3.x>
#   --only-binary=:all: when downloading on another machine.)
# The wheels/ directory is not committed: copy it onto the box with the checkout.
#
# Usage: scripts/gpu_bench.sh [wheels-dir]        (env: PYTHON, BENCH_OUT, REPEATS)
set -u
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
PY=${PYTHON:-python}
BENCH_OUT=${BENCH_OUT:-${OUT:-benchmarks/results/gpu}}
REPEATS=${REPEATS:-2}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$BENCH_OUT"
began=$(date +%s)
status=0

part() {  # part NAME SECONDS COMMAND...: run under a timeout, log to $BENCH_OUT/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (timeout ${limit}s, $(( $(date +%s) - began ))s elapsed)"
    timeout -k 10 "$limit" "$@" > "$BENCH_OUT/$name.log" 2>&1
    local rc=$?
    grep -v '^SUMMARY ' "$BENCH_OUT/$name.log" | grep -E '^(==|   )' || tail -n 5 "$BENCH_OUT/$name.log"
    if [ "$rc" -ne 0 ]; then
        echo "=== $name FAILED: exit $rc$( [ "$rc" -eq 124 ] && echo ' (timed out)' ); see $BENCH_OUT/$name.log"
        status=1
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

if [ -d "$WHEELS" ]; then
    part install 90 "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" diffusers pydantic \
        pydantic_core annotated-types typing-inspection open_clip_torch image-reward ftfy wcwidth
else
    echo "=== install skipped: no wheel directory $WHEELS (diffusers must already be importable)"
fi

COMMON=(--dtype bf16 --device cuda --repeats "$REPEATS")
part sampling_sd15 75 "$PY" -m benchmarks.sampling --arch sd15 --batch 8 --steps 20 "${COMMON[@]}"
part sampling_sdxl 90 "$PY" -m benchmarks.sampling --arch sdxl --batch 4 --steps 20 "${COMMON[@]}"
part d3po_step_sd15 80 "$PY" -m benchmarks.d3po_step --arch sd15 --pairs 4 --steps 10 "${COMMON[@]}"
part d3po_step_sdxl 90 "$PY" -m benchmarks.d3po_step --arch sdxl --pairs 2 --steps 5 "${COMMON[@]}"
part dpo_step_sd15 60 "$PY" -m benchmarks.diffusion_dpo_step --arch sd15 --batch 8 "${COMMON[@]}"
part dpo_step_sdxl 75 "$PY" -m benchmarks.diffusion_dpo_step --arch sdxl --batch 4 "${COMMON[@]}"
if [ -f scripts/crosscheck_scorers.py ]; then
    part crosscheck 45 "$PY" scripts/crosscheck_scorers.py
fi
echo "=== done in $(( $(date +%s) - began ))s; logs in $BENCH_OUT"
exit $status
