"""A two-process mixture-of-experts run equals one process: `configs/sft_qwen3_moe_tiny.yaml`
(Qwen3-MoE, 8 experts, top-2, a dense first layer) with expert parallelism (mesh.expert=4 x
fsdp=2, configs/sharding/expert.yaml), trained for a few steps in one process with 8 simulated
CPU devices and in two processes x 4 devices (launch/local_multiprocess.sh, a real
jax.distributed cluster on localhost: the expert all-to-all crosses the processes). Prints the
largest differences of the loss and router metrics per step and exits non-zero above 1e-5.

    python scripts/moe_two_process.py [--steps 5] [--out /tmp/moe_two_process]

Kept out of CI for time (two process launches and compiles, about a minute on 2 idle cores);
tests/test_multihost.py covers the same machinery on a dense model, tests/test_moe.py the expert
parallel equality within one process. Results: docs/performance.md ("Mixture of experts").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("loss", "moe/aux_loss", "moe/z_loss", "moe/expert_load", "grad_norm")


def env(devices: int) -> dict[str, str]:
    out = dict(os.environ)
    out["XLA_FLAGS"] = out.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    out.update(
        JAX_PLATFORMS="cpu", JAXALIGN_CPU_DEVICES=str(devices), JAXALIGN_COMPILATION_CACHE="off"
    )
    return out


def train_cmd(run_dir: Path, steps: int) -> list[str]:
    sets = [
        f"run_dir={run_dir}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.progress=false",
        "train.seq_len=64",
        "checkpoint.every=0",
        "logging.tensorboard=false",
        "mesh.expert=4",
        "mesh.fsdp=2",
    ]
    args = [a for s in sets for a in ("--set", s)]
    config = str(REPO / "configs/sft_qwen3_moe_tiny.yaml")
    return [sys.executable, "-m", "jaxalign.cli", "train", config, *args]


def run(cmd: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="/tmp/moe_two_process")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    one_s = run(train_cmd(out / "one", args.steps), env=env(8))
    launcher = ["bash", "launch/local_multiprocess.sh", "2", "--devices-per-process", "4", "--"]
    two_s = run(
        [*launcher, *train_cmd(out / "two", args.steps)],
        env=env(4) | {"RUN_LOGS": str(out / "logs")},
    )
    one, two = records(out / "one"), records(out / "two")
    assert sorted(one) == sorted(two) == list(range(1, args.steps + 1)), (sorted(one), sorted(two))
    worst = {}
    for key in KEYS:
        diffs = []
        for s in one:
            a, b = one[s].get(key), two[s].get(key)
            if a is None:
                continue
            a, b = (a, b) if isinstance(a, list) else ([a], [b])
            diffs.append(max(abs(x - y) for x, y in zip(a, b, strict=True)))
        if diffs:
            worst[key] = max(diffs)
    print(f"one process (8 devices): {one_s:.1f} s; two processes x 4 devices: {two_s:.1f} s")
    print("losses:", [round(one[s]["loss"], 6) for s in sorted(one)])
    for key, diff in worst.items():
        print(f"max |one - two| {key}: {diff:.2e}")
    if max(worst.values()) > 1e-5:
        sys.exit("two processes differ from one by more than 1e-5")


if __name__ == "__main__":
    main()
