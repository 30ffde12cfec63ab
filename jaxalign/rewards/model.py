"""Reward models as rewards: a trained `trainer: rm` run directory (or a Hugging Face
one-label `*ForSequenceClassification` directory) scoring token sequences in
padded batches on a mesh, and `score_file` (`jaxalign score`)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.checkpoint import abstract_with_shardings, load_params
from jaxalign.config import Config, load_config
from jaxalign.data import load_tokenizer, render, to_messages
from jaxalign.errors import DataError, UserError
from jaxalign.hf.model import hf_model_dir, run_config
from jaxalign.models.reward import RewardModel
from jaxalign.paths import run_path

STATS_FILE = "reward_stats.json"  # written to an RM run directory at the end of training
MAX_BATCH_SIZE = 32  # rows per reward-model forward, at most


class RewardModelRunner:
    """Rewards of token sequences with fixed parameters, in padded batches on a mesh.

    A batch has `batch_rows(n)` rows: the smallest power-of-two multiple of the devices the
    batch is split over that holds the n sequences, at most `max_batch_size` (rounded up to that
    multiple). So 8 rollout rows take one forward of 8 rows, not of 32, and the few sizes
    compile once each."""

    def __init__(
        self, graphdef, params, mesh, rules, max_len: int, max_batch_size: int = MAX_BATCH_SIZE
    ):
        self.max_len = max_len
        self.divisor = shd.batch_divisor(mesh, rules)
        self.max_batch_size = -(-max_batch_size // self.divisor) * self.divisor
        self.sharding = NamedSharding(mesh, shd.logical_to_spec(("batch", None), rules))
        self.params = params

        def rewards(p, tokens, positions, segment_ids):
            return nnx.merge(graphdef, p)(tokens, positions, segment_ids)

        self._fn = jax.jit(rewards, out_shardings=NamedSharding(mesh, P()))

    def batch_rows(self, count: int) -> int:
        """Rows of a forward over `count` sequences (see the class docstring)."""
        rows = self.divisor
        while rows < count and rows < self.max_batch_size:
            rows *= 2
        return min(rows, self.max_batch_size)

    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, self.sharding, lambda idx: x[idx])

    def score(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """Rewards [N] float32 of N id sequences (longer than max_len: the end is kept)."""
        out = np.zeros(len(sequences), np.float32)
        batch = self.batch_rows(len(sequences))
        for start in range(0, len(sequences), batch):
            chunk = [np.asarray(s[-self.max_len :]) for s in sequences[start : start + batch]]
            rows = self.batch_rows(len(chunk))
            width = min(self.max_len, -(-max(len(s) for s in chunk) // 16) * 16)
            tokens = np.zeros((rows, width), np.int32)
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


def load_reward_model(
    run_dir: str, source: str | None = None
) -> tuple[Config, RewardModelRunner, dict | None]:
    """The config, a runner with the latest checkpoint's parameters, and the saved reward
    statistics (None if absent) of an RM run directory, or of a Hugging Face one-label
    `*ForSequenceClassification` directory (no statistics; its tokenizer and chat template).
    `source` (a config key or flag) starts every error message."""
    from jaxalign.models.params import build_model
    from jaxalign.trainers.registry import get_trainer

    hf_dir = hf_model_dir(run_dir)
    if hf_dir is not None:
        return _load_hf_reward_model(hf_dir, source)
    where = f"{source}: {run_dir}" if source else str(run_dir)
    config_path = run_path(run_dir, key=source or "reward model") / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"{where}: not a run directory (no config.yaml) nor a Hugging Face model "
            "directory (no config.json)"
        )
    cfg = load_config(config_path)
    if not get_trainer(cfg.trainer).is_reward_model:
        raise UserError(f"{where}: was trained with trainer '{cfg.trainer}', not a reward model")
    # The run's tensor parallelism, FSDP over whatever devices are here now.
    mesh = shd.make_mesh(shd.fsdp_everywhere(cfg.mesh))
    rules = shd.resolve_rules(cfg.sharding)
    graphdef, abstract, shardings = build_model(
        cfg, mesh, rules, lambda rngs: RewardModel(cfg.model, rngs)
    )
    if cfg.model.lora is not None:  # adapters + score head onto the rebuilt base
        from jaxalign.trainers.lora_runs import load_lora_run

        params = load_lora_run(run_dir, cfg, get_trainer(cfg.trainer), mesh, rules)
    else:
        params = load_params(run_dir, abstract_with_shardings(abstract, shardings))
    stats_path = config_path.parent / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    return cfg, RewardModelRunner(graphdef, params, mesh, rules, cfg.train.seq_len), stats


def _load_hf_reward_model(directory: Path, source: str | None):
    from jaxalign.hf.convert import read_hf_config
    from jaxalign.hf.model import load_params as load_hf_params
    from jaxalign.models.params import build_model

    cfg = run_config(directory, reward=True, where=source)
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding)
    graphdef, abstract, shardings = build_model(
        cfg, mesh, rules, lambda rngs: RewardModel(cfg.model, rngs)
    )
    params = load_hf_params(directory, cfg.model, abstract, shardings)
    # Longer inputs keep their last tokens; the model's own limit when config.json names one.
    max_len = read_hf_config(directory).get("max_position_embeddings") or cfg.train.seq_len
    return cfg, RewardModelRunner(graphdef, params, mesh, rules, int(max_len)), None


class ModelReward:
    """A reward model's score of each row, optionally normalized by the run's saved statistics
    and kept in host memory between calls (`offload`).

    Rows come as token `sequences` (prompt + response in the RM's own tokenizer, as RL rollouts
    build them), or, without them, as message-list prompts and completions rendered with the
    RM's template (rejection sampling, the eval suite)."""

    needs_sequences = True

    def __init__(self, run_dir: str, source: str, *, normalize: bool = False, offload=False):
        self.source = source
        self.cfg, self.runner, self.saved_stats = load_reward_model(run_dir, source)
        self.tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        self.stats = self.saved_stats if normalize else None  # what scores are normalized by
        self.offload = offload
        self._host: Any = None

    def sequences(self, prompts: Sequence, completions: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each (message-list prompt, completion) row in the RM's template."""
        out = []
        for messages, completion in zip(prompts, completions, strict=True):
            convo = [*messages, {"role": "assistant", "content": completion}]
            out.append(render(convo, self.tokenizer, self.cfg.data.template)[0])
        return out

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        records: Sequence[dict],
        sequences: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Scores [N] float64 of N rows."""
        if sequences is None:
            sequences = self.sequences(prompts, completions)
        runner = self.runner
        if self._host is not None:  # back from host memory
            runner.params, self._host = shd.to_device(self._host), None
        rewards = runner.score(sequences).astype(np.float64)
        if self.offload:  # each process keeps its own shards
            self._host, runner.params = shd.to_host(runner.params), None
        if self.stats is not None:
            rewards = (rewards - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return rewards


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
    reward = ModelReward(model_dir, "--model")
    cfg, tokenizer = reward.cfg, reward.tokenizer
    stats = reward.saved_stats
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
    rewards = reward([], [], records, sequences)
    truncated = sum(len(s) > reward.runner.max_len for s in sequences)
    if jax.process_index() != 0:  # every process scores; process 0 writes
        output_path = os.devnull
    out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    try:
        for record, value in zip(records, rewards, strict=True):
            row = {**record, "reward": float(value)}
            if stats is not None:
                row["reward_normalized"] = (float(value) - stats["mean"]) / max(stats["std"], 1e-8)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if output_path:
            out.close()
    return {"records": len(records), "truncated": truncated}
