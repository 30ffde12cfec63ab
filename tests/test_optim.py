"""Optimizer pieces: schedule values, weight-decay mask, starting from another run's params."""

import jax
import numpy as np
import optax
from toy import ToyAlgorithm, losses, toy_config

from jaxalign.config import TrainConfig
from jaxalign.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
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
    lin = learning_rate_schedule(TrainConfig(steps=20, lr=1.0, warmup_steps=0,
                                             lr_schedule="linear", min_lr_ratio=0.0))
    np.testing.assert_allclose([float(lin(i)) for i in (0, 10, 20)], [1.0, 0.5, 0.0], atol=1e-6)
    const = learning_rate_schedule(TrainConfig(steps=20, lr=0.5, warmup_steps=0,
                                               lr_schedule="constant"))
    assert float(const(17)) == 0.5


def test_weight_decay_skips_norms_biases_and_embeddings():
    params = {"embed": 1, "final_norm": 1, "lm_head": 1,
              "blocks": {0: {"attn": {"wq": 1, "bq": 1, "q_norm": 1}, "attn_norm": 1,
                             "mlp": {"w_up": 1, "b_up": 1}}}}
    mask = weight_decay_mask(params)
    assert mask["lm_head"] and mask["blocks"][0]["attn"]["wq"] and mask["blocks"][0]["mlp"]["w_up"]
    for off in (mask["embed"], mask["final_norm"], mask["blocks"][0]["attn"]["bq"],
                mask["blocks"][0]["attn"]["q_norm"], mask["blocks"][0]["attn_norm"],
                mask["blocks"][0]["mlp"]["b_up"]):
        assert off is False


def test_decoupled_weight_decay_matches_adamw_reference():
    """One step with zero gradients: decayed params shrink by lr * wd; masked ones stay."""
    cfg = TrainConfig(steps=10, lr=0.1, warmup_steps=0, lr_schedule="constant",
                      weight_decay=0.5, max_grad_norm=1.0)
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
    cfg = toy_config(tmp_path / "b", **{"mesh.fsdp": 4, "train.steps": 1,
                                        "init_from": str(tmp_path / "a" / "run")})
    trainer = Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:4])
    start = trainer.initial_params()
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(first.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert start["embed"].sharding.mesh.shape["fsdp"] == 4
    second = trainer.run()
    assert losses(second)[0] < losses(first)[0]
