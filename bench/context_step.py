"""Context parallelism's cost on CPU: the SFT train step at seq 4096 with each row split over two
devices (context=2; ring and all-gather attention) against whole rows (context=1, the two rows
of the batch over fsdp=2), on the same two simulated CPU devices.

    python bench/context_step.py [--seq 4096] [--rounds 3] [--steps 2]

One process, 2 simulated CPU devices (they share the host's cores, so the comparison shows the
cost of the layout and its transfers, not a speed-up). A small Llama (hidden 256, 4 layers, 8
query / 4 K/V heads, vocabulary 4096, f32, remat full), batch 2 x seq. The three steps are
compiled first, then timed in interleaved rounds (`--steps` steps each) so that all sides see
the same machine load; the median per side. Writes bench/results/context_step.json and prints a
markdown table with the load average.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from sft_step import synthetic_batch, synthetic_sft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 4,
    "remat": "full",
    "scan_layers": True,
}
SIDES = {
    "context=1 (fsdp=2)": {"mesh.fsdp": 2, "mesh.context": 1},
    "context=2 ring": {"mesh.fsdp": 1, "mesh.context": 2, "model.context_attention": "ring"},
    "context=2 allgather": {
        "mesh.fsdp": 1,
        "mesh.context": 2,
        "model.context_attention": "allgather",
    },
}


def build(sets: dict, seq: int):
    import jax

    from jaxalign import sharding as shd
    from jaxalign.config import load_config
    from jaxalign.trainers.loop import Trainer

    overrides = {
        "trainer": "sft",
        "run_dir": common.scratch_dir("bench_context_"),
        "sharding.rules_file": str(ROOT / "configs/sharding/context.yaml"),
        "train.batch_size": 2,
        "train.seq_len": seq,
        "train.lr": 1e-4,
        "train.warmup_steps": 0,
        "loss.vocab_chunks": 4,
        **sets,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()], base={"model": MODEL})
    trainer = Trainer(cfg, synthetic_sft(cfg), devices=jax.devices()[:2])
    state = trainer.fresh_state()
    batch = trainer.to_global(synthetic_batch(2, seq, MODEL["vocab_size"]))
    with shd.activation_sharding(trainer.mesh, trainer.rules):
        t0 = time.perf_counter()
        step = trainer.compile_step(batch).lower(state, batch, None).compile()
        compile_s = time.perf_counter() - t0
    return trainer, step, state, batch, compile_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--output", type=Path, default=ROOT / "bench/results/context_step.json")
    args = p.parse_args()
    import jax

    from jaxalign import sharding as shd

    built = {name: build(sets, args.seq) for name, sets in SIDES.items()}
    states = {name: b[2] for name, b in built.items()}
    losses = {}
    for name, (trainer, step, _, batch, _) in built.items():  # one untimed step each
        with shd.activation_sharding(trainer.mesh, trainer.rules):
            states[name], metrics = step(states[name], batch, None)
            losses[name] = float(metrics["loss"])
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for name, (trainer, step, _, batch, _) in built.items():
            with shd.activation_sharding(trainer.mesh, trainer.rules):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    states[name], metrics = step(states[name], batch, None)
                jax.block_until_ready(metrics)
                times[name].append((time.perf_counter() - t0) / args.steps)
        load.append(os.getloadavg())
    base = common.median(times["context=1 (fsdp=2)"])
    rows = [
        {
            "side": name,
            "step_s": common.median(t),
            "vs_context1": common.median(t) / base,
            "compile_s": built[name][4],
            "first_loss": losses[name],
            "step_s_per_round": t,
        }
        for name, t in times.items()
    ]
    data = {
        "model": MODEL,
        "batch_size": 2,
        "seq_len": args.seq,
        "devices": 2,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "load_average": load,
        "machine": common.machine_info(),
        "rows": rows,
    }
    common.write_json(args.output, data)
    print(f"SFT step, batch 2 x {args.seq} tokens, 2 simulated CPU devices")
    print("| layout | step (s) | vs context=1 | compile (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['side']} | {r['step_s']:.2f} | {r['vs_context1']:.2f}x | {r['compile_s']:.0f} |"
        )
    print(f"load average (1, 5, 15 min) per round: {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
