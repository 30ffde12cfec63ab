"""Crash fuzzing: SIGKILL a training run at random moments, resume, and check the final
parameters equal those of an uninterrupted run bitwise.

    python scripts/crash_fuzz.py --trials 20 [--work-dir /tmp/fuzz] [--seed 0] [--lora]
        [--max-kills 4]

Checkpoints are written every step, asynchronously, so many kills land while a save is in flight;
a resume must always find the latest *complete* checkpoint. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 12
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.log_every=1",
    "train.eval_every=0",
    "train.progress=false",
    "train.peak_flops_per_device=1e9",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "logging.tensorboard=false",
]


# --lora: the same run training rank-4 adapters (the checkpoints hold only those).
LORA_OVERRIDES = ["model.lora.rank=4", "train.lr=1e-2"]


def train_command(run_dir: Path, lora: bool = False) -> list[str]:
    overrides = OVERRIDES + (LORA_OVERRIDES if lora else []) + [f"run_dir={run_dir}"]
    sets = [a for o in overrides for a in ("--set", o)]
    return [
        sys.executable,
        "-m",
        "jaxalign.cli",
        "train",
        str(REPO / "configs/sft_tiny.yaml"),
        *sets,
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("JAX_PLATFORMS", "cpu")
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    return e


def final_params(run_dir: Path):
    """The parameters of the last checkpoint (a LoRA run's: its trained part), as NumPy arrays
    on the host."""
    import jax
    import numpy as np

    from jaxalign.checkpoint import load_params
    from jaxalign.config import load_config
    from jaxalign.models.params import build_model
    from jaxalign.optim import trained_labels, trained_part
    from jaxalign.sharding import make_mesh, resolve_rules

    cfg = load_config(run_dir / "config.yaml", ["mesh.fsdp=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    _, abstract, shardings = build_model(cfg, mesh, resolve_rules(cfg.sharding))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    if cfg.model.lora is not None:
        target = trained_part(target, trained_labels(cfg, abstract))
    return jax.tree.map(np.asarray, load_params(run_dir, target))


def _saving(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())


def run_to_completion(
    run_dir: Path,
    rng: random.Random,
    expected_s: float | None,
    lora: bool = False,
    max_kills: int = 4,
) -> tuple[int, float]:
    """Start/kill/resume until the run finishes; returns (kills, seconds of the last attempt).

    Each attempt is killed (up to `max_kills` times) either at a random moment of its expected
    duration or as soon as an asynchronous checkpoint write is seen in progress.
    """
    kills = 0
    while True:
        start = time.perf_counter()
        proc = subprocess.Popen(
            train_command(run_dir, lora),
            cwd=REPO,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kill_at = None
        during_save = False
        if expected_s is not None and kills < max_kills:
            during_save = rng.random() < 0.5
            kill_at = start + rng.uniform(0.2, 0.9) * expected_s
        while proc.poll() is None:
            now = time.perf_counter()
            if kill_at is not None and (now >= kill_at or (during_save and _saving(run_dir))):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.005)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            continue
        if proc.returncode != 0:
            raise SystemExit(
                f"resume failed in {run_dir} (exit {proc.returncode}); rerun "
                f"{' '.join(train_command(run_dir, lora))} to see why"
            )
        return kills, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/jaxalign_crash_fuzz"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters")
    parser.add_argument(
        "--max-kills", type=int, default=4, help="kills per trial before it may finish"
    )
    args = parser.parse_args(argv)
    os.environ.update({k: v for k, v in env().items() if k in ("JAX_PLATFORMS", "XLA_FLAGS")})
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    rng = random.Random(args.seed)

    reference_dir = args.work_dir / "reference"
    _, expected = run_to_completion(reference_dir, rng, None, args.lora)
    reference = final_params(reference_dir)
    import jax
    import numpy as np

    total_kills = 0
    for trial in range(args.trials):
        run_dir = args.work_dir / f"trial_{trial}"
        kills, last = run_to_completion(run_dir, rng, expected, args.lora, args.max_kills)
        expected = last if kills == 0 else expected
        total_kills += kills
        got = final_params(run_dir)
        same = all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference))
        )
        print(
            f"trial {trial}: {kills} kills, final parameters "
            f"{'identical' if same else 'DIFFERENT'}",
            flush=True,
        )
        if not same:
            return 1
    print(f"{args.trials} trials, {total_kills} kills: every resume matched the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
