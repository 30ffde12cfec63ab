"""Bradley-Terry reward models (`trainer: rm`). Scoring with a trained one (RL rewards,
rejection sampling, `jaxalign score`) is `jaxalign.rewards.model`.

The loss over pairs is -log s(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 (see
docs/trainers/rm.md); chosen and rejected go through the model in one forward pass.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.checkpoint import abstract_with_shardings, resolve_checkpoint
from jaxalign.config import Config
from jaxalign.data import load_tokenizer, preference_iterator_from_config
from jaxalign.data.preference import read_preference_jsonl, tokenize_preferences
from jaxalign.errors import ConfigError
from jaxalign.losses import reward_model_pair_losses
from jaxalign.models.reward import RewardModel
from jaxalign.paths import run_path
from jaxalign.rewards.model import STATS_FILE, RewardModelRunner
from jaxalign.trainers.base import Algorithm
from jaxalign.trainers.lora_runs import load_init_from


def pairs_to_rows(x: jax.Array) -> jax.Array:
    """[P, 2, ...] -> [2P, ...] (chosen and rejected rows interleaved: one forward pass)."""
    return x.reshape(x.shape[0] * 2, *x.shape[2:])


def is_packed(batch: dict) -> bool:
    """Whether a preference micro-batch is packed ([rows, row_len] tokens) rather than padded
    pairs ([pairs, 2, seq_len])."""
    return batch["tokens"].ndim == 2


def pair_values(batch: dict, key: str) -> jax.Array:
    """A per-pair array of either layout, flat over pairs: margin, pair_mask [P], ref_logps
    [P, 2] (packed: P = rows x pairs_per_row slots, unused slots masked)."""
    x = batch[key]
    return x.reshape(-1, 2) if key == "ref_logps" else x.reshape(-1)


def pair_tokens(local: dict) -> int:
    """Real tokens of both the chosen and the rejected rows of a process's preference batch
    (padding and filler pairs excluded): what tokens/s counts for preference trainers."""
    return int(np.count_nonzero(local["segment_ids"]))


def packed_row_multiple(train: Any) -> int:
    """What the global rows of packed eval batches must divide by: the train iterator's (set from
    the mesh when the loop starts it), else 1."""
    return 1 if train is None else train.row_multiple


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


def pair_batch(cfg: Config, ref_logps: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of preference pairs (`data.preference`'s BATCH_KEYS): tokens,
    segment_ids, positions (int32) and loss_mask (float32) [grad_accum, pairs, 2, seq_len];
    margin and pair_mask (float32) [grad_accum, pairs]; with `ref_logps` also the precomputed
    reference log-probs (float32) [grad_accum, pairs, 2]. pairs = batch_size / grad_accum.

    Packed (`preference.pack_pairs`), the largest batch a step can get: every pair in a row of
    its own, [grad_accum, pairs, 2 x seq_len] and [grad_accum, pairs, 1] (`ref_logps`
    [grad_accum, pairs, 1, 2]); the same tokens as padded pairs, in rows twice as long."""
    train = cfg.train
    lead = (train.grad_accum, train.batch_size // train.grad_accum)
    packed = cfg.preference.pack_pairs
    rows = {"tokens": jnp.int32, "loss_mask": jnp.float32}
    rows.update(segment_ids=jnp.int32, positions=jnp.int32)
    row_shape = (*lead, 2 * train.seq_len) if packed else (*lead, 2, train.seq_len)
    pair_shape = (*lead, 1) if packed else lead
    out = {k: jax.ShapeDtypeStruct(row_shape, d) for k, d in rows.items()}
    out.update({k: jax.ShapeDtypeStruct(pair_shape, jnp.float32) for k in ("margin", "pair_mask")})
    if ref_logps:
        out["ref_logps"] = jax.ShapeDtypeStruct((*pair_shape, 2), jnp.float32)
    return out


class RewardModelAlgorithm(Algorithm):
    """The RM algorithm: a RewardModel, the Bradley-Terry loss, and preference batches."""

    is_reward_model = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(cfg, self.tokenizer)
        self._train = None

    @classmethod
    def abstract_batch(cls, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        return pair_batch(cfg)

    @classmethod
    def make_model(cls, cfg: Config, rngs: nnx.Rngs) -> RewardModel:
        return RewardModel(cfg.model, rngs)

    @classmethod
    def unused_params(cls, cfg: Config) -> list[str]:
        """The backbone's untied LM head: no reward reads it."""
        return [] if cfg.model.tie_embeddings else ["^backbone/lm_head$"]

    @classmethod
    def lora_trained(cls, cfg: Config) -> list[str]:
        """The score head trains beside the adapters."""
        return ["score"]

    def pair_rewards(self, model: RewardModel, batch: dict) -> jax.Array:
        """Rewards [P, 2] (chosen, rejected) of a batch [P, 2, T], in one forward pass; of a
        packed batch, of every pair slot (`pair_values` order)."""
        if is_packed(batch):
            slots = batch["pair_mask"].shape[-1]
            rewards = model.segment_rewards(
                batch["tokens"], batch["positions"], batch["segment_ids"], 2 * slots
            )
            return rewards.reshape(-1, 2)
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
        mask = pair_values(batch, "pair_mask")
        losses = reward_model_pair_losses(
            chosen,
            rejected,
            margin=pair_values(batch, "margin"),
            center_coef=self.cfg.rm.center_coef,
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
        self._train = self._iterator(self.cfg.data.train_file, process_index, process_count)
        return self._train

    def eval_data(self, process_index: int, process_count: int):
        if not self.cfg.data.eval_file:
            return None
        it = self._iterator(
            self.cfg.data.eval_file,
            process_index,
            process_count,
            shuffle=False,
            num_epochs=1,
            row_multiple=packed_row_multiple(self._train),
        )
        return list(itertools.islice(it, self.cfg.train.eval_batches))

    # -- hooks around the loop (called by `jaxalign train`) -------------------------------------

    def initial_params(self, trainer) -> Any | None:
        """Parameters from a policy checkpoint (`init_from` an SFT run): its transformer becomes
        the backbone and the head is freshly initialized. None: the trainer's default (with
        LoRA, `lora_runs.lora_initial_params` maps a policy run into the backbone the same way)."""
        cfg = self.cfg
        if cfg.model.lora is not None:
            return None
        if not cfg.init_from or checkpoint_trainer(cfg.init_from) == cfg.trainer:
            return None
        backbone = load_init_from(  # a LoRA run's adapters merged into its base
            cfg.init_from,
            abstract_with_shardings(
                trainer.abstract_params["backbone"], trainer.param_shardings["backbone"]
            ),
        )

        def init_head(key):  # XLA drops the unused backbone initialization
            return nnx.split(self.make_model(cfg, nnx.Rngs(params=key)))[1].to_pure_dict()["score"]

        score = jax.jit(init_head, out_shardings=trainer.param_shardings["score"])(
            jax.random.PRNGKey(cfg.train.seed)
        )
        return {"backbone": backbone, "score": score}

    def on_train_end(self, trainer, result) -> dict:
        """Save reward statistics over rm.stats_file (default: the eval split) to RUN_DIR."""
        cfg = self.cfg
        path = cfg.rm.stats_file or cfg.data.eval_file or cfg.data.train_file
        scorer = RewardModelRunner(
            trainer.graphdef, result.state["params"], trainer.mesh, trainer.rules, cfg.train.seq_len
        )
        stats = reward_statistics(scorer, path, cfg, self.tokenizer)
        if jax.process_index() == 0:
            (run_path(cfg.run_dir) / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
        return stats


def reward_statistics(scorer: RewardModelRunner, path: str, cfg: Config, tokenizer) -> dict:
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
