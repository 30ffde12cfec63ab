"""Python reward functions: `fn(prompts, completions, **record_fields) -> scores`, named in a
config or on the command line as `module:function` or `path/to/file.py:function`."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxalign.errors import UserError

PROMPT_FIELDS = ("prompt", "messages", "system")


def load_reward_function(
    spec: str, source: str = "--reward-fn", what: str = "FUNCTION"
) -> Callable:
    """Import `module:function` or `path/to/file.py:function` (any callable: `what` names the
    kind in errors, e.g. CLASS for `rl.environment`). `source` names where the spec came from
    (a config key such as `rl.reward_functions[1]`, or a flag) in every error."""
    module_name, _, fn_name = spec.rpartition(":")
    where = f"{source}: {spec!r}"
    if not module_name or not fn_name:
        raise UserError(f"{where}: expected MODULE:{what} or FILE.py:{what}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"{where}: file {path} not found")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{where}: cannot import {module_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{where}: {module_name} has no {what.lower()} {fn_name!r}")
    return fn


class FunctionReward:
    """A reward calling `fn(prompts, completions, **fields)`: every record field other than the
    prompt's is passed as a list aligned with the rows."""

    needs_sequences = False

    def __init__(self, fn: Callable, source: str = "reward function"):
        self.fn = fn
        self.source = source

    @classmethod
    def load(cls, spec: str, source: str = "--reward-fn") -> FunctionReward:
        """The reward function `spec` names (see `load_reward_function`)."""
        return cls(load_reward_function(spec, source), f"{source} ({spec})")

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        records: Sequence[dict],
        sequences: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Scores [N] float64 of N rows."""
        keys = sorted({k for r in records for k in r} - set(PROMPT_FIELDS))
        fields = {k: [r.get(k) for r in records] for k in keys}
        scores = np.asarray(self.fn(prompts, completions, **fields), dtype=np.float64).reshape(-1)
        if scores.shape != (len(completions),):
            raise UserError(
                f"{self.source} returned {scores.size} scores for {len(completions)} completions"
            )
        return scores
