"""What a trainer adds to the loop: the `Algorithm` and `DataIterator` base classes.

Every hook the loop calls is declared here with its default, so a reader (and a type checker)
sees the whole protocol in one place. A trainer subclasses `Algorithm`, overrides what differs
and is registered by name in `jaxalign/trainers/registry.py`.

Facts about a trainer that other commands need without its data (`plan`, `shardings`,
`export`, `generate`) are class attributes and classmethods taking the config: they never
construct the algorithm. Light on purpose: jax and the models are imported where used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import jax
    import numpy as np
    from flax import nnx

    from jaxalign.config import Config


class DataIterator:
    """Yields this process's part of each global batch: arrays [grad_accum, local_batch, ...].

    Subclasses implement `__next__`, `get_state` and `set_state`; the other hooks have defaults
    that do nothing.
    """

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def get_state(self) -> dict:
        """A JSON-serializable state to resume from (saved with each checkpoint)."""
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def start(self, trainer: Any) -> None:
        """Called once, before the first `next()`, with the `loop.Trainer` (its mesh, rules and
        graphdef): on-policy data builds what it generates with here. Default: nothing."""

    def observe_state(self, state: dict) -> None:
        """Called before each `next()` with the current train state: on-policy data (RL
        rollouts) generates from `state["params"]`. Default: nothing."""

    def pop_metrics(self) -> dict[str, float]:
        """Merged into each logged record (e.g. rollout statistics). Default: none."""
        return {}

    def record_ids(self) -> list[str] | None:
        """The ids of the records of the batch last returned (host-side), named by errors such
        as a NaN halt. Default: None (unknown)."""
        return None

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One data state from every process's `get_state()`, so a run can resume under another
        process count. Default: identical states kept once, differing ones per process (then
        resuming needs the same process count)."""
        if all(s == states[0] for s in states):
            return states[0]
        return {"per_process": states}

    # Counts returned with the run's result (records read, skipped, dropped); an attribute or a
    # property of the subclass. Default: None.
    stats: dict | None = None

    def report(self) -> str | None:
        """One line of those counts, logged at the end of training. Default: None (no line)."""
        return None


class Algorithm:
    """A trainer: a loss, its data, and hooks around the loop (each with a default below).

    Class-level facts (read without constructing the algorithm):
      `name`: the registered name (set by `register_trainer`).
      `is_rl`: trains on its own rollouts (rl.* applies; the plan counts rollout memory).
      `is_reward_model`: its checkpoints are reward models (`jaxalign score`, `rl.reward_model`).
      `policy_key`: where the language model sits in the trained parameter tree (PPO: "policy"
        of {policy, value}); None: the whole tree is it.
      `frozen_from_initial`: `frozen_params` reads the initial parameters, so they are built
        also when resuming.
    """

    name: ClassVar[str] = ""
    is_rl: ClassVar[bool] = False
    is_reward_model: ClassVar[bool] = False
    policy_key: ClassVar[str | None] = None
    frozen_from_initial: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -- facts about the trained model (no data needed) ----------------------------------------

    @classmethod
    def make_model(cls, cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
        """The trained module. Default: the language model of cfg.model's family."""
        from jaxalign.models.registry import build

        return build(cfg.model, rngs)

    @classmethod
    def make_policy(cls, cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
        """The module at `policy_key` alone: what `export` writes and `generate` samples from.
        Default: the trained module (`policy_key` None)."""
        return cls.make_model(cfg, rngs)

    @classmethod
    def policy_params(cls, params: Any) -> Any:
        """The parameters of `make_policy`'s module within a trained parameter tree."""
        return params[cls.policy_key] if cls.policy_key else params

    @classmethod
    def policy_target(cls, target: Any) -> Any:
        """A checkpoint restore target holding only the policy `target` (the inverse of
        `policy_params`): restores the policy of a checkpoint without the rest."""
        return {cls.policy_key: target} if cls.policy_key else target

    @classmethod
    def unused_params(cls, cfg: Config) -> list[str]:
        """`train.freeze` patterns of parameters the trainer holds but no loss reads (never
        trained, no optimizer state). Default: none."""
        return []

    @classmethod
    def lora_trained(cls, cfg: Config) -> list[str]:
        """With `model.lora`: patterns (fullmatched against a parameter path or a '/'-suffix of
        it) of base parameters that train beside the adapters, e.g. a reward model's score
        head. Default: none."""
        return []

    @classmethod
    def memory_terms(cls, cfg: Config, estimate: Any) -> None:
        """Add what the trainer keeps besides the trained policy to `jaxalign plan`'s estimate
        (a `plan.Estimate`: its `parts`, `host`, `num_params`). Default: nothing."""

    # -- compiling without data (`jaxalign plan --compile`, `jaxalign.aot`) -----------------

    @classmethod
    def for_compile(cls, cfg: Config) -> Algorithm:
        """An instance whose `loss_fn` and `abstract_frozen` work without reading any data or
        tokenizer: what `jaxalign.aot` compiles the train step of. Default: only `cfg` set;
        a trainer whose loss reads more sets it from `cfg` in `setup_loss`."""
        algorithm = cls.__new__(cls)
        Algorithm.__init__(algorithm, cfg)
        algorithm.setup_loss()
        return algorithm

    def setup_loss(self) -> None:
        """Set what `loss_fn` reads besides `cfg` (called by `for_compile`; a trainer's
        `__init__` may call it too). Default: nothing."""

    @classmethod
    def abstract_batch(cls, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global train batch, [grad_accum, micro_batch, ...] per key,
        as the trainer's data yields it (without shardings)."""
        raise NotImplementedError(f"trainer {cls.name}: no abstract batch to compile with")

    def abstract_frozen(self, trainer: Any) -> Any | None:
        """What `frozen_params` returns, as ShapeDtypeStructs with shardings (from the
        `loop.Trainer`'s abstract parameters), without computing it. Default: None."""
        return None

    # -- the loss and its data -----------------------------------------------------------------

    def loss_fn(
        self, model: nnx.Module, batch: dict, rng: jax.Array, frozen: Any = None
    ) -> tuple[jax.Array, jax.Array, dict]:
        """(summed loss, its denominator, metric sums) of one micro-batch."""
        raise NotImplementedError

    def train_data(self, process_index: int, process_count: int) -> DataIterator:
        raise NotImplementedError

    def eval_data(self, process_index: int, process_count: int) -> Iterator[dict] | None:
        """Held-out batches (the same each time), or None: no eval. Default: None."""
        return None

    # -- hooks around the loop -----------------------------------------------------------------

    def initial_params(self, trainer: Any) -> Any | None:
        """Parameters a fresh run starts from, or None for the loop's default (`init_from`, a
        Hugging Face model, or a seeded init). Default: None."""
        return None

    def frozen_params(self, trainer: Any, initial_params: Any) -> Any | None:
        """Arrays the loss reads but never trains (e.g. a reference policy), passed to
        `loss_fn` as `frozen`; `initial_params` are the fresh run's, None when resuming
        unless `frozen_from_initial`. Default: None."""
        return None

    def batch_tokens(self, local: dict) -> int | None:
        """The tokens of this process's rows of a batch, counted by tokens/s and MFU (preference
        trainers count the real tokens of chosen and rejected). Default: None, every position
        of train.batch_size rows."""
        return None

    def on_train_end(self, trainer: Any, result: Any) -> Any:
        """Runs after a run that was not preempted; its return value is `RunResult.extras`.
        Default: nothing (None)."""
        return None
