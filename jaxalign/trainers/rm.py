"""Bradley-Terry reward models (`trainer: rm`) and scoring responses with a trained one.

The loss over pairs is -log s(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 (see
docs/trainers/rm.md); chosen and rejected go through the model in one forward pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.checkpoint import abstract_with_shardings, load_params, resolve_checkpoint
from jaxalign.config import Config, load_config
from jaxalign.data import load_tokenizer, preference_iterator_from_config, render, to_messages
from jaxalign.data.preference import read_preference_jsonl, tokenize_preferences
from jaxalign.errors import ConfigError, DataError, UserError
from jaxalign.losses import reward_model_pair_losses
from jaxalign.models.reward import RewardModel
from jaxalign.paths import run_path

STATS_FILE = "reward_stats.json"


def pairs_to_rows(x: jax.Array) -> jax.Array:
    """[P, 2, ...] -> [2P, ...] (chosen and rejected rows interleaved: one forward pass)."""
    return x.reshape(x.shape[0] * 2, *x.shape[2:])


def pair_tokens(local: dict) -> int:
    """Real tokens of both the chosen and the rejected rows of a process's preference batch
    (padding and filler pairs excluded): what tokens/s counts for preference trainers."""
    return int(np.count_nonzero(local["segment_ids"]))


def check_vocab(cfg: Config, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}, {cfg.data.tokenizer})"
        )


def checkpoint_trainer(path: str) -> str | None:
    """The `trainer` recorded in a checkpoint's config (None if it cannot be read)."""
    try:
        config = json.loads((resolve_checkpoint(path) / "config" / "metadata").read_text())
    except (OSError, ValueError):
        return None
    return config.get("trainer") if isinstance(config, dict) else None


class RewardModelAlgorithm:
    """The RM algorithm: a RewardModel, the Bradley-Terry loss, and preference batches."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(cfg, self.tokenizer)

    def make_model(self, rngs: nnx.Rngs) -> RewardModel:
        return RewardModel(self.cfg.model, rngs)

    def pair_rewards(self, model: RewardModel, batch: dict) -> jax.Array:
        """Rewards [P, 2] (chosen, rejected) of a batch [P, 2, T], in one forward pass."""
        rewards = model(
            pairs_to_rows(batch["tokens"]),
            pairs_to_rows(batch["positions"]),
            pairs_to_rows(batch["segment_ids"]),
        )
        return rewards.reshape(-1, 2)

    def loss_fn(self, model: RewardModel, batch: dict, rng: jax.Array, frozen=None):
        """Summed pair losses, the number of pairs, and metric sums (see docs/trainers/rm.md)."""
        rewards = self.pair_rewards(model, batch)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        mask = batch["pair_mask"]
        losses = reward_model_pair_losses(
            chosen, rejected, margin=batch["margin"], center_coef=self.cfg.rm.center_coef
        )
        real = mask[:, None] > 0
        metrics = {
            "accuracy": jnp.sum(mask * (chosen > rejected)),
            "margin": jnp.sum(mask * (chosen - rejected)),
            "reward/chosen": jnp.sum(mask * chosen),
            "reward/rejected": jnp.sum(mask * rejected),
            "reward/mean": jnp.sum(mask * (chosen + rejected)) / 2,
            # Reduced by min/max over the whole batch and eval split (trainers/step.py).
            "min:reward/min": jnp.min(jnp.where(real, rewards, jnp.inf)),
            "max:reward/max": jnp.max(jnp.where(real, rewards, -jnp.inf)),
        }
        return jnp.sum(mask * losses), mask.sum(), metrics

    def batch_tokens(self, local: dict) -> int:
        """Tokens/s counts the real tokens of chosen and rejected (see `pair_tokens`)."""
        return pair_tokens(local)

    def _iterator(self, path, process_index, process_count, **kwargs):
        return preference_iterator_from_config(
            self.cfg,
            self.tokenizer,
            path=path,
            process_index=process_index,
            process_count=process_count,
            **kwargs,
        )

    def train_data(self, process_index: int, process_count: int):
        return self._iterator(self.cfg.data.train_file, process_index, process_count)

    def eval_data(self, process_index: int, process_count: int):
        if not self.cfg.data.eval_file:
            return None
        it = self._iterator(
            self.cfg.data.eval_file, process_index, process_count, shuffle=False, num_epochs=1
        )
        return list(itertools.islice(it, self.cfg.train.eval_batches))

    # -- hooks around the loop (called by `jaxalign train`) -------------------------------------

    def initial_params(self, trainer) -> Any | None:
        """Parameters from a policy checkpoint (`init_from` an SFT run): its transformer becomes
        the backbone and the head is freshly initialized. None: the trainer's default."""
        cfg = self.cfg
        if not cfg.init_from or checkpoint_trainer(cfg.init_from) == "rm":
            return None
        backbone = load_params(
            cfg.init_from,
            abstract_with_shardings(
                trainer.abstract_params["backbone"], trainer.param_shardings["backbone"]
            ),
        )

        def init_head(key):  # XLA drops the unused backbone initialization
            return nnx.split(self.make_model(nnx.Rngs(params=key)))[1].to_pure_dict()["score"]

        score = jax.jit(init_head, out_shardings=trainer.param_shardings["score"])(
            jax.random.PRNGKey(cfg.train.seed)
        )
        return {"backbone": backbone, "score": score}

    def on_train_end(self, trainer, result) -> dict:
        """Save reward statistics over rm.stats_file (default: the eval split) to RUN_DIR."""
        cfg = self.cfg
        path = cfg.rm.stats_file or cfg.data.eval_file or cfg.data.train_file
        scorer = RewardScorer(
            trainer.graphdef, result.state["params"], trainer.mesh, trainer.rules, cfg.train.seq_len
        )
        stats = reward_statistics(scorer, path, cfg, self.tokenizer)
        if jax.process_index() == 0:
            (run_path(cfg.run_dir) / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
        return stats


def reward_statistics(scorer: RewardScorer, path: str, cfg: Config, tokenizer) -> dict:
    """Mean and std of rewards over the chosen and rejected responses of a preference file, and
    the fraction of its pairs where chosen scores higher."""
    records, _ = read_preference_jsonl(path, on_error=cfg.data.on_error)
    examples, _ = tokenize_preferences(
        records,
        tokenizer,
        template=cfg.data.template,
        seq_len=cfg.train.seq_len,
        where=path,
        max_prompt_length=cfg.preference.max_prompt_length,
        too_long=cfg.preference.too_long,
    )
    rewards = scorer.score([ids for e in examples for ids in e["ids"]]).reshape(-1, 2)
    return {
        "mean": float(rewards.mean()),
        "std": float(rewards.std()),
        "count": int(rewards.size),
        "accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1])),
        "pairs": len(examples),
        "file": str(path),
    }


class RewardScorer:
    """Rewards of token sequences with fixed parameters, in padded batches on a mesh."""

    def __init__(self, graphdef, params, mesh, rules, max_len: int, batch_size: int = 32):
        self.max_len = max_len
        divisor = shd.batch_divisor(mesh, rules)
        self.batch_size = math.ceil(batch_size / divisor) * divisor
        self.sharding = NamedSharding(mesh, shd.logical_to_spec(("batch", None), rules))
        self.params = params

        def rewards(p, tokens, positions, segment_ids):
            return nnx.merge(graphdef, p)(tokens, positions, segment_ids)

        self._fn = jax.jit(rewards, out_shardings=NamedSharding(mesh, P()))

    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, self.sharding, lambda idx: x[idx])

    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        """Rewards [N] float32 of N id sequences (longer than max_len: the end is kept)."""
        out = np.zeros(len(sequences), np.float32)
        for start in range(0, len(sequences), self.batch_size):
            chunk = [
                np.asarray(s[-self.max_len :]) for s in sequences[start : start + self.batch_size]
            ]
            width = min(self.max_len, -(-max(len(s) for s in chunk) // 16) * 16)
            tokens = np.zeros((self.batch_size, width), np.int32)
            segment_ids = np.zeros_like(tokens)
            positions = np.zeros_like(tokens)
            for r, ids in enumerate(chunk):
                tokens[r, : len(ids)] = ids
                segment_ids[r, : len(ids)] = 1
                positions[r, : len(ids)] = np.arange(len(ids))
            values = self._fn(
                self.params, self._put(tokens), self._put(positions), self._put(segment_ids)
            )
            out[start : start + len(chunk)] = np.asarray(values)[: len(chunk)]
        return out


def load_reward_model(run_dir: str) -> tuple[Config, RewardScorer, dict | None]:
    """The config, a scorer with the latest checkpoint's parameters, and the saved reward
    statistics (None if absent) of an RM run directory."""
    from jaxalign.trainers.loop import build_model

    config_path = run_path(run_dir, key="reward model") / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(config_path)
    if cfg.trainer != "rm":
        raise UserError(f"{run_dir}: was trained with trainer '{cfg.trainer}', not a reward model")
    # The run's tensor parallelism, FSDP over whatever devices are here now.
    mesh = shd.make_mesh(
        dataclasses.replace(cfg.mesh, data=1, fsdp=-1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )
    rules = shd.resolve_rules(cfg.sharding)
    graphdef, abstract, shardings = build_model(
        cfg, mesh, rules, lambda rngs: RewardModel(cfg.model, rngs)
    )
    params = load_params(run_dir, abstract_with_shardings(abstract, shardings))
    stats_path = config_path.parent / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    return cfg, RewardScorer(graphdef, params, mesh, rules, cfg.train.seq_len), stats


def record_messages(record: Any, where: str) -> list[dict]:
    """A scoring record as messages: {prompt (text or messages), response | completion} or
    {messages}, like SFT records."""
    if isinstance(record, dict) and "messages" not in record:
        response = record.get("response", record.get("completion"))
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            record = {"messages": [*prompt, {"role": "assistant", "content": response}]}
        else:
            extra = {"system": record["system"]} if "system" in record else {}
            record = {"prompt": prompt, "completion": response, **extra}
    return to_messages(record, where=where)


def score_file(model_dir: str, input_path: str, output_path: str | None = None) -> dict:
    """Write every record of `input_path` with its `reward` (and `reward_normalized` when the run
    saved statistics) as JSONL to `output_path` (stdout if None). Returns counts."""
    cfg, scorer, stats = load_reward_model(model_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if not Path(input_path).is_file():
        raise DataError("input file not found", where=input_path)
    records, sequences = [], []
    with open(input_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{input_path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"malformed JSON ({e.msg} at column {e.colno})", where=where
                ) from None
            ids, _ = render(record_messages(record, where), tokenizer, cfg.data.template)
            records.append(record)
            sequences.append(ids)
    if not records:
        raise DataError("no records to score", where=input_path)
    rewards = scorer.score(sequences)
    truncated = sum(len(s) > cfg.train.seq_len for s in sequences)
    if jax.process_index() != 0:  # every process scores; process 0 writes
        output_path = os.devnull
    out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    try:
        for record, reward in zip(records, rewards, strict=True):
            row = {**record, "reward": float(reward)}
            if stats is not None:
                row["reward_normalized"] = (float(reward) - stats["mean"]) / max(stats["std"], 1e-8)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if output_path:
            out.close()
    return {"records": len(records), "truncated": truncated}
