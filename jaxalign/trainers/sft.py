"""Supervised fine-tuning: next-token cross-entropy on completion/assistant tokens only."""

from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import Config, LossConfig, TrainConfig
from jaxalign.losses import token_cross_entropy_sum
from jaxalign.trainers.base import Algorithm

logger = logging.getLogger(__name__)


def next_token_loss(model: nnx.Module, batch: dict, loss_cfg: LossConfig):
    """(summed cross-entropy over target tokens, number of target tokens) of a Transformer on
    packed rows: inputs, targets, loss_mask, segment_ids, positions, each [B, T]. The SFT loss,
    and RL's PPO-ptx term."""
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_cross_entropy_sum(
        hidden,
        model.output_weight(),
        batch["targets"],
        batch["loss_mask"],
        chunks=loss_cfg.vocab_chunks,
        z_loss=loss_cfg.z_loss,
        soft_cap=model.cfg.final_logit_softcap,
    )


def row_batch(train: TrainConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of packed rows [grad_accum, batch_size / grad_accum, seq_len]."""
    shape = (train.grad_accum, train.batch_size // train.grad_accum, train.seq_len)
    keys = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
    keys.update(segment_ids=jnp.int32, positions=jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, dtype in keys.items()}


class SFT(Algorithm):
    """The SFT algorithm: a loss over packed rows and the data that feeds it."""

    def __init__(self, cfg: Config):
        from jaxalign.data import load_tokenizer  # data (Grain) only when reading data

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            from jaxalign.errors import ConfigError

            raise ConfigError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({self.tokenizer.vocab_size}, {cfg.data.tokenizer})"
            )

    @classmethod
    def abstract_batch(cls, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        """Packed rows: inputs, targets, segment_ids, positions (int32), loss_mask (float32)."""
        return row_batch(cfg.train)

    def loss_fn(self, model: nnx.Module, batch: dict, rng: jax.Array, frozen=None):
        """Summed cross-entropy over target tokens, the number of target tokens, no extras."""
        return (*next_token_loss(model, batch, self.cfg.loss), {})

    def _iterator(self, path, process_index, process_count, **kwargs):
        from jaxalign.data import sft_iterator_from_config

        t = self.cfg.train
        return sft_iterator_from_config(
            self.cfg.data,
            self.tokenizer,
            seq_len=t.seq_len,
            global_batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            process_index=process_index,
            process_count=process_count,
            path=path,
            **kwargs,
        )

    def train_data(self, process_index: int, process_count: int):
        # path None: data.train_file, or data.mixture when set.
        data = self._iterator(None, process_index, process_count)
        if process_index == 0:  # records read, bad ones skipped (data.on_error: skip), truncated
            logger.info("%s", data.report())
        return data

    def eval_data(self, process_index: int, process_count: int):
        if not self.cfg.data.eval_file:
            return None
        it = self._iterator(
            self.cfg.data.eval_file, process_index, process_count, shuffle=False, num_epochs=1
        )
        return list(itertools.islice(it, self.cfg.train.eval_batches))
