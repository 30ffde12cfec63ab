"""The generic train step and loop: sharding equivalence, accumulation, resume, preemption."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy import ToyAlgorithm, losses, run_toy, toy_config

from jaxalign.trainers.loop import Trainer

run = run_toy


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    cfg = toy_config(tmp_path_factory.mktemp("single"), **{"mesh.fsdp": 1})
    _, result = run(cfg, devices=jax.devices()[:1])
    return losses(result)


def test_loss_decreases(single_device_losses):
    assert single_device_losses[-1] < single_device_losses[0] - 0.1


@pytest.mark.parametrize(
    "mesh",
    [
        {"mesh.fsdp": 4, "mesh.tensor": 2},
        {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
        # Parameters over fsdp x tensor as above; activations sequence-parallel over `tensor`
        # instead (the activation table differs from the parameter table).
        {
            "mesh.fsdp": 4,
            "mesh.tensor": 2,
            **{f"sharding.activation_rules.{n}": "null" for n in ("heads", "kv_heads", "mlp")},
            "sharding.activation_rules.length": "tensor",
        },
    ],
    ids=["fsdp4_tensor2", "data2_fsdp2_tensor2", "fsdp4_tensor2_sequence_activations"],
)
def test_sharded_run_equals_single_device(tmp_path, mesh, single_device_losses):
    _, result = run(toy_config(tmp_path, **mesh))
    np.testing.assert_allclose(losses(result), single_device_losses, atol=1e-5, rtol=0)


def test_scan_layers_and_remat_equal_unrolled(tmp_path, single_device_losses):
    from jaxalign.models.llama import stack_layers
    from jaxalign.trainers.loop import init_params

    unrolled = toy_config(tmp_path / "u", **{"mesh.fsdp": 1})
    trainer = Trainer(unrolled, ToyAlgorithm(unrolled), devices=jax.devices()[:1])
    params = stack_layers(init_params(unrolled, trainer.param_shardings, unrolled.train.seed))
    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "model.scan_layers": True, "model.remat": "full"})
    result = Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:1]).run(init_params=params)
    np.testing.assert_allclose(losses(result), single_device_losses, atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    """4 micro-batches of 2 rows give the same update as one batch of 8 (same rows)."""
    base = {"mesh.fsdp": 1, "train.steps": 3}
    _, full = run(toy_config(tmp_path / "full", **base), devices=jax.devices()[:1])
    _, accum = run(
        toy_config(tmp_path / "accum", **base, **{"train.grad_accum": 4}), devices=jax.devices()[:1]
    )
    np.testing.assert_allclose(losses(accum), losses(full), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(accum.state["params"]), jax.tree.leaves(full.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_accumulation_normalizes_by_total_tokens(tmp_path):
    """With unequal target counts per micro-batch, the loss is sum / total tokens."""
    cfg = toy_config(
        tmp_path, **{"mesh.fsdp": 1, "train.grad_accum": 2, "train.steps": 1, "train.lr": 0.0}
    )
    algo = ToyAlgorithm(cfg)
    trainer = Trainer(cfg, algo, devices=jax.devices()[:1])
    data = algo.train_data(0, 1)
    batch = next(data)
    batch["loss_mask"][0, :, 4:] = 0.0  # micro-batch 0 keeps 4 of 16 targets per row
    state = trainer.fresh_state()
    step = trainer.compile_step(trainer.to_global(batch))
    _, metrics = step(state, trainer.to_global(batch), None)
    # Reference: per-token losses from a plain forward pass over both micro-batches.
    from flax import nnx

    from jaxalign.losses import target_logprobs

    model = nnx.merge(trainer.graphdef, trainer.fresh_state()["params"])
    nll = []
    for a in range(2):
        h = model(batch["inputs"][a], batch["positions"][a], batch["segment_ids"][a])
        logps, _ = target_logprobs(h, model.output_weight(), batch["targets"][a])
        nll.append(-np.asarray(logps) * batch["loss_mask"][a])
    expected = sum(x.sum() for x in nll) / batch["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    mean_of_means = np.mean([nll[a].sum() / batch["loss_mask"][a].sum() for a in range(2)])
    assert abs(expected - mean_of_means) > 1e-3  # the two normalizations really differ here


def test_resume_reproduces_uninterrupted_run(tmp_path, single_device_losses):
    """A run that crashes after step 3 (last checkpoint: step 2) and is resumed produces the
    same losses for steps 3..5 as the uninterrupted run, bitwise."""

    def crash_after_three(batch_index):
        if batch_index == 3:
            raise RuntimeError("simulated crash")

    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "checkpoint.every": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, devices=jax.devices()[:1], hook=crash_after_three)
    _, resumed = run(cfg, devices=jax.devices()[:1])
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    assert losses(resumed) == single_device_losses[2:]  # bitwise on CPU in f32


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved under fsdp=8 on 8 devices, restored under data=2 x tensor=2 on 4 devices."""

    def stop_after_three(batch_index):
        if batch_index == 3:
            raise RuntimeError("simulated crash")

    _, uninterrupted = run(toy_config(tmp_path / "ref", **{"mesh.fsdp": 8}))
    cfg = toy_config(tmp_path / "run", **{"mesh.fsdp": 8, "checkpoint.every": 3})
    with pytest.raises(RuntimeError):
        run(cfg, hook=stop_after_three)
    cfg = toy_config(tmp_path / "run", **{"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2})
    trainer, resumed = run(cfg, devices=jax.devices()[:4])
    assert trainer.mesh.shape == {"data": 2, "fsdp": 1, "expert": 1, "context": 1, "tensor": 2}
    assert [h["step"] for h in resumed.history] == [4, 5]
    np.testing.assert_allclose(losses(resumed), losses(uninterrupted)[3:], atol=1e-5, rtol=0)


def test_sigterm_saves_current_step_and_stops(tmp_path, single_device_losses):
    def preempt_after_two(batch_index):
        if batch_index == 2:  # the third batch: steps 1 and 2 are done
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "train.steps": 5})
    _, stopped = run(cfg, devices=jax.devices()[:1], hook=preempt_after_two)
    assert stopped.preempted and stopped.final_step == 3
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
    _, resumed = run(cfg, devices=jax.devices()[:1])
    assert losses(resumed) == single_device_losses[3:]


def test_interrupted_save_is_never_restored(tmp_path, single_device_losses):
    def crash_after_two(batch_index):
        if batch_index == 2:
            raise RuntimeError("simulated crash")

    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "checkpoint.every": 2})
    with pytest.raises(RuntimeError):
        run(cfg, devices=jax.devices()[:1], hook=crash_after_two)
    ckpts = tmp_path / "run" / "checkpoints"
    # What a crash in the middle of writing step 4 leaves behind: an uncommitted temp directory.
    (ckpts / "4.orbax-checkpoint-tmp-1234567").mkdir()
    (ckpts / "4.orbax-checkpoint-tmp-1234567" / "partial").write_text("x")
    _, resumed = run(cfg, devices=jax.devices()[:1])
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    assert losses(resumed) == single_device_losses[2:]


def test_metrics_file_has_required_keys(tmp_path):
    import json

    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "train.steps": 2})
    run(cfg, devices=jax.devices()[:1])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] > 0 and records[0]["tokens_per_s"] > 0
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_nan_halts_and_keeps_the_last_good_checkpoint(tmp_path):
    from jaxalign.errors import UserError

    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "checkpoint.every": 2, "train.log_every": 2})
    algo = ToyAlgorithm(cfg)
    algo.poison = {2}  # the third batch: step 3
    with pytest.raises(
        UserError,
        match=r"step 3: loss or gradients became NaN/Inf; halting "
        r"\(last good checkpoint: step 2",
    ):
        Trainer(cfg, algo, devices=jax.devices()[:1]).run()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]


def test_nan_skip_drops_that_update_and_goes_on(tmp_path, single_device_losses):
    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "train.nan_policy": "skip"})
    algo = ToyAlgorithm(cfg)
    algo.poison = {1}  # step 2's update is dropped
    result = Trainer(cfg, algo, devices=jax.devices()[:1]).run()
    got = losses(result)
    assert got[0] == single_device_losses[0] and np.isnan(got[1])
    assert [h["nonfinite"] for h in result.history] == [0.0, 1.0, 0.0, 0.0, 0.0]
    # Step 3 sees the parameters after step 1 (step 2 changed nothing) on batch 3.
    assert got[2] != single_device_losses[2] and np.isfinite(got[2])


# -- max/min-reduced metrics (trainers/step.py) -------------------------------------------------


def _extreme_metrics_setup():
    """A linear scorer and a loss emitting a sum metric and max:/min:-tagged metrics of the
    per-example scores over real examples (mask 1)."""
    from flax import nnx

    from jaxalign.trainers.step import init_state

    graphdef, params = nnx.split(nnx.Linear(3, 1, rngs=nnx.Rngs(0)))
    params = params.to_pure_dict()

    def loss_fn(model, batch, rng, frozen):
        scores = model(batch["x"])[:, 0]
        real = batch["mask"] > 0
        metrics = {
            "score/sum": jnp.sum(batch["mask"] * scores),
            "max:score/max": jnp.max(jnp.where(real, scores, -jnp.inf)),
            "min:score/min": jnp.min(jnp.where(real, scores, jnp.inf)),
        }
        return jnp.sum(batch["mask"] * scores**2), batch["mask"].sum(), metrics

    tx = optax.sgd(0.1)
    return graphdef, params, loss_fn, tx, init_state(params, tx, 0)


def _scores(params, x):
    return x @ np.asarray(params["kernel"])[:, 0] + np.asarray(params["bias"])[0]


def test_max_min_metrics_over_micro_batches_equal_one_batch():
    from jaxalign.trainers.step import make_train_step

    graphdef, params, loss_fn, tx, state = _extreme_metrics_setup()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    mask = np.ones(8, np.float32)
    mask[[1, 6, 7]] = 0.0  # the extremes of the masked rows must not count...
    x[1], x[6] = 100.0, -100.0
    step = jax.jit(make_train_step(graphdef, loss_fn, tx, optax.constant_schedule(0.1)))
    _, one = step(state, {"x": x[None], "mask": mask[None]})
    _, four = step(state, {"x": x.reshape(4, 2, 3), "mask": mask.reshape(4, 2)})
    scores = _scores(params, x.astype(np.float64))[mask > 0]
    for metrics in (one, four):  # ...and micro-batch 3 has no real example at all
        assert float(metrics["score/max"]) == pytest.approx(scores.max(), rel=1e-6)
        assert float(metrics["score/min"]) == pytest.approx(scores.min(), rel=1e-6)
        assert float(metrics["score/sum"]) == pytest.approx(scores.mean(), rel=1e-5)
        assert not any(k.startswith(("max:", "min:")) for k in metrics)
    assert float(four["score/max"]) == float(one["score/max"])
    assert float(four["score/min"]) == float(one["score/min"])
    np.testing.assert_allclose(float(four["loss"]), float(one["loss"]), rtol=1e-6)


def test_eval_max_min_metrics_are_over_every_batch():
    from jaxalign.trainers.step import combine_metrics, eval_metrics, make_eval_step

    graphdef, params, loss_fn, _, _ = _extreme_metrics_setup()
    rng = np.random.default_rng(1)
    batches = [
        {"x": rng.normal(size=(2, 3, 3)).astype(np.float32), "mask": np.ones((2, 3), np.float32)}
        for _ in range(3)
    ]
    batches[2]["mask"][1] = 0.0  # a last, partly filled batch
    eval_fn = jax.jit(make_eval_step(graphdef, loss_fn))
    totals = {}
    for batch in batches:
        out = {k: float(v) for k, v in jax.device_get(eval_fn(params, batch)).items()}
        totals = combine_metrics(totals, out) if totals else out
    got = eval_metrics(totals)
    x = np.concatenate([b["x"].reshape(-1, 3) for b in batches]).astype(np.float64)
    real = np.concatenate([b["mask"].reshape(-1) for b in batches]) > 0
    scores = _scores(params, x)[real]
    assert got["score/max"] == pytest.approx(scores.max(), rel=1e-6)
    assert got["score/min"] == pytest.approx(scores.min(), rel=1e-6)
    assert got["score/sum"] == pytest.approx(scores.mean(), rel=1e-5)
    assert got["loss"] == pytest.approx(np.mean(scores**2), rel=1e-5)
    # Averaging per-batch extremes (the old behaviour) would give something else here.
    batch_max = [_scores(params, b["x"].reshape(-1, 3)).max() for b in batches]
    assert abs(np.mean(batch_max) - scores.max()) > 1e-3


def test_free_memory_is_handed_back_after_each_save_unless_disabled(tmp_path, monkeypatch):
    import jaxalign.trainers.loop as loop_module

    calls = []
    monkeypatch.setattr(loop_module, "release_free_memory", lambda: calls.append(1) or True)
    run(
        toy_config(tmp_path / "on", **{"mesh.fsdp": 1, "checkpoint.every": 2}),
        devices=jax.devices()[:1],
    )
    assert len(calls) == 3  # saves at steps 2, 4 and 5 (the last)
    calls.clear()
    off = toy_config(
        tmp_path / "off", **{"mesh.fsdp": 1, "checkpoint.every": 2, "train.release_memory": False}
    )
    run(off, devices=jax.devices()[:1])
    assert calls == []
