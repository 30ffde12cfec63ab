"""One training run from a YAML config and `--set` overrides: what `jaxalign train` runs (and the
quickstart's training stages)."""

from __future__ import annotations

import os

from jaxalign.trainers.loop import RunResult


def train_config(config: str | os.PathLike, overrides: list[str]) -> RunResult:
    """Load `config` with `overrides`, train it to the end (or a preemption), and print one
    summary line on the main process."""
    import jax

    from jaxalign.config import load_config
    from jaxalign.runtime import enable_compilation_cache
    from jaxalign.sharding import axis_sizes
    from jaxalign.trainers import make_algorithm
    from jaxalign.trainers.loop import Trainer

    cfg = load_config(config, overrides)
    enable_compilation_cache()
    axis_sizes(cfg.mesh, jax.device_count())  # a mesh that cannot fit fails before any data work
    trainer = Trainer(cfg, make_algorithm(cfg))
    result = trainer.run()
    if result.history and trainer.mesh.devices.flat[0].process_index == 0:
        first, last = result.history[0], result.history[-1]
        state = "stopped (preempted)" if result.preempted else "done"
        print(
            f"[jaxalign] {state} at step {result.final_step}: loss {first['loss']:.4f} "
            f"(step {first['step']}) -> {last['loss']:.4f} (step {last['step']}); "
            f"run dir {cfg.run_dir}"
        )
    return result
