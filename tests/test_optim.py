"""Optimizer pieces: schedule values, weight-decay mask, starting from another run's params."""

import re
import shutil

import jax
import numpy as np
import optax
import pytest
from toy import ToyAlgorithm, losses, run_toy, toy_config

from jaxalign.config import TrainConfig
from jaxalign.errors import ConfigError
from jaxalign.optim import (
    freeze_labels,
    learning_rate_schedule,
    make_optimizer,
    trained_part,
    weight_decay_mask,
    with_trained,
)
from jaxalign.trainers.loop import Trainer


def test_cosine_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    s = learning_rate_schedule(cfg)
    lrs = np.array([float(s(i)) for i in range(111)])
    # step i < warmup uses lr * (i + 1) / warmup: the first update already moves the model
    np.testing.assert_allclose(lrs[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-5)
    assert np.all(np.diff(lrs[10:]) <= 1e-12)
    # cosine from 1e-3 to 1e-4 over the 100 decay steps (float64 reference)
    k = np.arange(0, 101)
    expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * k / 100))
    np.testing.assert_allclose(lrs[10:], expected, rtol=1e-5)


def test_linear_and_constant_schedules():
    lin = learning_rate_schedule(
        TrainConfig(steps=20, lr=1.0, warmup_steps=0, lr_schedule="linear", min_lr_ratio=0.0)
    )
    np.testing.assert_allclose([float(lin(i)) for i in (0, 10, 20)], [1.0, 0.5, 0.0], atol=1e-6)
    const = learning_rate_schedule(
        TrainConfig(steps=20, lr=0.5, warmup_steps=0, lr_schedule="constant")
    )
    assert float(const(17)) == 0.5


def test_weight_decay_skips_norms_biases_and_embeddings():
    params = {
        "embed": 1,
        "final_norm": 1,
        "lm_head": 1,
        "blocks": {
            0: {
                "attn": {"wq": 1, "bq": 1, "q_norm": 1},
                "attn_norm": 1,
                "mlp": {"w_up": 1, "b_up": 1},
            }
        },
    }
    mask = weight_decay_mask(params)
    assert mask["lm_head"] and mask["blocks"][0]["attn"]["wq"] and mask["blocks"][0]["mlp"]["w_up"]
    for off in (
        mask["embed"],
        mask["final_norm"],
        mask["blocks"][0]["attn"]["bq"],
        mask["blocks"][0]["attn"]["q_norm"],
        mask["blocks"][0]["attn_norm"],
        mask["blocks"][0]["mlp"]["b_up"],
    ):
        assert off is False


def test_decoupled_weight_decay_matches_adamw_reference():
    """One step with zero gradients: decayed params shrink by lr * wd; masked ones stay."""
    cfg = TrainConfig(
        steps=10,
        lr=0.1,
        warmup_steps=0,
        lr_schedule="constant",
        weight_decay=0.5,
        max_grad_norm=1.0,
    )
    params = {"lm_head": np.ones(3, np.float32), "final_norm": np.ones(3, np.float32)}
    tx, _ = make_optimizer(cfg, params)
    state = tx.init(params)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["lm_head"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["final_norm"], 1.0)


def test_init_from_starts_at_the_other_runs_parameters(tmp_path):
    """A run with init_from=RUN_DIR starts from that run's final parameters."""
    first_cfg = toy_config(tmp_path / "a", **{"mesh.fsdp": 2, "train.steps": 2})
    first = Trainer(first_cfg, ToyAlgorithm(first_cfg), devices=jax.devices()[:2]).run()
    cfg = toy_config(
        tmp_path / "b",
        **{"mesh.fsdp": 4, "train.steps": 1, "init_from": str(tmp_path / "a" / "run")},
    )
    trainer = Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:4])
    start = trainer.initial_params()
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(first.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert start["embed"].sharding.mesh.shape["fsdp"] == 4
    second = trainer.run()
    assert losses(second)[0] < losses(first)[0]


# -- train.freeze ------------------------------------------------------------------------------


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.normal(size=(6, 4)).astype(np.float32),
        "blocks": {
            "0": {
                "attn": {"wq": rng.normal(size=(4, 4)).astype(np.float32)},
                "attn_norm": np.ones(4, np.float32),
            }
        },
        "lm_head": rng.normal(size=(4, 6)).astype(np.float32),
    }


def test_frozen_parameters_get_no_update_no_state_and_no_share_of_the_clip():
    """The trained parameters move exactly as under AdamW over the trained ones alone (the
    frozen gradients, made large, would dominate a shared global-norm clip); the frozen ones
    stay bitwise and carry no moments."""
    cfg = TrainConfig(
        steps=10,
        lr=0.1,
        warmup_steps=0,
        lr_schedule="constant",
        weight_decay=0.3,
        max_grad_norm=1.0,
        freeze=["embed", "^lm_head$"],
    )
    params, grads = _tree(0), _tree(1)
    grads["embed"] *= 1000.0
    grads["lm_head"] *= 1000.0
    tx, _ = make_optimizer(cfg, params)
    labels = freeze_labels(cfg.freeze, params)
    state = tx.init(trained_part(params, labels))  # the tx holds the trained part only
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in moments) == 2 * (16 + 4)  # mu and nu of wq and attn_norm only
    trained_only = {"blocks": params["blocks"]}
    ref_tx, _ = make_optimizer(TrainConfig(**{**cfg.__dict__, "freeze": []}), trained_only)
    ref_state = ref_tx.init(trained_only)
    new, ref = params, trained_only
    for _ in range(3):
        trained = trained_part(new, labels)
        updates, state = tx.update(trained_part(grads, labels), state, trained)
        new = with_trained(new, optax.apply_updates(trained, updates))
        ref_updates, ref_state = ref_tx.update({"blocks": grads["blocks"]}, ref_state, ref)
        ref = optax.apply_updates(ref, ref_updates)
    np.testing.assert_array_equal(new["embed"], params["embed"])
    np.testing.assert_array_equal(new["lm_head"], params["lm_head"])
    for a, b in zip(jax.tree.leaves(new["blocks"]), jax.tree.leaves(ref["blocks"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(new["blocks"]["0"]["attn"]["wq"], params["blocks"]["0"]["attn"]["wq"])


@pytest.mark.parametrize(
    "patterns, message",
    [
        (["embedding"], "'embedding' matches no parameter"),
        (["blocks/("], "not a regular expression"),
        ([".*"], "freezes every parameter"),
    ],
)
def test_freeze_patterns_are_checked(patterns, message):
    cfg = TrainConfig(freeze=patterns)
    with pytest.raises(ConfigError, match=re.escape(message) if "'" in message else message):
        make_optimizer(cfg, _tree())


def test_frozen_run_keeps_those_parameters_and_resumes_on_another_mesh(tmp_path):
    """On 8 devices (fsdp 4 x tensor 2): the embedding stays as initialized and the rest trains;
    restarted from its step-2 checkpoint on a single device, the run gives steps 3-5 of the
    sharded run (the optimizer state, with its frozen and stateless part, goes through Orbax
    and onto the other mesh)."""
    over = {"train.freeze": "[embed]", "model.tie_embeddings": "false", "checkpoint.every": 2}
    cfg = toy_config(tmp_path, **{"mesh.fsdp": 4, "mesh.tensor": 2, **over})
    trainer = Trainer(cfg, ToyAlgorithm(cfg))
    start = jax.tree.map(np.asarray, trainer.initial_params())
    result = trainer.run()
    end = result.state["params"]
    np.testing.assert_array_equal(np.asarray(end["embed"]), start["embed"])
    assert not np.allclose(np.asarray(end["lm_head"]), start["lm_head"])
    assert losses(result)[-1] < losses(result)[0]

    for step in ("4", "5"):  # back to the state after step 2
        shutil.rmtree(tmp_path / "run" / "checkpoints" / step)
    single = toy_config(tmp_path, **{"mesh.fsdp": 1, **over})
    _, resumed = run_toy(single, jax.devices()[:1])
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    np.testing.assert_allclose(losses(resumed), losses(result)[2:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(resumed.state["params"]["embed"]), start["embed"])


# -- train.critic_warmup_steps -----------------------------------------------------------------


def _adam_reference(params, grads, steps, lr, b1, b2, eps, max_norm):
    """float64 Adam (no weight decay) with global-norm clipping, constant lr, from a fresh
    state: the parameters after each of `steps` updates with the same gradients."""
    flat = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(float((x**2).sum()) for x in g))
    g = [x * min(1.0, max_norm / norm) for x in g]
    mu = [np.zeros_like(x) for x in flat]
    nu = [np.zeros_like(x) for x in flat]
    out = []
    for t in range(1, steps + 1):
        mu = [b1 * m + (1 - b1) * x for m, x in zip(mu, g, strict=True)]
        nu = [b2 * n + (1 - b2) * x**2 for n, x in zip(nu, g, strict=True)]
        flat = [
            p - lr * (m / (1 - b1**t)) / (np.sqrt(n / (1 - b2**t)) + eps)
            for p, m, n in zip(flat, mu, nu, strict=True)
        ]
        out.append(flat)
    return out


def test_critic_warmup_trains_the_value_model_alone_then_starts_a_fresh_policy_adam():
    """For critic_warmup_steps the policy gets no update and its AdamW state does not advance;
    afterwards it moves as a fresh Adam would (float64 reference, own clip), while the value
    model moves as Adam at value_lr from step 1. The logged lr is the policy's: 0, then lr."""
    cfg = TrainConfig(
        steps=10,
        lr=0.01,
        value_lr=0.05,
        critic_warmup_steps=2,
        warmup_steps=0,
        lr_schedule="constant",
        max_grad_norm=1.0,
    )
    params = {"policy": _tree(0), "value": _tree(2)}
    grads = {"policy": _tree(1), "value": _tree(3)}
    grads["policy"]["embed"] *= 100.0  # would dominate a shared clip
    tx, schedule = make_optimizer(cfg, params)
    state, new = tx.init(params), params
    history = []
    for _ in range(4):
        updates, state = jax.jit(tx.update)(grads, state, new)
        new = optax.apply_updates(new, updates)
        history.append(new)
    adam = {"b1": cfg.b1, "b2": cfg.b2, "eps": cfg.eps, "max_norm": 1.0}
    value_ref = _adam_reference(params["value"], grads["value"], 4, 0.05, **adam)
    policy_ref = _adam_reference(params["policy"], grads["policy"], 2, 0.01, **adam)
    for step, got in enumerate(history):
        for a, b in zip(jax.tree.leaves(got["value"]), value_ref[step], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        policy = jax.tree.leaves(got["policy"])
        if step < 2:
            for a, b in zip(policy, jax.tree.leaves(params["policy"]), strict=True):
                np.testing.assert_array_equal(a, b)
        else:
            for a, b in zip(policy, policy_ref[step - 2], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert [float(schedule(s)) for s in range(4)] == pytest.approx([0.0, 0.0, 0.01, 0.01])
    with pytest.raises(ConfigError, match="critic_warmup_steps needs a model with a value"):
        make_optimizer(TrainConfig(critic_warmup_steps=2), _tree())
