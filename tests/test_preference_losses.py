"""Preference losses against float64 NumPy implementations of their published formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

RNG = np.random.default_rng(0)
B = 16


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    d = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    raise ValueError(loss_type)


def np_simpo(ac, ar, beta, gamma, eps):
    z = beta * (ac - ar) - gamma
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def np_orpo(ac, ar, lam):
    def odds(a):
        return a - np.log(1 - np.exp(a))

    return -ac - lam * log_sigmoid(odds(ac) - odds(ar))


def np_rm(c, r, margin, center):
    return np.mean(-log_sigmoid(c - r - margin)) + center * np.mean((c + r) ** 2)


def numeric_grad(f, xs, h=1e-6):
    """Central differences of scalar f (float64) with respect to each array in xs."""
    grads = []
    for i, x in enumerate(xs):
        g = np.zeros_like(x)
        for j in range(x.size):
            up = [a.copy() for a in xs]
            down = [a.copy() for a in xs]
            up[i].flat[j] += h
            down[i].flat[j] -= h
            g.flat[j] = (f(*up) - f(*down)) / (2 * h)
        grads.append(g)
    return grads


def logps(scale=20.0, size=B):
    return -np.abs(RNG.normal(scale=scale, size=size)) - 1.0


def check(jax_fn, np_fn, inputs, atol=1e-6, grad_atol=2e-5):
    """Values within atol (relative 1e-6) and gradients of the summed loss within grad_atol."""
    inputs = [np.asarray(x, np.float64) for x in inputs]
    as32 = [jnp.asarray(x, jnp.float32) for x in inputs]
    np.testing.assert_allclose(np.asarray(jax_fn(*as32)), np_fn(*inputs), atol=atol, rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(jax_fn(*a)), argnums=tuple(range(len(as32))))(*as32)
    expected = numeric_grad(lambda *a: np.sum(np_fn(*a)), inputs)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, atol=grad_atol, rtol=1e-4)


@pytest.mark.parametrize(
    "loss_type,eps",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.1),
        ("robust", 0.1),
        ("robust", 0.3),
        ("hinge", 0.0),
        ("ipo", 0.0),
    ],
)
def test_dpo_loss_matches_formula_and_gradient(loss_type, eps):
    beta = 0.1 if loss_type != "ipo" else 0.5
    scale = 20.0 if loss_type != "ipo" else 2.0  # IPO takes length-normalized log-probs
    pc, pr, rc, rr = (logps(scale) for _ in range(4))

    def jax_loss(*a):
        return losses.dpo_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=eps)[0]

    check(jax_loss, lambda *a: np_dpo(*a, beta, loss_type, eps), [pc, pr, rc, rr])


def test_dpo_rewards_are_beta_times_log_ratios_without_gradient():
    pc, pr, rc, rr = (jnp.asarray(logps(), jnp.float32) for _ in range(4))
    _, chosen, rejected = losses.dpo_loss(pc, pr, rc, rr, beta=0.25)
    np.testing.assert_allclose(chosen, 0.25 * (np.float64(pc) - np.float64(rc)), rtol=1e-6)
    np.testing.assert_allclose(rejected, 0.25 * (np.float64(pr) - np.float64(rr)), rtol=1e-6)
    grad = jax.grad(lambda p: losses.dpo_loss(p, pr, rc, rr, beta=0.25)[1].sum())(pc)
    assert np.all(np.asarray(grad) == 0.0)


def test_dpo_with_policy_equal_to_reference_is_log_2():
    pc, pr = jnp.asarray(logps()), jnp.asarray(logps())
    loss, chosen, rejected = losses.dpo_loss(pc, pr, pc, pr, beta=0.1)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    assert np.all(np.asarray(chosen) == 0) and np.all(np.asarray(rejected) == 0)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_loss_matches_formula_and_gradient(eps):
    check(
        lambda a, b: losses.simpo_loss(a, b, beta=2.0, gamma=0.5, label_smoothing=eps),
        lambda a, b: np_simpo(a, b, 2.0, 0.5, eps),
        [logps(1.5), logps(1.5)],
    )


def test_orpo_loss_matches_formula_and_gradient():
    # Length-averaged log-probs in (-3, -0.01): odds are finite.
    ac, ar = -RNG.uniform(0.01, 3.0, B), -RNG.uniform(0.01, 3.0, B)
    check(
        lambda a, b: losses.orpo_loss(a, b, lam=0.3),
        lambda a, b: np_orpo(a, b, 0.3),
        [ac, ar],
        grad_atol=1e-4,
    )


@pytest.mark.parametrize("center", [0.0, 0.05])
def test_reward_model_loss_matches_formula_and_gradient(center):
    c, r = RNG.normal(scale=2.0, size=B), RNG.normal(scale=2.0, size=B)
    check(
        lambda c, r: losses.reward_model_loss(c, r, center_coef=center),
        lambda c, r: np_rm(c, r, 0.0, center),
        [c, r],
    )
    margin = RNG.uniform(0, 1, B)
    check(
        lambda c, r, m: losses.reward_model_loss(c, r, margin=m, center_coef=center),
        lambda c, r, m: np_rm(c, r, m, center),
        [c, r, margin],
    )


def test_sequence_logprobs_sum_shifted_completion_tokens():
    b, t, d, v = 3, 7, 8, 11
    hidden = RNG.normal(size=(b, t, d))
    w = RNG.normal(size=(d, v))
    tokens = RNG.integers(0, v, size=(b, t))
    mask = RNG.random((b, t)) < 0.6
    got, count = losses.sequence_logprobs(
        jnp.asarray(hidden, jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(tokens),
        jnp.asarray(mask),
        chunks=2,
    )
    logits = hidden @ w
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.zeros(b)
    for i in range(b):
        for j in range(1, t):  # token j is predicted from position j - 1; mask[:, 0] ignored
            if mask[i, j]:
                expected[i] += logp[i, j - 1, tokens[i, j]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(count, mask[:, 1:].sum(-1))
