"""Soak test: a long run of the tiny SFT config with periodic checkpoints and evals, sampling the
process's resident memory, to show it stays flat after warm-up.

    python bench/soak.py [--steps 2000] [--every 200] [--json bench/results/soak.json]

Prints RSS at each tenth of the run, the growth between the first checkpoint and the end, and
the slope of a least-squares line through the samples after warm-up (MiB per 1,000 steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent


def rss_slope_mib_per_1000_steps(samples: list[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS against steps logged, in MiB per 1,000 steps (0 if the
    samples span fewer than two distinct step counts)."""
    steps = np.array([s[2] for s in samples], np.float64)
    rss = np.array([s[1] for s in samples], np.float64) / 2**20
    if len(np.unique(steps)) < 2:
        return 0.0
    return float(np.polyfit(steps, rss, 1)[0] * 1000)


def windows(samples: list[tuple[float, int, int]], every: int) -> list[dict]:
    """RSS (MiB) min / median / max over each `every`-step window of the samples: one save and
    eval cycle each, so a window's max is that cycle's peak."""
    out = []
    last = max((s[2] for s in samples), default=0)
    for start in range(0, last, every):
        rss = [s[1] / 2**20 for s in samples if start <= s[2] < start + every]
        if rss:
            out.append(
                {
                    "steps": [start, start + every - 1],
                    "min_mib": min(rss),
                    "median_mib": float(np.median(rss)),
                    "max_mib": max(rss),
                }
            )
    return out


def last_logged_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 before the first)."""
    if not metrics.exists():
        return 0
    for line in reversed(metrics.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200, help="checkpoint and eval interval")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "soak.json")
    parser.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="checkpoint interval (default: --every; 0: only at the end)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help="eval interval (default: --every; 0: no evals)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides (e.g. train.batch_size=4)",
    )
    args = parser.parse_args(argv)
    save_every = args.every if args.save_every is None else args.save_every
    eval_every = args.every if args.eval_every is None else args.eval_every
    run_dir = Path(tempfile.mkdtemp(prefix="jaxalign_soak_"))
    cmd = [
        sys.executable,
        "-m",
        "jaxalign.cli",
        "train",
        str(REPO / "configs/sft_tiny.yaml"),
        "--set",
        f"run_dir={run_dir}",
        "--set",
        f"train.steps={args.steps}",
        "--set",
        f"checkpoint.every={save_every}",
        "--set",
        f"train.eval_every={eval_every}",
        "--set",
        "train.log_every=50",
        "--set",
        "train.progress=false",
        "--set",
        "train.warmup_steps=50",
        *(x for kv in args.set for x in ("--set", kv)),
    ]
    start = time.time()
    # stderr goes to a file: a pipe nobody reads would block the run once it fills.
    stderr_path = run_dir / "stderr.log"
    stderr_file = stderr_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr_file)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, int, int]] = []  # (seconds, rss bytes, steps logged)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        steps = last_logged_step(metrics)
        samples.append((time.time() - start, rss, steps))
        time.sleep(1.0)
    proc.wait()
    stderr_file.close()
    if proc.returncode != 0:
        print(stderr_path.read_text()[-3000:], file=sys.stderr)
        return 1
    # Warm-up ends with the first checkpoint + eval (every compiled function exists by then).
    warm = [s for s in samples if s[2] >= max(save_every, eval_every) + 50] or samples
    first, last = warm[0], warm[-1]
    peak = max(s[1] for s in warm)
    print(f"{'seconds':>8} {'steps':>6} {'RSS MiB':>8}")
    for i in range(0, len(samples), max(len(samples) // 10, 1)):
        t, rss, steps = samples[i]
        print(f"{t:8.0f} {steps:6d} {rss / 2**20:8.0f}")
    growth = (last[1] - first[1]) / 2**20
    slope = rss_slope_mib_per_1000_steps(warm)
    print(
        f"after warm-up (step ~{first[2]}): {first[1] / 2**20:.0f} MiB -> "
        f"{last[1] / 2**20:.0f} MiB at the end (growth {growth:+.0f} MiB, "
        f"peak {peak / 2**20:.0f} MiB, slope {slope:+.1f} MiB per 1000 steps) over "
        f"{samples[-1][0]:.0f} s"
    )
    cycle = max(save_every, eval_every) or 200
    per_window = windows(samples, cycle)
    print(f"RSS per {cycle}-step window (min / median / max MiB):")
    for w in per_window:
        print(
            f"  steps {w['steps'][0]:5d}-{w['steps'][1]:5d}: {w['min_mib']:6.0f} "
            f"{w['median_mib']:6.0f} {w['max_mib']:6.0f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "save_every": save_every,
                "eval_every": eval_every,
                "overrides": args.set,
                "seconds": samples[-1][0],
                "rss_after_warmup_mib": first[1] / 2**20,
                "rss_end_mib": last[1] / 2**20,
                "growth_mib": growth,
                "peak_mib": peak / 2**20,
                "slope_mib_per_1000_steps": slope,
                "windows": per_window,
                "samples": [{"s": t, "rss_mib": r / 2**20, "steps": n} for t, r, n in samples],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
