#!/usr/bin/env bash
# One H100 / H200: jaxalign's SFT step on a ~1B Llama in bf16 (MFU, tokens/s) and KV-cache
# decoding on the same model, then bench/decode.py's jaxalign side, in under 8 minutes.
# Installs nothing: runs this checkout through PYTHONPATH with the machine's python3 (jax with the
# CUDA plugin, flax, optax, orbax; no Grain needed). Results: $OUT/gpu_step.json,
# $OUT/decode_gpu.json and their .log files (OUT defaults to bench/results).
#
#     bash bench/gpu.sh                    # everything
#     bash bench/gpu.sh --only sft         # extra arguments go to bench/gpu_step.py
#     bash bench/gpu.sh --only sft --attention cudnn   # with cuDNN flash attention patched in
#
# What it measures and how: see bench/gpu_step.py's docstring. Check the plumbing on a CPU with
# `python bench/gpu_step.py --cpu-smoke` (tests/test_bench.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
# JAX preallocates 75% of the GPU by default; the 1B step wants most of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export JAXALIGN_COMPILATION_CACHE=off
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
# About 7.5 minutes in all. gpu_step.json is rewritten after each part, so a timeout still
# leaves what finished; `set -e` is off for the runs so the second runs even if the first fails.
set +e
timeout 370 "$PY" bench/gpu_step.py --json "$OUT/gpu_step.json" "$@" 2>&1 | tee "$OUT/gpu_step.log"
status=${PIPESTATUS[0]}
# bench/decode.py's jaxalign side on the GPU (f32 weights, its 100m model; transformers not run).
timeout 80 "$PY" bench/decode.py --sides jax --sizes 100m --batches 1,8,64 --repeats 3 \
    --json "$OUT/decode_gpu.json" 2>&1 | tee "$OUT/decode_gpu.log"
exit "$status"
