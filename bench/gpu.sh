#!/usr/bin/env bash
# One H100 / H200, under 9 minutes: jaxalign's SFT step on a ~1B Llama in bf16 (MFU, tokens/s)
# with each attention kernel and KV-cache decoding on the same model (bench/gpu_step.py); the
# cuDNN-vs-einsum attention check (bench/gpu_check.py); the sampler's correctness tests
# (greedy = full-forward argmax, train/rollout log-prob parity, seeds, stop tokens) run on the
# GPU; then three PPO and three GRPO iterations of the tiny configs through the real RL loop.
# Installs nothing from anywhere: runs this checkout through PYTHONPATH with the machine's python3
# (jax with the CUDA plugin, flax, optax, orbax). Only the RL loop needs Grain, which the GPU image
# lacks: `bash bench/gpu_wheels.sh` here downloads it into .whl/, and with .whl carried along this
# script puts those wheels on PYTHONPATH (unpacked into /tmp/site); without them the RL part fails
# alone. Results in $OUT (default bench/results):
# gpu_step.json, gpu_check.json, rl_iteration_gpu.json and a .log per part (7 files: the
# device tool returns at most 8).
#
#     bash bench/gpu.sh                    # everything
#     bash bench/gpu.sh --only sft         # extra arguments go to bench/gpu_step.py
#     bash bench/gpu.sh --only sft --attention cudnn   # one attention kernel
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
if ! "$PY" -c 'import grain' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c 'from importlib.metadata import version as v; import jax
print(*(f"{n} {v(n)}" for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")), jax.devices())'
# Each part has its own time limit and `set -e` is off for them, so one failing or running long
# never loses the others; gpu_step.json is rewritten after each kernel.
set +e
timeout 330 "$PY" bench/gpu_step.py --json "$OUT/gpu_step.json" "$@" 2>&1 | tee "$OUT/gpu_step.log"
status=${PIPESTATUS[0]}
# The checks share the GPU with nothing else now; they need little of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 70 "$PY" bench/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
check=${PIPESTATUS[0]}
timeout 80 "$PY" -m pytest -q -p no:cacheprovider tests/test_generate.py -k \
    "greedy_equals or logprobs_equal or run_time or fixed_seed or stop_tokens or scan_layers" \
    2>&1 | tee "$OUT/pytest_gpu.log"
tests=${PIPESTATUS[0]}
# The RL loop on the GPU: bench/rl_iteration.py's PPO and GRPO tiny configs (sampler, rollout
# forwards, train steps; seeded init) with the time per phase.
timeout 60 "$PY" bench/rl_iteration.py --rollouts 3 --json "$OUT/rl_iteration_gpu.json" 2>&1 |
    tee "$OUT/rl_iteration_gpu.log"
rl=${PIPESTATUS[0]}
echo "gpu_step exit $status, gpu_check exit $check, GPU sampler tests exit $tests, RL loop exit $rl"
[ "$status" -eq 0 ] && [ "$check" -eq 0 ] && [ "$tests" -eq 0 ] && [ "$rl" -eq 0 ]
