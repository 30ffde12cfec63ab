"""PPO with a learned value model (`trainer: ppo`): a rollout, then a clipped loss over a buffer.

The trained module is `ActorCritic` (policy + value model), so one optimizer state holds both and
a checkpoint restores both with the KL controller and the prompt iterator (in the data state).
The reference policy is a frozen copy of the initial policy (with LoRA: the policy with its
adapters off, docs/lora.md). Formulas: docs/trainers/ppo.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import sharding as shd
from jaxalign.checkpoint import abstract_with_shardings
from jaxalign.config import Config
from jaxalign.data import load_tokenizer
from jaxalign.errors import ConfigError
from jaxalign.models.actor_critic import ActorCritic
from jaxalign.rl import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
)
from jaxalign.trainers.base import Algorithm
from jaxalign.trainers.lora_runs import load_base, load_init_from, merge_adapters
from jaxalign.trainers.rl_rows import ROW_KEYS, response_logprobs, response_values
from jaxalign.trainers.rm import check_vocab, checkpoint_trainer
from jaxalign.trainers.rollout import (
    PTX_PREFIX,
    RolloutData,
    ptx_rows,
    uses_reference,
    validate_rl_config,
)
from jaxalign.trainers.sft import next_token_loss

logger = logging.getLogger(__name__)


def last_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """The score of each row placed on its last response token (the stop token, or the last
    generated token of a truncated row). scores: [B], mask: [B, N] -> [B, N]. The last position
    where `mask` is 1, also when the mask has holes (multi-turn episodes' observations)."""
    n = mask.shape[1]
    last = n - 1 - jnp.argmax(jnp.flip(mask > 0, axis=1), axis=1)
    return jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * scores[:, None]


def score_rewards(rollout: dict, scores: jax.Array) -> jax.Array:
    """The per-token rewards [B, N] of the rows' scores [B]: each score on its row's last
    response token; with per-turn rewards (`rl.turn_rewards`: rollout["turn_rewards"], each
    environment step's reward on its turn's last token), those, plus on the last token what the
    penalty, the clip or a baseline changed in the score (`scores - rollout["raw_scores"]`)."""
    mask = rollout["mask"]
    if "turn_rewards" not in rollout:
        return last_token_rewards(scores, mask)
    return rollout["turn_rewards"] + last_token_rewards(scores - rollout["raw_scores"], mask)


class FrozenReference:
    """The reference policy's parameters: a device copy of the initial policy, optionally kept
    in host memory between rollouts (`rl.offload_frozen`)."""

    def __init__(self, params: Any, offload: bool):
        # A copy: the train step donates (and overwrites) the policy's buffers.
        self.params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
        self.offload = offload
        if offload:  # each process keeps its own shards
            self.params = shd.to_host(self.params)

    def on_device(self) -> Any:
        if self.offload:
            return shd.to_device(self.params)
        return self.params

    def release(self) -> None:
        """Nothing to do: with offload the device copy from `on_device` is simply dropped."""


def lora_reference_overrides(policy: Any, labels: Any) -> dict:
    """The trained base parameters (not adapters) of a LoRA policy `policy`, by `labels`
    ('trained'/'frozen' per leaf): what the reference (the policy with adapters off) must read
    at their initial values. A nested dict, {} when only adapters train."""
    from jaxalign.models.lora import base_params
    from jaxalign.optim import trained_part

    return base_params(trained_part(policy, labels) or {})


class RLAlgorithm(Algorithm):
    """What PPO, GRPO and RLOO share: tokenizer, reference, KL controller, rollout data."""

    is_rl = True
    frozen_from_initial = True  # the reference is a copy of the initial policy
    needs_values = False
    # What `validate_rl_config` checks rl.* against:
    # Sequence advantages relative to the prompt's group of samples (GRPO, RLOO):
    # rl.num_generations >= 2; rl.filter_groups and GSPO's sequence ratio apply.
    group_relative = False
    kl_in_loss = False  # the KL is a loss term weighted by rl.kl_coef (no rl.kl_target)
    masks_truncated = True  # rl.mask_truncated_completions applies
    has_reinforce_baseline = False  # rl.reinforce_baseline applies

    @classmethod
    def memory_terms(cls, cfg: Config, estimate: Any) -> None:
        """The rollout's reference and reward model (in host memory with rl.offload_frozen),
        KV cache and log-prob logits, and the PPO-ptx rows' activations."""
        from jaxalign import plan
        from jaxalign.trainers.rollout import ptx_rows

        parts, sizes, rules = estimate.parts, estimate.sizes, estimate.rules
        frozen = estimate.host if cfg.rl.offload_frozen else parts
        # No reference without a KL term; with LoRA the reference is the policy's own base.
        if uses_reference(cfg) and cfg.model.lora is None:
            frozen["reference"] = estimate.policy.params
        if cfg.rl.ptx_coef:  # the PPO-ptx rows' forward is live beside the RL rows'
            parts["ptx activations"] = plan.activation_bytes(
                cfg, sizes, rules, ptx_rows(cfg), with_head=False
            )
        if cfg.rl.reward_model:
            frozen["reward model"] = plan.reward_model_bytes(cfg, estimate.num_devices)
        parts["rollout KV cache"] = plan.rollout_kv_cache_bytes(cfg, sizes, rules)
        parts["rollout logits"] = plan.rollout_logits_bytes(cfg, sizes, rules)

    def __init__(self, cfg: Config):
        validate_rl_config(cfg, cfg.trainer)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(cfg, self.tokenizer)
        self.setup_loss()
        self.reference: FrozenReference | None = None
        self.data: RolloutData | None = None

    def setup_loss(self) -> None:
        rl = self.cfg.rl
        self.kl_estimator = rl.kl_estimator or self.default_kl_estimator
        self.kl_controller = KLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)

    @classmethod
    def abstract_batch(cls, cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
        """One minibatch of a rollout's buffer at its widest (responses of
        sampling.max_new_tokens after prompts of max(data.prompt_buckets)): the rows, and what
        `postprocess` adds (its shapes from `jax.eval_shape`), plus the PPO-ptx rows."""
        from jaxalign.trainers.sft import row_batch

        validate_rl_config(cfg, cfg.trainer)
        if cfg.rl.pack_rows > 1:
            from jaxalign.errors import ConfigError

            raise ConfigError(
                "rl.pack_rows: compiling the train step of packed RL rows is not supported "
                "yet (their row count depends on the rollout); set rl.pack_rows=1 to compile"
            )
        rl, t = cfg.rl, cfg.train
        rows, n = rl.prompts_per_rollout * rl.num_generations, cfg.sampling.max_new_tokens
        width = max(cfg.data.prompt_buckets) + n
        per_row = {"scores": (rows,), "stopped": (rows,)}
        per_row.update({k: (rows, n) for k in ("mask", "entropy", "old_logprobs", "ref_logprobs")})
        if cls.needs_values:
            per_row["values"] = (rows, n)
        rollout = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in per_row.items()}
        algorithm = cls.for_compile(cfg)
        buffer, _ = jax.eval_shape(
            algorithm.postprocess, rollout, jax.ShapeDtypeStruct((), jnp.float32)
        )
        buffer = dict(buffer)
        buffer.update({k: jax.ShapeDtypeStruct((rows, width), jnp.int32) for k in ROW_KEYS})
        buffer["mask"] = rollout["mask"]
        lead = (t.grad_accum, t.batch_size // t.grad_accum)
        batch = {k: jax.ShapeDtypeStruct((*lead, *v.shape[1:]), v.dtype) for k, v in buffer.items()}
        if rl.ptx_coef:
            ptx = dataclasses.replace(t, batch_size=ptx_rows(cfg))
            batch.update({PTX_PREFIX + k: v for k, v in row_batch(ptx).items()})
        return batch

    def policy_module(self, model: nnx.Module) -> nnx.Module:
        return model

    def after_rollout(self, metrics: dict, rows: int) -> dict:
        """Host-side, after each rollout's postprocess: extra metrics (default none)."""
        return {}

    def frozen_params(self, trainer, initial_params: Any) -> None:
        """Keep the reference (the initial policy) here, for rollouts only: the loss reads the
        reference log-probs from the buffer, so the train step gets no frozen params. No
        reference without a KL term (`uses_reference`).

        With LoRA the reference is the current policy with its adapters off (the rollout engine
        runs it on the trained parameters): no copy of the base. What is kept here is only the
        initial values of the policy's trained base parameters (`model.lora.train`), often
        none: `lora_reference_overrides`."""
        if uses_reference(self.cfg):
            policy = self.policy_params(initial_params)
            if self.cfg.model.lora is not None:
                labels = self.policy_params(trainer.labels)
                policy = lora_reference_overrides(policy, labels)
            self.reference = FrozenReference(policy, self.cfg.rl.offload_frozen)
        return None

    def reference_on_device(self) -> Any:
        """The reference's parameters on device, or None when the run keeps no reference."""
        return None if self.reference is None else self.reference.on_device()

    def reference_release(self) -> None:
        if self.reference is not None:
            self.reference.release()

    def train_data(self, process_index: int, process_count: int) -> RolloutData:
        self.data = RolloutData(self.cfg, self, process_index, process_count)
        if process_index == 0:  # prompts read, bad records skipped, truncated
            logger.info("%s", self.data.prompts.report())
        return self.data

    def eval_data(self, process_index: int, process_count: int):
        return None  # held-out pass rates come from the rollout data (rl.eval_every)

    def batch_tokens(self, local: dict) -> int:
        """Positions in this process's rows of a minibatch (trimmed to the rollout's widths) and
        its PPO-ptx rows: what `tokens_per_s` counts."""
        counted = ("tokens", PTX_PREFIX + "inputs")
        return sum(int(np.prod(v.shape)) for k, v in local.items() if k in counted)

    def _logprobs(self, model, batch):
        return response_logprobs(self.policy_module(model), batch, self.cfg.sampling.temperature)

    def loss_fn(self, model: nnx.Module, batch: dict, rng: jax.Array, frozen=None):
        """The algorithm's `rl_loss` plus, with `rl.ptx_coef`, the PPO-ptx term.

        PPO-ptx (Ouyang et al. 2022, eq. 2): ptx_coef x the mean next-token NLL of the
        minibatch's `ptx_*` rows under the policy. The step divides the returned sum by the RL
        denominator D, so the term enters as ptx_coef x nll_sum x D / ptx_tokens: exactly
        ptx_coef x mean NLL without gradient accumulation (with it, a D-weighted mean of the
        micro-batches' mean NLLs). `loss/ptx` reports the mean NLL the same way.
        """
        loss_sum, denom, metrics = self.rl_loss(model, batch, rng)
        coef = self.cfg.rl.ptx_coef
        if not coef:
            return loss_sum, denom, metrics
        ptx = {k.removeprefix(PTX_PREFIX): v for k, v in batch.items() if k.startswith(PTX_PREFIX)}
        nll_sum, tokens = next_token_loss(self.policy_module(model), ptx, self.cfg.loss)
        per_rl_unit = jax.lax.stop_gradient(denom / jnp.maximum(tokens, 1.0))
        metrics = {**metrics, "loss/ptx": jax.lax.stop_gradient(nll_sum) * per_rl_unit}
        return loss_sum + coef * nll_sum * per_rl_unit, denom, metrics


class PPO(RLAlgorithm):
    """PPO: rewards with a per-token KL penalty, GAE, clipped policy and value losses."""

    needs_values = True
    masks_truncated = False  # PPO: rl.missing_eos_penalty
    policy_key = "policy"  # params: {policy, value}
    default_kl_estimator = "k1"

    @classmethod
    def make_model(cls, cfg: Config, rngs: nnx.Rngs) -> ActorCritic:
        return ActorCritic(cfg.model, rngs, cfg.rl.lora_critic)

    @classmethod
    def lora_trained(cls, cfg: Config) -> list[str]:
        """The value head beside the adapters (rl.lora_critic adapters), or the whole separate
        value model (separate)."""
        return ["value/score"] if cfg.rl.lora_critic == "adapters" else ["value/.*"]

    @classmethod
    def make_policy(cls, cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
        return Algorithm.make_model(cfg, rngs)  # the Transformer of cfg.model

    @classmethod
    def unused_params(cls, cfg: Config) -> list[str]:
        """The value model's untied LM head: no value reads it (a LoRA critic of adapters
        shares the policy's)."""
        shared = cfg.model.lora is not None and cfg.rl.lora_critic == "adapters"
        return [] if cfg.model.tie_embeddings or shared else ["^value/backbone/lm_head$"]

    @classmethod
    def memory_terms(cls, cfg: Config, estimate: Any) -> None:
        """The value model, its optimizer state and saved activations, then what every RL
        trainer keeps."""
        actor_critic = nnx.eval_shape(lambda: cls.make_model(cfg, nnx.Rngs(0)))
        # The value's part of the split: a LoRA critic's shared base is listed under policy/.
        value = estimate.model_bytes(nnx.split(actor_critic)[1]["value"], "value/")
        estimate.parts["value model"] = value.params + value.gradients
        estimate.parts["value optimizer"] = value.optimizer
        if cfg.model.remat == "full" and cfg.model.scan_layers:
            from jaxalign import plan

            # the value model's scanned layers keep their own inputs beside the policy's
            estimate.parts["value activations"] = plan.saved_layer_bytes(
                cfg, estimate.sizes, estimate.rules
            )
        estimate.num_params += value.num_params
        super().memory_terms(cfg, estimate)

    def policy_module(self, model: ActorCritic) -> nnx.Module:
        return model.policy

    def initial_params(self, trainer) -> Any | None:
        """Policy from `init_from` (a policy run); value model from `rl.value_init_from` (a
        reward-model run) or, by default, the policy's transformer with a zero head."""
        cfg = self.cfg
        if cfg.model.lora is not None:
            return self._lora_initial_params(trainer)
        if cfg.init_from and checkpoint_trainer(cfg.init_from) == cfg.trainer:
            return None  # a PPO run: the trainer's default loads both
        abstract = abstract_with_shardings(trainer.abstract_params, trainer.param_shardings)
        if cfg.init_from:
            policy = load_init_from(cfg.init_from, abstract["policy"])
        else:
            policy = _fresh(trainer)["policy"]  # a seeded init (tests)
        if cfg.rl.value_init_from:
            value = load_init_from(cfg.rl.value_init_from, abstract["value"])
        else:
            copy = jax.jit(
                lambda p: jax.tree.map(jnp.copy, p),
                out_shardings=trainer.param_shardings["value"]["backbone"],
            )
            score = jax.jit(
                lambda: jnp.zeros(
                    abstract["value"]["score"].shape, abstract["value"]["score"].dtype
                ),
                out_shardings=trainer.param_shardings["value"]["score"],
            )()
            value = {"backbone": copy(policy), "score": score}
        return {"policy": policy, "value": value}

    def _lora_initial_params(self, trainer) -> Any:
        """With LoRA: the policy's base from `init_from` (a policy run), `model.from_hf` or the
        seed, with fresh adapters; the critic's adapters fresh and a zero head (rl.lora_critic
        adapters), or a separate value model from rl.value_init_from or a copy of the base
        with a zero head (separate)."""
        from jaxalign.models.lora import base_params
        from jaxalign.optim import trained_part, with_trained

        cfg = self.cfg
        if cfg.init_from and checkpoint_trainer(cfg.init_from) == cfg.trainer:
            raise ConfigError(
                "init_from: a LoRA PPO run starts from a policy run or model.from_hf, not "
                "another PPO run's checkpoint"
            )
        if not (cfg.init_from or cfg.model.from_hf):
            fresh = _fresh(trainer)
            trained = trained_part(fresh, trainer.labels)
        else:
            trained = trainer._lora_trained_init()  # the adapters (and head) only
        abstract = abstract_with_shardings(trainer.abstract_params, trainer.param_shardings)
        shardings = trainer.param_shardings
        if cfg.init_from or cfg.model.from_hf:
            # the policy's base, quantized as it loads under QLoRA (the loop's LoRA start)
            base = load_base(
                cfg,
                trainer.mesh,
                trainer.rules,
                self,
                shardings["policy"],
                make_model=type(self).make_policy,
            )
        else:
            base = base_params(fresh["policy"])
        policy = with_trained(base, trained["policy"])
        score = jax.jit(
            lambda: jnp.zeros(abstract["value"]["score"].shape, abstract["value"]["score"].dtype),
            out_shardings=shardings["value"]["score"],
        )()
        if cfg.rl.lora_critic == "adapters":
            backbone = trained["value"]["backbone"]
        elif cfg.rl.value_init_from:
            value = load_init_from(cfg.rl.value_init_from, abstract["value"])
            backbone, score = value["backbone"], value["score"]
        else:
            # a full-precision copy of the base (dequantized under QLoRA: the separate critic
            # is a plain model that trains every weight)
            dtypes = jax.tree.map(lambda a: a.dtype, abstract["value"]["backbone"])
            copy = jax.jit(
                lambda p: jax.tree.map(
                    lambda x, d: x.astype(d), merge_adapters(p, cfg.model.lora), dtypes
                ),
                out_shardings=shardings["value"]["backbone"],
            )
            backbone = copy(base)
        return {"policy": policy, "value": {"backbone": backbone, "score": score}}

    def postprocess(self, rollout: dict, kl_coef: jax.Array) -> tuple[dict, dict]:
        """Per-token rewards, GAE and whitening over the whole rollout (global arrays)."""
        rl = self.cfg.rl
        mask = rollout["mask"]
        real = mask > 0
        old, ref, values = rollout["old_logprobs"], rollout["ref_logprobs"], rollout["values"]
        values = jnp.where(real, values, 0.0)
        kl = jnp.where(real, kl_penalty(old, ref, self.kl_estimator, rl.kl_clamp), 0.0)
        non_score = -kl_coef * kl
        scores = rollout["scores"]
        rewards = non_score + score_rewards(rollout, scores)
        if rl.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, unbiased=rl.whiten_unbiased)
        advantages, returns = compute_gae(rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
        if rl.whiten_advantages:
            advantages = masked_whiten(advantages, mask, unbiased=rl.whiten_unbiased)
        seq_kl = kl.sum(axis=1)
        k1 = jnp.where(real, old - ref, 0.0).sum(axis=1)
        var_returns = masked_var(returns, mask, unbiased=rl.whiten_unbiased)
        explained = 1.0 - masked_var(returns - values, mask, unbiased=rl.whiten_unbiased) / (
            jnp.maximum(var_returns, 1e-8)
        )
        metrics = {
            "objective/kl": seq_kl.mean(),
            "objective/kl_k1": k1.mean(),
            "objective/entropy": jnp.where(real, -old, 0.0).sum(axis=1).mean(),
            "objective/token_entropy": masked_mean(rollout["entropy"], mask),
            "objective/non_score_reward": non_score.sum(axis=1).mean(),
            "objective/rlhf_reward": (scores + non_score.sum(axis=1)).mean(),
            "val/mean": masked_mean(values, mask),
            "val/returns": masked_mean(returns, mask),
            "val/explained_var": explained,
            "val/advantages_std": jnp.sqrt(masked_var(advantages, mask)),
        }
        buffer = {
            "old_logprobs": jnp.where(real, old, 0.0),
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
        }
        return buffer, metrics

    def after_rollout(self, metrics: dict, rows: int) -> dict:
        """Update the adaptive KL coefficient with this rollout's mean per-sequence KL."""
        self.kl_controller.update(metrics["objective/kl"], rows)
        return {}

    def rl_loss(self, model: ActorCritic, batch: dict, rng: jax.Array):
        """Summed per-token PPO loss over response tokens, the token count, metric sums."""
        rl = self.cfg.rl
        mask = batch["mask"]
        logp, entropy = self._logprobs(model, batch)
        values = response_values(model, batch)
        pg, stats = clipped_policy_loss(
            logp, batch["old_logprobs"], batch["advantages"], rl.clip_eps, rl.clip_eps_high
        )
        vf, vf_clipped = clipped_value_loss(
            values, batch["old_values"], batch["returns"], rl.value_clip
        )
        per_token = pg + rl.vf_coef * vf - rl.entropy_coef * entropy

        def total(x):
            return jnp.sum(jnp.where(mask > 0, x, 0.0))

        metrics = {
            "loss/policy": total(jax.lax.stop_gradient(pg)),
            "loss/value": total(jax.lax.stop_gradient(vf)),
            "policy/approxkl": total(stats["approxkl"]),
            "policy/clipfrac": total(stats["clipped"]),
            "policy/ratio": total(stats["ratio"]),
            "policy/entropy": total(jax.lax.stop_gradient(entropy)),
            "val/clipfrac": total(vf_clipped),
            "val/vpred": total(jax.lax.stop_gradient(values)),
        }
        return total(per_token), jnp.sum(mask > 0).astype(jnp.float32), metrics


def _fresh(trainer) -> Any:
    from jaxalign.models.params import init_params

    return init_params(
        trainer.cfg, trainer.param_shardings, trainer.cfg.train.seed, trainer.make_model
    )
