"""The trainers by name: `trainer: NAME` in a config picks the `Algorithm` registered as NAME.

A trainer is one module with an `Algorithm` subclass plus one `register_trainer` line below (or
in your own code before the config is loaded). Built-in trainers are registered as
"module:Class" strings, imported on first use, so loading a config imports no jax.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxalign.trainers.base import Algorithm

_TRAINERS: dict[str, str | type[Algorithm]] = {}


def register_trainer(name: str, algorithm: str | type[Algorithm]) -> None:
    """Register `algorithm` (an `Algorithm` subclass, or "module:Class" imported on first use)
    as `trainer: name`. Registering a name again replaces it."""
    _TRAINERS[name] = algorithm


def trainer_names() -> list[str]:
    """The registered names, in registration order."""
    return list(_TRAINERS)


def unknown_trainer_message(name: str) -> str:
    """`unknown trainer 'x' (did you mean 'y'?)`, else naming every registered trainer."""
    close = difflib.get_close_matches(str(name), _TRAINERS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(_TRAINERS)}"
    return f"unknown trainer {name!r} ({hint})"


def get_trainer(name: str) -> type[Algorithm]:
    """The `Algorithm` class registered as `name` (its module imported on first use)."""
    if name not in _TRAINERS:
        from jaxalign.errors import ConfigError

        raise ConfigError(unknown_trainer_message(name))
    algorithm = _TRAINERS[name]
    if isinstance(algorithm, str):
        module, _, attr = algorithm.partition(":")
        algorithm = getattr(importlib.import_module(module), attr)
        _TRAINERS[name] = algorithm
    algorithm.name = name
    return algorithm


register_trainer("sft", "jaxalign.trainers.sft:SFT")
register_trainer("rm", "jaxalign.trainers.rm:RewardModelAlgorithm")
register_trainer("dpo", "jaxalign.trainers.dpo:DPO")
register_trainer("ppo", "jaxalign.trainers.ppo:PPO")
register_trainer("grpo", "jaxalign.trainers.grpo:GRPO")
register_trainer("rloo", "jaxalign.trainers.grpo:RLOO")
register_trainer("reinforce_pp", "jaxalign.trainers.grpo:ReinforcePP")
