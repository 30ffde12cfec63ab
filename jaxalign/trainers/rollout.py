"""On-policy data for RL trainers: prompts for the rollout engine (`trainers/rollout_engine.py`:
generate, score, reference/value forwards, advantages), then shuffled minibatches of its rows
for the generic loop (`trainers/loop.py`).

`RolloutData` is the iterator an RL algorithm's `train_data` returns. The loop calls
`start(trainer)` once and `observe_state(state)` before every `next()`; when the buffer is empty
the next call runs a rollout from `state["params"]` (the trained parameters themselves: same
mesh, no copy) and queues `rl.epochs * R / train.batch_size` minibatches. Every process reads
the whole global batch of prompts and runs the same rollout; each process then yields its own
rows of every minibatch.

Resume is exact at rollout boundaries (RL configs require `checkpoint.every` and `train.steps`
to be multiples of the steps per rollout). A run stopped inside a rollout (SIGTERM) resumes with
a new rollout from the next prompts and yields only the minibatches that rollout had left.

With `rl.ptx_coef > 0` every minibatch also carries `ptx_*` arrays (inputs, targets, loss_mask,
segment_ids, positions: `rl.ptx_batch_size` packed rows of `rl.ptx_file`, read like SFT data)
for the PPO-ptx term of the loss (`RLAlgorithm.loss_fn`); their iterator's position is part of
the data state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import jax
import numpy as np

from jaxalign import sharding as shd
from jaxalign.config import Config
from jaxalign.data.prompts import prompt_iterator_from_config
from jaxalign.errors import ConfigError
from jaxalign.rewards import Scorer, reward_names
from jaxalign.trainers.base import DataIterator
from jaxalign.trainers.registry import get_trainer
from jaxalign.trainers.rl_rows import (
    pack_micro_batch,
    pack_plan,
    packed_row_count,
    response_buckets,
    sequence_spans,
)
from jaxalign.trainers.rollout_engine import PromptBatch, RolloutEngine

logger = logging.getLogger(__name__)

STATE_VERSION = 1
PTX_PREFIX = "ptx_"  # minibatch keys of the PPO-ptx rows


# ---------------------------------------------------------------------------------------------
# The on-policy iterator.


class RolloutData(DataIterator):
    """The RL data iterator (see the module docstring). `algorithm`: the engine's
    `RolloutAlgorithm` hooks, plus `tokenizer`, `kl_controller` (a `rl.KLController`, its
    coefficient goes into postprocess and its state into the data state) and
    `reference_on_device()` / `reference_release()` (the frozen reference policy, or None)."""

    def __init__(self, cfg: Config, algorithm, process_index: int, process_count: int):
        self.cfg = cfg
        self.rl = cfg.rl
        self.algorithm = algorithm
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer = algorithm.tokenizer
        # Every process reads the whole global batch of prompts (see the module docstring).
        self.prompts = prompt_iterator_from_config(
            cfg.data,
            self.tokenizer,
            global_batch_size=self.rl.prompts_per_rollout,
            keep_messages=bool(self.rl.environment),  # an environment re-renders them
        )
        self.rows = self.rl.prompts_per_rollout * self.rl.num_generations
        self.steps_per_rollout = steps_per_rollout(cfg)
        # With rl.environment, the environment's rewards are the scores.
        self.scorer = None if self.rl.environment else Scorer.from_rl_config(cfg, self.tokenizer)
        self.ptx = ptx_iterator(cfg, self.tokenizer, process_index, process_count)
        self.rollouts = 0  # rollouts started
        self.position = 0  # minibatches of the current rollout already yielded
        self.skip = 0  # after a resume inside a rollout: its minibatches already trained on
        self.queue: list[dict] = []
        self.queue_ids: list[list[str]] = []  # the prompt record ids of each queued minibatch
        self.packed_rows: list[int] = []  # rl.pack_rows: rows of each packed minibatch queued
        self._last_ids: list[str] = []
        self.engine: RolloutEngine | None = None  # built by start()
        self._params = None
        self._metrics: list[dict] = []
        self._last_rollout_end = None

    # -- loop hooks -----------------------------------------------------------------------------

    def start(self, trainer) -> None:
        """The loop's hook before the first `next()`: build the engine with the mesh, rules and
        graphdef the trainer holds for the whole run."""
        if self.ptx is not None:
            shd.validate_batch(
                ptx_rows(self.cfg),
                self.cfg.train.grad_accum,
                trainer.mesh,
                trainer.rules,
                "rl.ptx_batch_size",
            )
        engine = RolloutEngine
        if self.rl.environment:
            from jaxalign.trainers.episodes import EpisodeEngine

            engine = EpisodeEngine
        self.engine = engine(
            self.cfg,
            trainer.mesh,
            trainer.rules,
            trainer.graphdef,
            self.algorithm,
            self.tokenizer,
            self.scorer,
        )

    def observe_state(self, state: dict) -> None:
        """The loop's hook before every `next()`: the current parameters (the next rollout's)."""
        self._params = state["params"]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.queue:
            self._rollout()
        self.position += 1
        self._last_ids = self.queue_ids.pop(0)
        batch = self.queue.pop(0)
        if self.ptx is not None:
            batch = {**batch, **{PTX_PREFIX + k: v for k, v in next(self.ptx).items()}}
            self._last_ids = self._last_ids + self.ptx.record_ids()
        return batch

    @property
    def stats(self) -> dict:
        """The prompt data's counts (records, skipped, truncated, tokens) and the rollouts run
        (and the PPO-ptx data's counts under `ptx`)."""
        out = {**self.prompts.stats, "rollouts": self.rollouts}
        if self.ptx is not None:
            out["ptx"] = self.ptx.stats
        return out

    def report(self) -> str:
        """One line: the prompts read, skipped and truncated, and the rollouts generated."""
        return f"{self.prompts.report()}; {self.rollouts} rollouts of {self.rows} rows"

    def record_ids(self) -> list[str]:
        """The prompt record ids (`path:LINE`, ...) of the rows of the minibatch last returned
        (this process's rows), then those of its PPO-ptx records, for the NaN halt message.
        Host-side only."""
        return list(self._last_ids)

    def pop_metrics(self) -> dict[str, float]:
        """The mean of each rollout metric over the rollouts since the last call."""
        if not self._metrics:
            return {}
        keys = {k for m in self._metrics for k in m}
        out = {k: float(np.mean([m[k] for m in self._metrics if k in m])) for k in keys}
        self._metrics = []
        return out

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "prompts": self.prompts.get_state(),
            "rollouts": self.rollouts,
            "position": self.position % self.steps_per_rollout if self.rollouts else 0,
            "kl_controller": self.algorithm.kl_controller.get_state(),
            **({"ptx": self.ptx.get_state()} if self.ptx is not None else {}),
        }

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from every process's (the trainer's `global_data_state`): the prompts, the
        rollout position and the KL controller are the same on every process; the PPO-ptx
        iterators' shards are merged, so the run resumes under any process count."""
        from jaxalign.data import merge_states

        out = dict(states[0])
        if "ptx" in out:
            out["ptx"] = merge_states([s["ptx"] for s in states])
        return out

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError("RL data state has an unknown format")
        self.prompts.set_state(state["prompts"])
        # A run that did not use rl.ptx_file before starts reading it from the beginning.
        if self.ptx is not None and "ptx" in state:
            self.ptx.set_state(state["ptx"])
        self.rollouts = int(state["rollouts"])
        self.algorithm.kl_controller.set_state(state["kl_controller"])
        self.skip = int(state["position"])
        self.position = 0
        self.queue, self.queue_ids = [], []

    # -- the rollout ----------------------------------------------------------------------------

    def _prompt_batches(self) -> Iterator[PromptBatch]:
        """The engine's prompts: the next global batch at every `next()`."""
        while True:
            batch = next(self.prompts)
            yield batch, self.prompts.record_ids()

    def _rollout(self) -> None:
        """Run a rollout from the observed parameters and queue its minibatches."""
        rl, algorithm = self.rl, self.algorithm
        if self._params is None:
            raise RuntimeError("RolloutData needs start(trainer) and observe_state(state) first")
        jax.block_until_ready(self._params)  # finish the previous rollout's training first
        # time/train ends and time/rollout starts here: the wait above is training, not rollout.
        t_start = time.perf_counter()
        timings = {}
        if self._last_rollout_end is not None:
            timings["time/train"] = t_start - self._last_rollout_end
        metrics: dict[str, float] = {}
        engine = self.engine
        if engine.eval_sampler is not None and self.rollouts % rl.eval_every == 0:
            t = time.perf_counter()
            metrics.update(engine.evaluate(algorithm.policy_params(self._params)))
            timings["time/eval"] = time.perf_counter() - t
        result = engine.rollout(
            self._prompt_batches(),
            self._params,
            algorithm.reference_on_device,  # None: no reference (uses_reference)
            self.rollouts,
            algorithm.kl_controller.kl_coef,
        )
        algorithm.reference_release()
        metrics.update(result.metrics)

        self.packed_rows = []
        self._enqueue(result.buffer, result.row_ids)
        if self.packed_rows:
            metrics["rollout/packed_rows"] = float(np.mean(self.packed_rows))
        self.rollouts += 1
        self.position = self.skip
        self.skip = 0
        metrics["rollout/index"] = float(self.rollouts)
        end = time.perf_counter()
        timings["time/rollout"] = end - t_start
        if "time/train" in timings:
            timings["time/iteration"] = timings["time/train"] + timings["time/rollout"]
        metrics.update(timings)
        self._metrics.append(metrics)
        self._last_rollout_end = end

    def _enqueue(self, buffer: dict[str, np.ndarray], row_ids: list[str]) -> None:
        """Queue `epochs` shuffled passes of minibatches, this process's rows of each, shaped
        [grad_accum, rows / grad_accum / process_count, ...], with the prompt record ids of
        their rows; drop those a resume skips."""
        t = self.cfg.train
        batch, accum = t.batch_size, t.grad_accum
        local = batch // accum // self.process_count
        queue, queue_ids = [], []
        lengths = sequence_spans(buffer["segment_ids"])[1] if self.rl.pack_rows > 1 else None
        for epoch in range(self.rl.epochs):
            order = np.random.default_rng([self.cfg.data.seed, self.rollouts, epoch]).permutation(
                self.rows
            )
            for k in range(self.rows // batch):
                idx = order[k * batch : (k + 1) * batch].reshape(accum, batch // accum)
                mine = idx[:, self.process_index * local : (self.process_index + 1) * local]
                if lengths is not None:
                    queue.append(self._packed(buffer, lengths, idx, mine))
                else:
                    queue.append({name: v[mine] for name, v in buffer.items()})
                queue_ids.append([row_ids[i] for i in mine.reshape(-1).tolist()])
        self.queue = queue[self.skip :]
        self.queue_ids = queue_ids[self.skip :]

    def _packed(
        self, buffer: dict[str, np.ndarray], lengths: np.ndarray, idx: np.ndarray, mine: np.ndarray
    ) -> dict:
        """This process's micro-batches (its rows `mine` [accum, local] of the minibatch's global
        rows `idx` [accum, rows]), packed (`pack_micro_batch`) into as many rows as the fullest
        micro-batch of any process needs, rounded up to a multiple of 8 and of the local devices
        (at most the plain row count): one shape for every process, and few shapes
        (compilations) over a run. `lengths`: every buffer row's real tokens."""
        per_row, width = self.rl.pack_rows, buffer["tokens"].shape[-1]
        plans = [
            [pack_plan(lengths[part], width, per_row) for part in np.split(m, self.process_count)]
            for m in idx
        ]
        most = max(len(plan) for micro in plans for plan in micro)
        rows = packed_row_count(most, jax.local_device_count(), mine.shape[1])
        packed = [
            pack_micro_batch(
                {name: v[m] for name, v in buffer.items()},
                micro[self.process_index],
                rows,
                per_row,
                self.tokenizer.pad_id,
            )
            for m, micro in zip(mine, plans, strict=True)
        ]
        self.packed_rows.append(rows)
        return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


def ptx_rows(cfg: Config) -> int:
    """Global PPO-ptx rows per optimizer step."""
    return cfg.rl.ptx_batch_size or cfg.train.batch_size


def ptx_iterator(cfg: Config, tokenizer, process_index: int, process_count: int):
    """The PPO-ptx data (`rl.ptx_file`, packed SFT-style rows of train.seq_len tokens), or None
    when `rl.ptx_coef` is 0."""
    if not cfg.rl.ptx_coef:
        return None
    from jaxalign.data import sft_iterator_from_config

    data = sft_iterator_from_config(
        cfg.data,
        tokenizer,
        seq_len=cfg.train.seq_len,
        global_batch_size=ptx_rows(cfg),
        grad_accum=cfg.train.grad_accum,
        process_index=process_index,
        process_count=process_count,
        path=cfg.rl.ptx_file,
    )
    if process_index == 0:
        logger.info("rl.ptx_file: %s", data.report())
    return data


def steps_per_rollout(cfg: Config) -> int:
    rl = cfg.rl
    return rl.epochs * rl.prompts_per_rollout * rl.num_generations // cfg.train.batch_size


def uses_reference(cfg: Config) -> bool:
    """Whether an RL run keeps a frozen reference policy: only for a KL term (rl.kl_coef > 0, or
    PPO's adaptive controller). GRPO with kl_coef 0 (as DAPO and Dr. GRPO train, and TRL's
    default beta) holds no reference copy and runs no reference forward."""
    return cfg.rl.kl_coef > 0 or cfg.rl.kl_target is not None


def validate_rl_config(cfg: Config, trainer: str) -> None:
    """Cross-field checks of an RL config (ConfigError naming the keys)."""
    rl, t, sp = cfg.rl, cfg.train, cfg.sampling
    rows = rl.prompts_per_rollout * rl.num_generations
    width = max(cfg.data.prompt_buckets) + sp.max_new_tokens
    if rl.prompts_per_rollout <= 0 or rl.num_generations <= 0 or rl.epochs <= 0:
        raise ConfigError(
            "rl.prompts_per_rollout, rl.num_generations and rl.epochs must be positive"
        )
    algorithm = get_trainer(trainer)
    if not algorithm.masks_truncated and rl.mask_truncated_completions:
        raise ConfigError(
            "rl.mask_truncated_completions is for grpo, rloo and reinforce_pp "
            "(PPO: rl.missing_eos_penalty)"
        )
    if algorithm.group_relative and rl.num_generations < 2:
        raise ConfigError(f"trainer {trainer}: rl.num_generations (the group size) must be >= 2")
    if rl.reinforce_baseline and (not algorithm.has_reinforce_baseline or rl.num_generations < 2):
        raise ConfigError(
            "rl.reinforce_baseline is for trainer reinforce_pp with rl.num_generations >= 2"
        )
    if rows % t.batch_size:
        raise ConfigError(
            f"rl.prompts_per_rollout * rl.num_generations ({rows} rows per "
            f"rollout) must divide by train.batch_size ({t.batch_size})"
        )
    per_rollout = steps_per_rollout(cfg)
    if t.steps % per_rollout:
        raise ConfigError(
            f"train.steps ({t.steps}) must be a multiple of the optimizer steps per "
            f"rollout (rl.epochs * rows / train.batch_size = {per_rollout})"
        )
    if cfg.checkpoint.every % per_rollout:
        raise ConfigError(
            f"checkpoint.every ({cfg.checkpoint.every}) must be a multiple of the "
            f"optimizer steps per rollout ({per_rollout}): checkpoints are taken "
            "at rollout boundaries"
        )
    if t.seq_len != width:
        raise ConfigError(
            f"train.seq_len must be max(data.prompt_buckets) + "
            f"sampling.max_new_tokens = {width} for RL, got {t.seq_len}"
        )
    context = cfg.mesh.context * cfg.mesh.dcn_context
    if context > 1:  # every row width (a prompt bucket + a response bucket): docs/context.md
        for p, r in ((p, r) for p in cfg.data.prompt_buckets for r in response_buckets(cfg)):
            if (p + r) % (2 * context):
                raise ConfigError(
                    f"rows of prompt bucket {p} + response bucket {r} tokens do not divide by 2 x "
                    f"the context axis ({context}); choose data.prompt_buckets and "
                    "rl.response_buckets that do (e.g. multiples of 2 x mesh.context)"
                )
    if sp.temperature <= 0:
        raise ConfigError("RL samples from the policy: sampling.temperature must be > 0")
    penalties = sp.repetition_penalty != 1 or sp.presence_penalty or sp.frequency_penalty
    if rl.old_logprobs == "sampler" and (sp.top_k or sp.top_p < 1 or sp.min_p > 0 or penalties):
        raise ConfigError(
            "rl.old_logprobs: sampler needs sampling.top_k = 0, top_p = 1, min_p = 0 and no "
            "repetition, presence or frequency penalty (the sampled distribution must be the "
            "policy's)"
        )
    per_call = min(rows, sp.batch_size * rl.num_generations)
    if rows % per_call:
        raise ConfigError(
            f"rows per rollout ({rows}) must divide by sampling.batch_size * "
            f"rl.num_generations ({per_call})"
        )
    if rl.importance_sampling == "sequence" and not algorithm.group_relative:
        raise ConfigError(
            "rl.importance_sampling: sequence (GSPO) is for grpo and rloo (sequence advantages)"
        )
    names = reward_names(rl.reward_functions, bool(rl.reward_model))
    if rl.reward_weights is not None and len(rl.reward_weights) != len(names):
        raise ConfigError(
            f"rl.reward_weights has {len(rl.reward_weights)} weights for {len(names)} "
            f"rewards ({', '.join(names)}: rl.reward_functions, then rl.reward_model)"
        )
    if rl.filter_groups and not algorithm.group_relative:
        raise ConfigError("rl.filter_groups is for grpo and rloo (groups of samples per prompt)")
    if rl.max_generate_rounds < 1:
        raise ConfigError(f"rl.max_generate_rounds must be >= 1, got {rl.max_generate_rounds}")
    if rl.forward_batch_size < 0 or (rl.forward_batch_size and rows % rl.forward_batch_size):
        raise ConfigError(
            f"rl.forward_batch_size ({rl.forward_batch_size}) must divide the rows per rollout "
            f"({rows}), or be 0 (all rows in one forward)"
        )
    if rl.pack_rows < 0:
        raise ConfigError(f"rl.pack_rows must be >= 0 (0 or 1: no packing), got {rl.pack_rows}")
    if rl.response_buckets is not None and any(b <= 0 for b in rl.response_buckets):
        raise ConfigError(f"rl.response_buckets must be positive, got {rl.response_buckets}")
    if rl.kl_target is not None and rl.kl_target <= 0:
        raise ConfigError("rl.kl_target must be positive (or null: a fixed coefficient)")
    if rl.kl_target is not None and algorithm.kl_in_loss:
        raise ConfigError(
            f"rl.kl_target (an adaptive KL penalty in the reward) is for ppo and reinforce_pp; "
            f"{trainer} weighs its KL loss term by rl.kl_coef"
        )
    if rl.kl_coef < 0 or rl.clip_eps <= 0 or rl.value_clip <= 0:
        raise ConfigError("rl.kl_coef must be >= 0, rl.clip_eps and rl.value_clip positive")
    if rl.clip_eps_high is not None and rl.clip_eps_high < rl.clip_eps:
        raise ConfigError(
            f"rl.clip_eps_high ({rl.clip_eps_high}) must be >= rl.clip_eps ({rl.clip_eps})"
        )
    if rl.environment:
        validate_environment_config(cfg, trainer)
    if rl.turn_rewards and (not rl.environment or algorithm.group_relative):
        raise ConfigError(
            "rl.turn_rewards is for ppo and reinforce_pp with rl.environment (GRPO and RLOO "
            "score whole episodes)"
        )
    if rl.ptx_coef < 0 or rl.ptx_batch_size < 0:
        raise ConfigError("rl.ptx_coef and rl.ptx_batch_size must be >= 0")
    if rl.ptx_coef and not rl.ptx_file:
        raise ConfigError("rl.ptx_coef > 0 needs rl.ptx_file (the PPO-ptx data)")
    if rl.ptx_coef and ptx_rows(cfg) % (t.grad_accum * jax.process_count()):
        raise ConfigError(
            f"rl.ptx_batch_size ({ptx_rows(cfg)} rows) must divide by train.grad_accum x "
            f"processes ({t.grad_accum} x {jax.process_count()})"
        )


def validate_environment_config(cfg: Config, trainer: str) -> None:
    """The rl.environment keys (multi-turn episodes, `trainers/episodes.py`)."""
    rl, sp = cfg.rl, cfg.sampling
    if rl.reward_functions or rl.reward_model:
        raise ConfigError(
            "rl.environment gives the rewards: leave rl.reward_functions and rl.reward_model empty"
        )
    if rl.max_turns < 1:
        raise ConfigError(f"rl.max_turns must be >= 1, got {rl.max_turns}")
    if not 0 <= rl.turn_tokens <= sp.max_new_tokens:
        raise ConfigError(
            f"rl.turn_tokens must be in [0, sampling.max_new_tokens = {sp.max_new_tokens}] "
            f"(0: sampling.max_new_tokens), got {rl.turn_tokens}"
        )
    if rl.tool_timeout <= 0:
        raise ConfigError(f"rl.tool_timeout must be positive seconds, got {rl.tool_timeout}")
    if rl.tool_max_chars <= 0:
        raise ConfigError(f"rl.tool_max_chars must be positive, got {rl.tool_max_chars}")
    from jaxalign.envs import ToolSettings, load_environment

    load_environment(rl.environment, ToolSettings.from_rl(rl))  # a bad spec fails here, early
