"""Pure RL math over arrays: GAE, KL estimators, masked whitening, PPO's clipped losses, entropy,
critic-free advantages (GRPO, RLOO) and the adaptive KL controller. Formulas and the reasons for
each choice: docs/trainers/ppo.md and docs/trainers/grpo.md; float64 references: tests/.

Shapes: B rows (sequences), T response tokens. `mask` [B, T] is 1 on real response tokens (the
stop token included) and 0 past each row's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def _float(x: jax.Array) -> jax.Array:
    """x in float32, or float64 when it already is (the float64 reference tests)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of `x` where `mask` is nonzero. x, mask: same shape."""
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `x` over positions where `mask` is nonzero (0 where the mask is empty)."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask > 0, axis=axis), 1)


def masked_var(x: jax.Array, mask: jax.Array, *, unbiased: bool = True) -> jax.Array:
    """Variance of the masked entries of `x` (all axes). Unbiased: sum((x - mean)^2) / (n - 1)
    (Bessel's correction, as TRL and OpenRLHF); biased: / n. 0 when n <= 1 (unbiased)."""
    x = _float(x)
    n = jnp.sum(mask > 0).astype(x.dtype)
    mean = masked_sum(x, mask) / jnp.maximum(n, 1.0)
    sq = masked_sum(jnp.square(x - mean), mask)
    return sq / jnp.maximum(n - 1.0, 1.0) if unbiased else sq / jnp.maximum(n, 1.0)


def masked_whiten(
    x: jax.Array,
    mask: jax.Array,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries of `x` (all axes); with
    `shift_mean=False` the mean is added back (only the scale changes). Masked-out entries are 0.

    The statistics are over every entry of the array: for a global (sharded) jax.Array that is
    the whole global batch, across processes.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def compute_gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation over the response tokens, as a reverse `lax.scan`.

    rewards, values, mask: [B, T]. With V(after the last real token) = 0 and positions where
    `mask` is 0 skipped (the next real token is the next one with mask 1):

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the value target)

    Returns (advantages, returns), each [B, T] float32, 0 where `mask` is 0.
    """
    rewards, values = _float(rewards), _float(values)
    real = mask > 0

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    b = rewards.shape[0]
    init = (jnp.zeros((b,), values.dtype), jnp.zeros((b,), values.dtype))
    _, adv_tb = jax.lax.scan(step, init, (rewards.T, values.T, real.T), reverse=True)
    advantages = adv_tb.T
    returns = jnp.where(real, advantages + values, 0.0)
    return advantages, returns


def kl_penalty(
    logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1", clamp: float | None = None
) -> jax.Array:
    """Per-token estimate of KL(pi || ref) from the sampled token's log-probs (Schulman, 2020).

    With d = logprobs - ref_logprobs (= log pi/ref at the sampled token):
      k1 = d                       unbiased, can be negative
      k2 = d^2 / 2                 biased, low variance, >= 0
      k3 = exp(-d) - 1 + d         unbiased, >= 0 (GRPO's)
    `clamp` c limits the estimate to [-c, c] (verl clamps k3 to [-10, 10]). Same shape as inputs.
    """
    d = _float(logprobs) - _float(ref_logprobs)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * jnp.square(d)
    elif estimator == "k3":
        kl = jnp.exp(-d) - 1.0 + d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r} (known: {', '.join(KL_ESTIMATORS)})")
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


def clipped_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    clip_eps: float,
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate per token (to minimize), and per-token diagnostics.

    ratio = exp(logprobs - old_logprobs);
    loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)),
    eps_high = `clip_eps_high` (DAPO's "clip-higher": more room for raising unlikely tokens),
    default `clip_eps`.
    Diagnostics (each [B, T]): `ratio`, `clipped` (1 where the clipped term is the larger),
    `approxkl` = (logprobs - old_logprobs)^2 / 2 (TRL's), all without gradient.
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = jnp.maximum(unclipped, clipped)
    stats = {
        "ratio": jax.lax.stop_gradient(ratio),
        "clipped": jax.lax.stop_gradient((clipped > unclipped).astype(loss.dtype)),
        "approxkl": jax.lax.stop_gradient(0.5 * jnp.square(log_ratio)),
    }
    return loss, stats


def ratio_logprobs(
    logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array, level: str = "token"
) -> jax.Array:
    """The log-probs [B, T] whose ratio to `old_logprobs` `clipped_policy_loss` clips.

    level "token": `logprobs` itself (PPO, GRPO: one ratio per token);
    level "sequence" (GSPO, Zheng et al. 2025): old_logprobs + s_i on every token of sequence i,
        s_i = (1/|y_i|) sum_t mask_it * (logprobs_it - old_logprobs_it),
    the length-normalized sequence log-ratio, so each sequence has one ratio exp(s_i), clipped
    as a whole, whose gradient is exp(s_i) times the mean of its tokens' log-prob gradients.
    """
    if level == "token":
        return logprobs
    real = mask > 0
    total = jnp.where(real, logprobs - old_logprobs, 0.0).sum(axis=1, keepdims=True)
    return old_logprobs + total / jnp.maximum(real.sum(axis=1, keepdims=True), 1)


def clipped_value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, clip_range: float
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped value loss per token and the clip indicator (no gradient), each [B, T]:

    v_clip = old_values + clip(values - old_values, -c, c);
    loss   = max((values - returns)^2, (v_clip - returns)^2) / 2.
    """
    v_clip = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(v_clip - returns)
    loss = 0.5 * jnp.maximum(unclipped, clipped)
    return loss, jax.lax.stop_gradient((clipped > unclipped).astype(loss.dtype))


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) over the last axis, in float32. [..., V] -> [...]."""
    logits = _float(logits)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def group_advantages(
    scores: jax.Array,
    group_size: int,
    *,
    scale: bool = True,
    unbiased: bool = False,
    eps: float = 1e-4,
) -> jax.Array:
    """GRPO's advantages: each score minus its group's mean, divided by the group's std + eps
    (`scale=False`: no division, Dr. GRPO). scores: [B] with B = groups * group_size, rows of a
    group adjacent. std is biased (/ G) by default; `unbiased`: / (G - 1) (as torch.std in TRL).
    Returns [B]."""
    g = _float(scores).reshape(-1, group_size)
    centered = g - g.mean(axis=1, keepdims=True)
    if scale:
        denom = group_size - 1 if unbiased else group_size
        std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / max(denom, 1))
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rloo_advantages(scores: jax.Array, group_size: int) -> jax.Array:
    """RLOO's advantages: each score minus the mean of the other G - 1 scores of its group,
    r_i - (sum_g r - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g r). scores: [B] -> [B]."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _float(scores).reshape(-1, group_size)
    baseline = (g.sum(axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


@dataclass
class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al., 2019):

        e = clip(kl / target - 1, -0.2, 0.2);   kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    where `kl` is the rollout's mean per-sequence KL and `n_steps` its number of sequences.
    """

    kl_coef: float
    target: float | None = None  # None: fixed
    horizon: float = 10000.0

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef

    def get_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def set_state(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])
