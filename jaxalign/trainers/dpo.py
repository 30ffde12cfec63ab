"""Direct preference optimization and its variants (`trainer: dpo`).

Sequence log-probs are sums over completion tokens; chosen and rejected rows go through the
policy (and the reference) in one forward pass each. The reference is a frozen copy of the
initial parameters, sharded like the policy, or log-probs precomputed once before training
(`dpo.precompute_ref`). Exact formulas: docs/trainers/dpo.md.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.checkpoint import abstract_with_shardings
from jaxalign.config import Config, to_dict
from jaxalign.data import load_tokenizer, preference_iterator_from_config
from jaxalign.data.preference import pad_pairs
from jaxalign.losses import (
    dpo_loss,
    masked_mean,
    orpo_loss,
    segment_logprobs,
    segment_sums,
    sequence_logprobs,
    simpo_loss,
)
from jaxalign.models import lora
from jaxalign.models.lora import adapters_off
from jaxalign.optim import trained_part, with_trained
from jaxalign.paths import run_path
from jaxalign.trainers.base import Algorithm
from jaxalign.trainers.rm import (
    check_vocab,
    is_packed,
    packed_row_multiple,
    pair_batch,
    pair_tokens,
    pair_values,
    pairs_to_rows,
)

REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALIZED = ("ipo", "simpo", "orpo")


def policy_statistics(model: nnx.Module, batch: dict, chunks: int = 1) -> dict[str, jax.Array]:
    """Per-pair sequence statistics, each [P, 2] (chosen, rejected), from one forward pass:
    `logps` (summed over completion tokens), `lengths` (completion tokens) and `mean_logits`
    (the logits' mean over vocabulary and completion tokens; before a final soft-cap (Gemma 2/3),
    which the log-probs do apply: the capped mean would need every token's full logits). A
    packed batch gives them for
    every pair slot, [rows x pairs_per_row, 2] (`rm.pair_values` order)."""
    if is_packed(batch):
        return packed_policy_statistics(model, batch, chunks)
    tokens = pairs_to_rows(batch["tokens"])
    mask = pairs_to_rows(batch["loss_mask"])
    hidden = model(tokens, pairs_to_rows(batch["positions"]), pairs_to_rows(batch["segment_ids"]))
    w_out = model.output_weight()
    soft_cap = model.cfg.final_logit_softcap
    logps, lengths = sequence_logprobs(
        hidden, w_out, tokens, mask, chunks=chunks, soft_cap=soft_cap
    )
    # mean_v(h . w_v) = h . mean_v(w_v): the mean logit without materializing [T, V] logits.
    token_mean_logits = jax.lax.stop_gradient(
        hidden[:, :-1] @ w_out.mean(axis=-1).astype(hidden.dtype)
    ).astype(jnp.float32)
    mean_logits = masked_mean(token_mean_logits, mask[:, 1:], axis=-1)
    return {
        "logps": logps.reshape(-1, 2),
        "lengths": lengths.reshape(-1, 2),
        "mean_logits": mean_logits.reshape(-1, 2),
    }


def packed_policy_statistics(
    model: nnx.Module, batch: dict, chunks: int = 1
) -> dict[str, jax.Array]:
    """`policy_statistics` of packed rows [R, L]: per segment (pair slot k: chosen 2k + 1,
    rejected 2k + 2), gathered to [R x pairs_per_row, 2]."""
    tokens, mask, segments = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
    num_segments = 2 * batch["pair_mask"].shape[-1]
    hidden = model(tokens, batch["positions"], segments)
    w_out = model.output_weight()
    logps, lengths = segment_logprobs(
        hidden,
        w_out,
        tokens,
        mask,
        segments,
        num_segments,
        chunks=chunks,
        soft_cap=model.cfg.final_logit_softcap,
    )
    token_mean_logits = jax.lax.stop_gradient(
        hidden[:, :-1] @ w_out.mean(axis=-1).astype(hidden.dtype)
    ).astype(jnp.float32)
    logit_sums = segment_sums(
        jnp.where(mask[:, 1:] > 0, token_mean_logits, 0.0), segments[:, 1:], num_segments
    )
    return {
        "logps": logps.reshape(-1, 2),
        "lengths": lengths.reshape(-1, 2),
        "mean_logits": (logit_sums / jnp.maximum(lengths, 1.0)).reshape(-1, 2),
    }


class DPO(Algorithm):
    """The DPO-family algorithm: a loss over chosen/rejected log-probs and preference batches."""

    frozen_from_initial = True  # the reference is a copy of the initial policy

    @classmethod
    def memory_terms(cls, cfg: Config, estimate: Any) -> None:
        """A frozen copy of the initial policy, unless its log-probs are precomputed or the
        loss needs none; the activations of both sequences of each pair."""
        from jaxalign import plan

        lora = cfg.model.lora is not None  # the reference is the base with adapters off
        if not (lora or cfg.dpo.precompute_ref or cfg.dpo.loss_type in REFERENCE_FREE):
            estimate.parts["reference"] = estimate.policy.params
        # a pair is two sequences, chosen and rejected, through the same forward
        estimate.parts["activations"] = plan.activation_bytes(
            cfg, estimate.sizes, estimate.rules, 2 * cfg.train.batch_size
        )

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(cfg, self.tokenizer)
        self.setup_loss()
        self._train = None
        self._eval = None  # eval batches, built once
        self._eval_ref = None  # precomputed reference log-probs of the eval pairs

    def setup_loss(self) -> None:
        self.reference_free = self.cfg.dpo.loss_type in REFERENCE_FREE
        self.precompute = self.cfg.dpo.precompute_ref and not self.reference_free
        self.lora = self.cfg.model.lora is not None

    @classmethod
    def abstract_batch(cls, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        """Preference pairs; with `dpo.precompute_ref`, their reference log-probs."""
        precompute = cfg.dpo.precompute_ref and cfg.dpo.loss_type not in REFERENCE_FREE
        return pair_batch(cfg, ref_logps=precompute)

    def abstract_frozen(self, trainer) -> Any:
        """What `frozen_params` keeps, shaped and sharded: {"reference": like the policy's
        parameters}, or with LoRA {"base_trained": the base parameters that train beside the
        adapters} (None when there are none)."""
        if self.reference_free or self.precompute:
            return None
        if self.lora:
            abstract = abstract_with_shardings(trainer.abstract_params, trainer.param_shardings)
            base_trained = lora.base_params(trained_part(abstract, trainer.labels))
            return {"base_trained": base_trained} if jax.tree.leaves(base_trained) else None
        return {
            "reference": abstract_with_shardings(trainer.abstract_params, trainer.param_shardings)
        }

    # -- the loss ------------------------------------------------------------------------------

    def loss_fn(self, model: nnx.Module, batch: dict, rng: jax.Array, frozen: Any = None):
        """Summed pair losses, the number of pairs, and metric sums."""
        d = self.cfg.dpo
        chunks = self.cfg.loss.vocab_chunks
        # The reference has the policy's structure as merged, before its forward pass sows
        # anything (a MoE router's aux loss and metrics).
        graphdef, state = nnx.split(model)
        policy = policy_statistics(model, batch, chunks)
        logps, lengths = policy["logps"], policy["lengths"]
        avg_logps = logps / jnp.maximum(lengths, 1.0)
        if d.loss_type == "simpo":
            losses = simpo_loss(
                avg_logps[:, 0],
                avg_logps[:, 1],
                beta=d.beta,
                gamma=d.simpo_gamma,
                label_smoothing=d.label_smoothing,
            )
            rewards = jax.lax.stop_gradient(d.beta * avg_logps)
        elif d.loss_type == "orpo":
            losses = orpo_loss(avg_logps[:, 0], avg_logps[:, 1], lam=d.beta)
            rewards = jax.lax.stop_gradient(d.beta * avg_logps)
        else:
            ref_logps = self.reference_logps(graphdef, state, batch, frozen)
            pol, ref = logps, ref_logps
            if d.loss_type == "ipo":
                pol, ref = avg_logps, ref_logps / jnp.maximum(lengths, 1.0)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                pol[:, 0],
                pol[:, 1],
                ref[:, 0],
                ref[:, 1],
                beta=d.beta,
                loss_type=d.loss_type,
                label_smoothing=d.label_smoothing,
            )
            rewards = jnp.stack([chosen_rewards, rejected_rewards], axis=-1)
        nll = -avg_logps[:, 0]  # per-token NLL of the chosen answer
        if d.rpo_alpha:
            losses = losses + d.rpo_alpha * nll
        mask = pair_values(batch, "pair_mask")

        def total(x):
            return jnp.sum(mask * x)

        metrics = {
            "rewards/chosen": total(rewards[:, 0]),
            "rewards/rejected": total(rewards[:, 1]),
            "rewards/accuracies": total((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
            "rewards/margins": total(rewards[:, 0] - rewards[:, 1]),
            "logps/chosen": total(jax.lax.stop_gradient(logps[:, 0])),
            "logps/rejected": total(jax.lax.stop_gradient(logps[:, 1])),
            "logits/chosen": total(policy["mean_logits"][:, 0]),
            "logits/rejected": total(policy["mean_logits"][:, 1]),
            "preferred_rate": total((logps[:, 0] > logps[:, 1]).astype(jnp.float32)),
            "nll": total(jax.lax.stop_gradient(nll)),
        }
        return total(losses), mask.sum(), metrics

    def reference_logps(
        self, graphdef: nnx.GraphDef, state: nnx.State, batch: dict, frozen: Any
    ) -> jax.Array:
        """The reference's sequence log-probs [P, 2] (no gradient): precomputed ones from the
        batch; with LoRA the policy's own base with adapters off (its trained base parameters at
        their initial values, `frozen["base_trained"]`); else the frozen copy's. `graphdef` and
        `state` are the policy's as merged, before its forward pass sows anything (a MoE
        router's aux loss and metrics)."""
        chunks = self.cfg.loss.vocab_chunks
        if self.precompute:
            return pair_values(batch, "ref_logps")
        if self.lora:
            params = state.to_pure_dict()  # the same arrays: no second copy of the base
            if frozen is not None:
                params = with_trained(params, frozen["base_trained"])
            with adapters_off():
                logps = policy_statistics(nnx.merge(graphdef, params), batch, chunks)["logps"]
        else:
            reference = nnx.merge(graphdef, frozen["reference"])
            logps = policy_statistics(reference, batch, chunks)["logps"]
        return jax.lax.stop_gradient(logps)

    # -- data ----------------------------------------------------------------------------------

    def batch_tokens(self, local: dict) -> int:
        """Tokens/s counts the real tokens of chosen and rejected, once (not the reference's
        forward pass over them)."""
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

    def _eval_iterator(self, process_index: int, process_count: int):
        return self._iterator(
            self.cfg.data.eval_file,
            process_index,
            process_count,
            shuffle=False,
            num_epochs=1,
            row_multiple=packed_row_multiple(self._train),
        )

    def eval_data(self, process_index: int, process_count: int):
        if not self.cfg.data.eval_file:
            return None
        if self._eval is None:
            it = self._eval_iterator(process_index, process_count)
            if self.precompute:
                it.set_reference_logps(self._eval_ref)
            self._eval = list(itertools.islice(it, self.cfg.train.eval_batches))
        return self._eval

    # -- the reference -------------------------------------------------------------------------

    def frozen_params(self, trainer, initial_params: Any) -> Any:
        """{"reference": a copy of the initial params} for the loss, or None when the reference
        log-probs are precomputed (then attached to every batch), not needed, or with LoRA (the
        reference is the policy's own base with adapters off: then only the initial values of the
        base parameters that train beside the adapters are kept, as {"base_trained": ...})."""
        if self.reference_free:
            return None
        if self.lora and not self.precompute:
            # The reference is the policy's base with adapters off; base parameters that train
            # beside the adapters (model.lora.train) keep a copy of their initial values.
            base_trained = lora.base_params(trained_part(initial_params, trainer.labels))
            if not jax.tree.leaves(base_trained):
                return None
            return {"base_trained": jax.jit(lambda p: jax.tree.map(jnp.copy, p))(base_trained)}
        if self.precompute:
            self._precompute(trainer, initial_params)
            return None
        # A copy: the train step donates (and overwrites) the policy's buffers.
        return {"reference": jax.jit(lambda p: jax.tree.map(jnp.copy, p))(initial_params)}

    def _precompute(self, trainer, params: Any) -> None:
        pi, pc = jax.process_index(), jax.process_count()
        train = self._train or self.train_data(pi, pc)
        train.set_reference_logps(self._reference_logps(trainer, params, train, "train"))
        if self.cfg.data.eval_file:
            self._eval_ref = self._reference_logps(
                trainer, params, self._eval_iterator(pi, pc), "eval"
            )

    def _reference_logps(self, trainer, params, iterator, split: str) -> np.ndarray:
        """Reference log-probs [pairs, 2] of this process's pairs: loaded from
        RUN_DIR/reference_logps when computed before with the same data and reference."""
        pi, pc = jax.process_index(), jax.process_count()
        fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "init_from": self.cfg.init_from,
                    "model": to_dict(self.cfg.model),
                    "seed": self.cfg.train.seed,
                    "data": iterator.get_state()["fingerprint"],
                    "path": str(iterator.path),
                    "template": self.cfg.data.template,
                    "preference": to_dict(self.cfg.preference),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        path = run_path(self.cfg.run_dir) / "reference_logps" / f"{split}.{pi}-of-{pc}.npz"
        if path.is_file():
            with path.open("rb") as f:  # a gs:// run directory too
                saved = np.load(io.BytesIO(f.read()))
            if str(saved["fingerprint"]) == fingerprint:
                return saved["logps"]
        examples = iterator.examples
        accum, micro = self.cfg.train.grad_accum, iterator.micro_batch
        rows = accum * micro
        chunks = self.cfg.loss.vocab_chunks
        graphdef = trainer.graphdef

        @jax.jit
        def logps_fn(p, batch):
            model = nnx.merge(graphdef, p)
            flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
            with adapters_off():  # LoRA: the base (a fresh run's adapters are a no-op anyway)
                logps = policy_statistics(model, flat, chunks)["logps"]
            return logps.reshape(accum, -1, 2)

        # Every process runs the same number of batches: enough for the most pairs any holds.
        num_batches = math.ceil(iterator.max_local_pairs / rows)
        out = np.zeros((num_batches * rows, 2), np.float32)
        for b in range(num_batches):
            padded = pad_pairs(
                examples[b * rows : (b + 1) * rows], iterator.seq_len, iterator.pad_id, rows=rows
            )
            local = {
                k: padded[k].reshape(accum, micro, *padded[k].shape[1:])
                for k in ("tokens", "loss_mask", "segment_ids", "positions")
            }
            result = logps_fn(params, trainer.to_global(local))
            if pc > 1:
                from jax.experimental import multihost_utils

                result = multihost_utils.process_allgather(result, tiled=True)
            result = np.asarray(result)[:, pi * micro : (pi + 1) * micro]
            out[b * rows : (b + 1) * rows] = result.reshape(rows, 2)
        logps = out[: len(examples)]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, logps=logps, fingerprint=np.asarray(fingerprint))
        return logps
