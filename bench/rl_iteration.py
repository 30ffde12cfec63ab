"""Time per phase of one PPO and one GRPO iteration (rollout + training on it) of the tiny
configs (configs/ppo_tiny.yaml, configs/grpo_tiny.yaml).

    python bench/rl_iteration.py [--rollouts 3] [--out bench/results/rl_iteration.json]

Each trainer runs `--rollouts` iterations through the real loop; the first one includes
compilation and is dropped, the others are averaged. Phases: generate (sampler), score (reward
functions), forward (policy/value and reference forwards over the rollout), advantages
(rewards, GAE or group advantages, whitening), train (the optimizer steps on the rollout:
rl.epochs x minibatches). Starts from runs/sft_tiny when it exists, else a seeded init (the
timing does not depend on the weights, only on response lengths). Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import JAX_PACKAGES, format_table, machine_info, write_json  # noqa: E402

PHASES = ("generate", "score", "forward", "advantages", "train")


def run(config: str, rollouts: int, run_dir: str) -> dict:
    from jaxalign.config import load_config
    from jaxalign.trainers import make_algorithm
    from jaxalign.trainers.loop import Trainer
    from jaxalign.trainers.rollout import steps_per_rollout

    sets = [
        f"run_dir={run_dir}",
        "rl.eval_every=0",
        "train.log_every=1",
        "train.progress=false",
        "checkpoint.every=0",
        "logging.tensorboard=false",
    ]
    if not (ROOT / "runs/sft_tiny/checkpoints").is_dir():
        sets.append("init_from=null")
    cfg = load_config(ROOT / config, sets)
    per = steps_per_rollout(cfg)
    cfg = load_config(ROOT / config, [*sets, f"train.steps={per * rollouts}"])
    algo = make_algorithm(cfg)
    trainer = Trainer(cfg, algo)
    init = getattr(algo, "initial_params", lambda t: None)(trainer)
    history = trainer.run(init_params=init).history
    records = [h for h in history if "time/rollout" in h]
    # time/train in rollout k's record is the training of rollout k - 1.
    steady = records[2:] if len(records) > 2 else records[1:]
    phases = {p: sum(r[f"time/{p}"] for r in steady) / len(steady) for p in PHASES}
    total = sum(phases.values())
    return {
        "config": config,
        "trainer": cfg.trainer,
        "rows_per_rollout": cfg.rl.prompts_per_rollout * cfg.rl.num_generations,
        "steps_per_rollout": per,
        "max_new_tokens": cfg.sampling.max_new_tokens,
        "mean_response_length": sum(r["rollout/response_length"] for r in steady) / len(steady),
        "iteration_s": total,
        **{f"{p}_s": v for p, v in phases.items()},
        "generate_fraction": phases["generate"] / total,
        "iterations_measured": len(steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument(
        "--json", "--out", dest="out", default=str(ROOT / "bench/results/rl_iteration.json")
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in ("configs/ppo_tiny.yaml", "configs/grpo_tiny.yaml"):
            rows.append(run(config, args.rollouts, str(Path(tmp) / Path(config).stem)))
    data = {"benchmark": "rl_iteration", "machine": machine_info(JAX_PACKAGES), "results": rows}
    print(markdown(data))
    write_json(args.out, data)


COLUMNS = [
    ("trainer", "trainer", "s"),
    ("rows", "rows_per_rollout", "d"),
    ("steps", "steps_per_rollout", "d"),
    ("resp len", "mean_response_length", ".1f"),
    *[(f"{p} s", f"{p}_s", ".3f") for p in PHASES],
    ("iteration s", "iteration_s", ".3f"),
    ("generate share", "generate_fraction", ".0%"),
]


def markdown(data: dict) -> str:
    """This benchmark's table from its JSON."""
    return format_table(data["results"], COLUMNS)


if __name__ == "__main__":
    main()
