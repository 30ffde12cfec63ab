"""Critic-free policy optimization: GRPO (`trainer: grpo`), RLOO (`trainer: rloo`) and
REINFORCE++ (`trainer: reinforce_pp`).

GRPO and RLOO: G samples per prompt; a sequence's advantage is its score against its group's
(GRPO: minus the group mean, over the group std; RLOO: minus the mean of the other G - 1), on
every response token; the loss is the clipped surrogate plus kl_coef * KL(policy || reference)
per token (k3 by default), aggregated per token or per sequence. REINFORCE++: PPO's per-token
rewards (the KL penalty on every token, the score on the last) summed into returns without a
critic and whitened over the whole rollout; the KL is in the reward, not in the loss. Formulas:
docs/trainers/grpo.md.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.rl import (
    clipped_policy_loss,
    compute_gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ratio_logprobs,
    rloo_advantages,
)
from jaxalign.trainers.ppo import RLAlgorithm, score_rewards


class Aggregation(NamedTuple):
    """How per-token losses [B, N] become a minibatch's loss: sum(loss * l) / denominator,
    the sums (and the denominator) added over micro-batches before the one division, so
    gradient accumulation is exact. Metrics are sum(metrics * x) / the same denominator."""

    loss: jax.Array  # [B, N] weights of the per-token losses
    metrics: jax.Array  # [B, N] weights of the per-token metrics
    denominator: jax.Array  # scalar


def aggregation_weights(
    mask: jax.Array, aggregation: str, max_length: int = 0, rows: jax.Array | None = None
) -> Aggregation:
    """The weights of `rl.loss_aggregation` for the loss tokens `mask` [B, N]:

    - token_mean: 1 per token over the number of tokens (a mean over every token);
    - sequence_mean: 1 / |o_i| over the number of sequences (a mean of per-sequence means);
    - token_sum_norm (Dr. GRPO): 1 / max_length over the number of sequences, counted from
      `rows` (the response mask, default `mask`: a sequence whose tokens all weigh 0 still
      counts), so the normalizer does not depend on the lengths; its metrics are
      per-sequence means.
    """
    real = (mask > 0).astype(jnp.float32)
    if aggregation == "token_mean":
        return Aggregation(real, real, real.sum())
    per_sequence = real / jnp.maximum(real.sum(axis=1, keepdims=True), 1.0)
    if aggregation == "sequence_mean":
        return Aggregation(per_sequence, per_sequence, per_sequence.sum())
    sequences = ((mask if rows is None else rows) > 0).any(axis=1).sum().astype(jnp.float32)
    return Aggregation(real / max_length, per_sequence, sequences)


class GRPO(RLAlgorithm):
    """GRPO (group-normalized advantages), RLOO (leave-one-out) or REINFORCE++ (whitened
    returns of per-token rewards): `estimator` "grpo", "rloo" or "reinforce_pp" (the
    subclasses below)."""

    estimator = "grpo"
    group_relative = True
    kl_in_loss = True

    @property
    def default_kl_estimator(self) -> str:
        """k1 where the KL is a reward penalty (REINFORCE++, as PPO), k3 in the loss."""
        return "k1" if self.estimator == "reinforce_pp" else "k3"

    def postprocess(self, rollout: dict, kl_coef: jax.Array) -> tuple[dict, dict]:
        """The buffer's advantages (`sequence_advantages`, or REINFORCE++'s
        `reinforce_advantages`), log-probs and loss mask, and the rollout's metrics."""
        rl = self.cfg.rl
        mask = rollout["mask"]
        real = mask > 0
        old, ref = rollout["old_logprobs"], rollout["ref_logprobs"]
        kl = jnp.where(real, kl_penalty(old, ref, self.kl_estimator, rl.kl_clamp), 0.0)
        if self.estimator == "reinforce_pp":
            advantages, metrics = self.reinforce_advantages(rollout, kl, kl_coef)
        else:
            advantages, metrics = self.sequence_advantages(rollout)
        metrics.update(
            {
                "objective/kl": kl.sum(axis=1).mean(),
                "objective/entropy": jnp.where(real, -old, 0.0).sum(axis=1).mean(),
                "objective/token_entropy": masked_mean(rollout["entropy"], mask),
                "objective/rlhf_reward": (rollout["scores"] - kl_coef * kl.sum(axis=1)).mean(),
            }
        )
        buffer = {
            "old_logprobs": jnp.where(real, old, 0.0),
            "ref_logprobs": jnp.where(real, ref, 0.0),
            "advantages": jnp.where(real, advantages, 0.0),
        }
        if rl.mask_truncated_completions:  # per response token, so packing carries it as is
            buffer["loss_mask"] = jnp.where(real, rollout["stopped"][:, None], 0.0)
        return buffer, metrics

    def sequence_advantages(self, rollout: dict) -> tuple[jax.Array, dict]:
        """GRPO's or RLOO's advantage of each sequence from its group's scores, on every
        response token [B, N], and the group metrics."""
        rl = self.cfg.rl
        g = rl.num_generations
        scores = rollout["scores"]
        if self.estimator == "rloo":
            seq_adv = rloo_advantages(scores, g)
        else:
            seq_adv = group_advantages(scores, g, scale=rl.scale_rewards)
        group_std = scores.reshape(-1, g).std(axis=1)
        metrics = {
            "rollout/group_score_std": group_std.mean(),
            "rollout/groups_all_equal": (group_std == 0).astype(jnp.float32).mean(),
        }
        return jnp.broadcast_to(seq_adv[:, None], rollout["mask"].shape), metrics

    def reinforce_advantages(
        self, rollout: dict, kl: jax.Array, kl_coef: jax.Array
    ) -> tuple[jax.Array, dict]:
        """REINFORCE++ (Hu 2025): per-token rewards r_t = -kl_coef * KL_t + [t = last] * score
        (the score first centered on its group's mean with rl.reinforce_baseline), returns
        G_t = sum_{s >= t} gamma^(s - t) r_s (GAE with V = 0 and lambda = 1), and advantages the
        returns whitened over every response token of the rollout (rl.whiten_advantages)."""
        rl = self.cfg.rl
        mask = rollout["mask"]
        scores = rollout["scores"]
        if rl.reinforce_baseline:
            groups = scores.reshape(-1, rl.num_generations)
            scores = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
        non_score = -kl_coef * kl
        rewards = non_score + score_rewards(rollout, scores)
        returns, _ = compute_gae(rewards, jnp.zeros_like(rewards), mask, gamma=rl.gamma, lam=1.0)
        advantages = returns
        if rl.whiten_advantages:
            advantages = masked_whiten(returns, mask, unbiased=rl.whiten_unbiased)
        metrics = {
            "objective/non_score_reward": non_score.sum(axis=1).mean(),
            "val/returns": masked_mean(returns, mask),
        }
        return advantages, metrics

    def after_rollout(self, metrics: dict, rows: int) -> dict:
        """REINFORCE++ with rl.kl_target: the adaptive KL coefficient, as PPO's."""
        if self.estimator == "reinforce_pp":
            self.kl_controller.update(metrics["objective/kl"], rows)
        return {}

    def rl_loss(self, model, batch: dict, rng: jax.Array):
        """Weighted sum of per-token losses (clipped surrogate + kl_coef * KL - entropy bonus),
        the sum of weights, and metric sums (see `aggregation_weights`)."""
        rl = self.cfg.rl
        # Tokens in the loss: the response's, less truncated responses' with
        # rl.mask_truncated_completions (batch["loss_mask"]).
        mask = batch.get("loss_mask", batch["mask"])
        logp, entropy = self._logprobs(model, batch)
        old = batch["old_logprobs"]
        ratio_logp = ratio_logprobs(logp, old, batch["mask"], rl.importance_sampling)
        pg, stats = clipped_policy_loss(
            ratio_logp, old, batch["advantages"], rl.clip_eps, rl.clip_eps_high
        )
        kl = kl_penalty(logp, batch["ref_logprobs"], self.kl_estimator, rl.kl_clamp)
        # REINFORCE++ has the KL in its rewards: `loss/kl` still reports it, weighted 0 here.
        kl_weight = 0.0 if self.estimator == "reinforce_pp" else rl.kl_coef
        per_token = pg + kl_weight * kl - rl.entropy_coef * entropy
        weights = aggregation_weights(
            mask, rl.loss_aggregation, self.cfg.sampling.max_new_tokens, batch["mask"]
        )

        def total(x, w=weights.metrics):
            return jnp.sum(w * jnp.where(mask > 0, x, 0.0))

        metrics = {
            "loss/policy": total(jax.lax.stop_gradient(pg)),
            "loss/kl": total(jax.lax.stop_gradient(kl)),
            "policy/approxkl": total(stats["approxkl"]),
            "policy/clipfrac": total(stats["clipped"]),
            "policy/ratio": total(stats["ratio"]),
            "policy/entropy": total(jax.lax.stop_gradient(entropy)),
        }
        return total(per_token, weights.loss), weights.denominator, metrics


class RLOO(GRPO):
    """RLOO: each sample's advantage is its score minus the mean of its group's others."""

    estimator = "rloo"


class ReinforcePP(GRPO):
    """REINFORCE++: whitened returns of per-token rewards with a KL penalty in the reward."""

    estimator = "reinforce_pp"
    group_relative = False
    kl_in_loss = False
    has_reinforce_baseline = True
