"""Trainers: one generic loop (`loop.Trainer`); each algorithm adds a loss and its data.

An algorithm subclasses `base.Algorithm` and is registered by name in `registry.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxalign.trainers.registry import get_trainer, register_trainer, trainer_names

if TYPE_CHECKING:
    from jaxalign.config import Config
    from jaxalign.trainers.base import Algorithm

__all__ = ["get_trainer", "make_algorithm", "register_trainer", "trainer_names"]


def make_algorithm(cfg: Config) -> Algorithm:
    """The algorithm that `cfg.trainer` names, constructed for `cfg`."""
    return get_trainer(cfg.trainer)(cfg)
