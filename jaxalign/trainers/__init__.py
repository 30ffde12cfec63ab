"""Trainers: one generic loop (`loop.Trainer`); each algorithm adds a loss and its data.

An algorithm subclasses `base.Algorithm` and is registered by name in `registry.py`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from jaxalign.trainers.registry import get_trainer, register_trainer, trainer_names

if TYPE_CHECKING:
    from jaxalign.config import Config
    from jaxalign.trainers.base import Algorithm
    from jaxalign.trainers.loop import RunResult

__all__ = ["get_trainer", "make_algorithm", "register_trainer", "train", "trainer_names"]

logger = logging.getLogger(__name__)


def make_algorithm(cfg: Config) -> Algorithm:
    """The algorithm that `cfg.trainer` names, constructed for `cfg`."""
    return get_trainer(cfg.trainer)(cfg)


def train(cfg: Config, *, devices=None, init_params=None) -> RunResult:
    """Train the algorithm `cfg.trainer` names under `cfg`; what `jaxalign train` runs.

    Resumes from `cfg.run_dir`'s latest checkpoint as `cfg.resume` says. `devices` (default:
    all) makes the mesh; `init_params` replaces the config's initial parameters of a fresh run.
    Errors in the config or data raise `UserError`; nothing is skipped silently.
    """
    import jax

    from jaxalign.sharding import axis_sizes
    from jaxalign.trainers.loop import Trainer

    # A mesh that cannot fit fails before any data work.
    axis_sizes(cfg.mesh, len(devices) if devices is not None else jax.device_count())
    trainer = Trainer(cfg, make_algorithm(cfg), devices=devices)
    result = trainer.run(init_params)
    if result.history:
        first, last = result.history[0], result.history[-1]
        state = "stopped (preempted)" if result.preempted else "done"
        logger.info(
            "%s at step %d: loss %.4f (step %d) -> %.4f (step %d); run dir %s",
            state,
            result.final_step,
            first["loss"],
            first["step"],
            last["loss"],
            last["step"],
            cfg.run_dir,
        )
    return result
