"""RL math against float64 NumPy references (values and gradients within 1e-6): GAE, KL
estimators, masked whitening, PPO's clipped policy and value losses, entropy, GRPO/RLOO
advantages, the adaptive KL controller."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import rl
from jaxalign.trainers.grpo import aggregation_weights
from jaxalign.trainers.ppo import last_token_rewards

ATOL = 1e-6


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of a float64 NumPy function `f(x) -> scalar`."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


def prefix_mask(lengths, t):
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float64)


# -- references ---------------------------------------------------------------------------------


def gae_ref(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, (adv + values) * mask


def whiten_ref(x, mask, shift_mean=True, unbiased=True):
    sel = x[mask > 0]
    mean = sel.mean()
    var = sel.var(ddof=1 if unbiased else 0)
    out = (x - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_ref(logp, ref, estimator, clamp=None):
    d = logp - ref
    kl = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}[estimator]
    return kl if clamp is None else np.clip(kl, -clamp, clamp)


def policy_loss_ref(logp, old, adv, eps, eps_high=None):
    ratio = np.exp(logp - old)
    high = eps if eps_high is None else eps_high
    return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + high))


def value_loss_ref(v, old_v, ret, c):
    v_clip = old_v + np.clip(v - old_v, -c, c)
    return 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)


# -- GAE ----------------------------------------------------------------------------------------


def test_gae_equals_reference_with_ragged_and_holed_masks():
    rng = np.random.default_rng(0)
    b, t = 5, 9
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    mask = prefix_mask([9, 4, 1, 7, 0], t)
    mask[3, 2] = 0.0  # a hole (e.g. an environment token): skipped, not an episode end
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = rl.compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
        want_adv, want_ret = gae_ref(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(np.asarray(adv), want_adv, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(ret), want_ret, atol=ATOL, rtol=0)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = np.array([[0.0, 0.5, 2.0, 9.0]])
    values = np.array([[1.0, 2.0, 3.0, 9.0]])
    mask = prefix_mask([3], 4)  # the value after the last real token counts as 0
    adv, ret = rl.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(np.asarray(adv), [[2.5 - 1.0, 2.5 - 2.0, 2.0 - 3.0, 0.0]], atol=ATOL)
    np.testing.assert_allclose(np.asarray(ret), [[2.5, 2.5, 2.0, 0.0]], atol=ATOL)


def test_gae_gradients_equal_reference():
    rng = np.random.default_rng(1)
    b, t = 3, 6
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    mask = prefix_mask([6, 3, 5], t)
    w1, w2 = rng.normal(size=(b, t)), rng.normal(size=(b, t))

    def objective(r, v):
        adv, ret = rl.compute_gae(r, v, mask, gamma=0.95, lam=0.9)
        return jnp.sum(w1 * adv) + jnp.sum(w2 * ret)

    def objective_ref(r, v):
        adv, ret = gae_ref(r, v, mask, 0.95, 0.9)
        return np.sum(w1 * adv) + np.sum(w2 * ret)

    g_r, g_v = jax.grad(objective, argnums=(0, 1))(rewards, values)
    np.testing.assert_allclose(
        np.asarray(g_r), numeric_grad(lambda r: objective_ref(r, values), rewards), atol=ATOL
    )
    np.testing.assert_allclose(
        np.asarray(g_v), numeric_grad(lambda v: objective_ref(rewards, v), values), atol=ATOL
    )


# -- KL estimators ------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.3])
def test_kl_estimators_and_gradients_equal_reference(estimator, clamp):
    rng = np.random.default_rng(2)
    logp, ref = rng.normal(-2, 0.7, size=(4, 7)), rng.normal(-2, 0.7, size=(4, 7))
    got = rl.kl_penalty(logp, ref, estimator, clamp)
    np.testing.assert_allclose(np.asarray(got), kl_ref(logp, ref, estimator, clamp), atol=ATOL)
    w = rng.normal(size=logp.shape)
    grad = jax.grad(lambda x: jnp.sum(w * rl.kl_penalty(x, ref, estimator, clamp)))(logp)
    want = numeric_grad(lambda x: np.sum(w * kl_ref(x, ref, estimator, clamp)), logp)
    np.testing.assert_allclose(np.asarray(grad), want, atol=ATOL)


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    """Under the policy's own distribution, E[k1] = E[k3] = KL(pi || ref), exactly."""
    rng = np.random.default_rng(3)
    pi = rng.dirichlet(np.ones(11))
    ref = rng.dirichlet(np.ones(11))
    exact = np.sum(pi * np.log(pi / ref))
    for estimator in ("k1", "k3"):
        per_token = np.asarray(rl.kl_penalty(np.log(pi), np.log(ref), estimator))
        np.testing.assert_allclose(np.sum(pi * per_token), exact, atol=ATOL)
    assert np.all(np.asarray(rl.kl_penalty(np.log(pi), np.log(ref), "k3")) >= 0)


# -- whitening ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_and_gradient_equal_reference(shift_mean, unbiased):
    rng = np.random.default_rng(4)
    x = rng.normal(3.0, 2.0, size=(4, 6))
    mask = prefix_mask([6, 2, 5, 3], 6)
    got = rl.masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased)
    want = whiten_ref(x, mask, shift_mean, unbiased)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)
    sel = np.asarray(got)[mask > 0]
    np.testing.assert_allclose(sel.std(ddof=1 if unbiased else 0), 1.0, atol=1e-6)
    w = rng.normal(size=x.shape)
    grad = jax.grad(
        lambda y: jnp.sum(w * rl.masked_whiten(y, mask, shift_mean=shift_mean, unbiased=unbiased))
    )(x)
    np.testing.assert_allclose(
        np.asarray(grad),
        numeric_grad(lambda y: np.sum(w * whiten_ref(y, mask, shift_mean, unbiased)), x),
        atol=ATOL,
    )


# -- clipped losses -----------------------------------------------------------------------------


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_clipped_policy_loss_stats_and_gradient_equal_reference(eps_high):
    """Symmetric clipping, and DAPO's clip-higher (rl.clip_eps_high: 1 + 0.28 above)."""
    rng = np.random.default_rng(5)
    shape = (6, 8)
    old = rng.normal(-1.5, 0.5, size=shape)
    logp = old + rng.normal(0, 0.3, size=shape)  # ratios on both sides of the clip range
    adv = rng.normal(size=shape)
    eps = 0.2
    loss, stats = rl.clipped_policy_loss(logp, old, adv, eps, eps_high)
    np.testing.assert_allclose(
        np.asarray(loss), policy_loss_ref(logp, old, adv, eps, eps_high), atol=ATOL
    )
    ratio = np.exp(logp - old)
    high = eps if eps_high is None else eps_high
    clipped = -adv * np.clip(ratio, 1 - eps, 1 + high) > -adv * ratio
    if eps_high is not None:  # some ratios in (1.2, 1.28] are clipped only symmetrically
        between = (ratio > 1 + eps) & (ratio <= 1 + eps_high) & (adv > 0)
        assert between.any() and not clipped[between].any()
    assert 0 < clipped.mean() < 1
    np.testing.assert_array_equal(np.asarray(stats["clipped"]), clipped.astype(np.float64))
    np.testing.assert_allclose(np.asarray(stats["ratio"]), ratio, atol=ATOL)
    np.testing.assert_allclose(np.asarray(stats["approxkl"]), 0.5 * (logp - old) ** 2, atol=ATOL)
    grad = jax.grad(lambda x: jnp.sum(rl.clipped_policy_loss(x, old, adv, eps, eps_high)[0]))(logp)
    np.testing.assert_allclose(
        np.asarray(grad),
        numeric_grad(lambda x: np.sum(policy_loss_ref(x, old, adv, eps, eps_high)), logp),
        atol=ATOL,
    )
    # Where the clipped term wins, the token contributes no gradient.
    assert np.all(np.asarray(grad)[clipped] == 0)


def test_sequence_level_ratio_is_gspo():
    """rl.importance_sampling: sequence. With sequence-mean aggregation the loss is GSPO's
    (1/B) sum_i max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps_h)), s_i = exp of the mean
    token log-ratio over the sequence's response tokens; loss and gradient against float64."""
    rng = np.random.default_rng(8)
    mask = prefix_mask([6, 2, 4, 5, 1], 6)
    old = rng.normal(-1.5, 0.5, size=mask.shape)
    logp = old + rng.normal(0, 0.15, size=mask.shape)
    adv = np.repeat(rng.normal(size=(5, 1)), 6, axis=1)
    eps, eps_high = 0.02, 0.03  # some sequences clipped

    def reference(x):
        s = np.exp(((x - old) * mask).sum(1) / mask.sum(1))
        a = adv[:, 0]
        return np.mean(np.maximum(-a * s, -a * np.clip(s, 1 - eps, 1 + eps_high)))

    def loss(x):
        ratio_logp = rl.ratio_logprobs(x, old, jnp.asarray(mask), "sequence")
        per_token, stats = rl.clipped_policy_loss(ratio_logp, old, adv, eps, eps_high)
        w = aggregation_weights(jnp.asarray(mask), "sequence_mean")
        return jnp.sum(w.loss * jnp.where(mask > 0, per_token, 0.0)) / w.denominator, stats

    value, stats = loss(logp)
    np.testing.assert_allclose(float(value), reference(logp), atol=ATOL)
    s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))
    np.testing.assert_allclose(np.asarray(stats["ratio"])[:, 0], s, atol=ATOL)
    clipped = np.asarray(stats["clipped"])[:, 0] > 0
    assert 0 < clipped.sum() < len(clipped)  # one ratio per sequence, clipped as a whole
    assert (np.asarray(stats["clipped"]) == clipped[:, None]).all()
    grad = np.asarray(jax.grad(lambda x: loss(x)[0])(logp))
    np.testing.assert_allclose(grad, numeric_grad(reference, logp), atol=ATOL)
    assert np.all(grad[clipped] == 0) and np.all(grad[mask == 0] == 0)
    token = rl.ratio_logprobs(logp, old, jnp.asarray(mask), "token")
    np.testing.assert_array_equal(np.asarray(token), logp)


def test_clipped_value_loss_and_gradient_equal_reference():
    rng = np.random.default_rng(6)
    shape = (5, 7)
    old_v, ret = rng.normal(size=shape), rng.normal(size=shape)
    v = old_v + rng.normal(0, 0.4, size=shape)
    loss, clipped = rl.clipped_value_loss(v, old_v, ret, 0.2)
    np.testing.assert_allclose(np.asarray(loss), value_loss_ref(v, old_v, ret, 0.2), atol=ATOL)
    v_clip = old_v + np.clip(v - old_v, -0.2, 0.2)
    want_clipped = (v_clip - ret) ** 2 > (v - ret) ** 2
    assert 0 < want_clipped.mean() < 1
    np.testing.assert_array_equal(np.asarray(clipped), want_clipped.astype(np.float64))
    grad = jax.grad(lambda x: jnp.sum(rl.clipped_value_loss(x, old_v, ret, 0.2)[0]))(v)
    np.testing.assert_allclose(
        np.asarray(grad),
        numeric_grad(lambda x: np.sum(value_loss_ref(x, old_v, ret, 0.2)), v),
        atol=ATOL,
    )


def test_entropy_from_logits_and_gradient_equal_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, size=(3, 4, 10))

    def ref(x):
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return -(p * np.log(p)).sum(-1)

    np.testing.assert_allclose(np.asarray(rl.entropy_from_logits(logits)), ref(logits), atol=ATOL)
    w = rng.normal(size=(3, 4))
    grad = jax.grad(lambda x: jnp.sum(w * rl.entropy_from_logits(x)))(logits)
    np.testing.assert_allclose(
        np.asarray(grad), numeric_grad(lambda x: np.sum(w * ref(x)), logits), atol=ATOL
    )


# -- critic-free advantages, reward placement, aggregation --------------------------------------


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_equal_reference(scale, unbiased):
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    got = np.asarray(rl.group_advantages(scores, 4, scale=scale, unbiased=unbiased))
    g = scores.reshape(3, 4)
    want = g - g.mean(1, keepdims=True)
    if scale:
        want = want / (g.std(1, ddof=1 if unbiased else 0, keepdims=True) + 1e-4)
    np.testing.assert_allclose(got, want.reshape(-1), atol=ATOL)
    np.testing.assert_allclose(got[4:8], 0.0, atol=ATOL)  # a group of equal scores learns nothing


def test_rloo_advantages_are_leave_one_out():
    rng = np.random.default_rng(8)
    scores = rng.normal(size=12)
    got = np.asarray(rl.rloo_advantages(scores, 3))
    g = scores.reshape(4, 3)
    want = np.array([[g[i, j] - np.delete(g[i], j).mean() for j in range(3)] for i in range(4)])
    np.testing.assert_allclose(got, want.reshape(-1), atol=ATOL)
    np.testing.assert_allclose(got, 3 / 2 * (g - g.mean(1, keepdims=True)).reshape(-1), atol=ATOL)


def test_score_lands_on_the_last_response_token():
    mask = prefix_mask([3, 1, 5], 5)
    got = np.asarray(last_token_rewards(jnp.asarray([2.0, -1.0, 0.5]), jnp.asarray(mask)))
    want = np.zeros((3, 5))
    want[0, 2], want[1, 0], want[2, 4] = 2.0, -1.0, 0.5
    np.testing.assert_array_equal(got, want)


def test_aggregation_weights_token_sequence_and_dr_grpo():
    """The minibatch loss sum(w * l) / denominator of each rl.loss_aggregation against its
    formula in float64; a sequence whose tokens all weigh 0 (masked truncation) still counts in
    Dr. GRPO's B; padding rows (no response) count nowhere."""
    rows = prefix_mask([4, 1, 3, 0], 4)
    loss_mask = rows * np.array([1, 1, 0, 0])[:, None]  # the third row's tokens weigh 0
    losses = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0], [5.0] * 4, [7.0] * 4])
    metric = losses[::-1].copy()
    want = {  # (loss, metric)
        "token_mean": ((1 + 2 + 3 + 4 + 10) / 5, (7 * 4 + 5) / 5),
        "sequence_mean": ((2.5 + 10) / 2, (7 + 5) / 2),
        "token_sum_norm": ((1 + 2 + 3 + 4 + 10) / (3 * 4), (7 + 5) / 3),
    }
    for aggregation, (want_loss, want_metric) in want.items():
        w = aggregation_weights(jnp.asarray(loss_mask), aggregation, 4, jnp.asarray(rows))
        denominator = float(w.denominator)
        got_loss = (np.asarray(w.loss, np.float64) * losses).sum() / denominator
        got_metric = (np.asarray(w.metrics, np.float64) * metric).sum() / denominator
        np.testing.assert_allclose(got_loss, want_loss, atol=ATOL, err_msg=aggregation)
        np.testing.assert_allclose(got_metric, want_metric, atol=ATOL, err_msg=aggregation)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = rl.KLController(0.1, target=6.0, horizon=1000)
    ctl.update(9.0, 64)  # error clip(9/6 - 1, -0.2, 0.2) = 0.2
    np.testing.assert_allclose(ctl.kl_coef, 0.1 * (1 + 0.2 * 64 / 1000), rtol=1e-12)
    ctl.update(5.4, 64)  # error -0.1
    np.testing.assert_allclose(ctl.kl_coef, 0.1 * (1 + 0.2 * 0.064) * (1 - 0.1 * 0.064), rtol=1e-12)
    fixed = rl.KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.kl_coef == 0.1
    restored = rl.KLController(0.5, target=6.0)
    restored.set_state(ctl.get_state())
    assert restored.kl_coef == ctl.kl_coef


def adamw_reference(params, grads_seq, lr, *, b1=0.9, b2=0.95, eps=1e-8, clip=1.0):
    """float64 AdamW (no weight decay) with global-norm clipping, over a list of gradients."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
        scale = min(1.0, clip / norm) if clip > 0 else 1.0
        for k, g in grads.items():
            g = g * scale
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            p[k] -= lr * (m[k] / (1 - b1**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("value_lr", [None, 3e-2])
def test_value_lr_updates_value_params_with_their_own_lr_and_clip(value_lr):
    """train.value_lr: policy and value model each follow AdamW at their own learning rate with
    their own global-norm clip; without it, one AdamW (one clip) over both at train.lr."""
    import optax

    from jaxalign.config import TrainConfig
    from jaxalign.optim import make_optimizer

    rng = np.random.default_rng(0)
    params = {"policy": {"w": rng.normal(size=(3, 2))}, "value": {"w": rng.normal(size=(2,))}}
    grads = [
        {
            "policy": {"w": rng.normal(size=(3, 2)) * s},
            "value": {"w": rng.normal(size=(2,)) * 3 * s},
        }
        for s in (0.2, 2.0, 0.5)
    ]
    cfg = TrainConfig(
        lr=1e-3,
        value_lr=value_lr,
        warmup_steps=0,
        lr_schedule="constant",
        steps=3,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    tx, schedule = make_optimizer(cfg, params)
    state = tx.init(params)
    p = params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    if value_lr is None:
        flat = {"policy": params["policy"]["w"], "value": params["value"]["w"]}
        want = adamw_reference(
            flat, [{"policy": g["policy"]["w"], "value": g["value"]["w"]} for g in grads], 1e-3
        )
        want_policy, want_value = want["policy"], want["value"]
    else:
        want_policy = adamw_reference(
            {"w": params["policy"]["w"]}, [g["policy"] for g in grads], 1e-3
        )["w"]
        want_value = adamw_reference(
            {"w": params["value"]["w"]}, [g["value"] for g in grads], value_lr
        )["w"]
    np.testing.assert_allclose(p["policy"]["w"], want_policy, atol=ATOL, rtol=0)
    np.testing.assert_allclose(p["value"]["w"], want_value, atol=ATOL, rtol=0)
    # The value model really moved by ~value_lr per step (Adam's step is ~lr * sign(g)).
    moved = np.abs(p["value"]["w"] - params["value"]["w"]).max()
    assert moved > 2 * (value_lr or 1e-3)
    assert float(schedule(0)) == pytest.approx(1e-3)


def test_value_lr_without_a_value_model_is_a_config_error():
    from jaxalign.config import TrainConfig
    from jaxalign.errors import ConfigError
    from jaxalign.optim import make_optimizer

    with pytest.raises(ConfigError, match="train.value_lr"):
        make_optimizer(TrainConfig(value_lr=1e-3), {"w": np.zeros(2)})
