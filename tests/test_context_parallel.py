"""Context parallelism (issue #30): rows split over the `context` mesh axis.

The attention function (ring and all-gather) against a float64 NumPy reference, forward and
gradients; SFT training with context=4 and with context=2 x fsdp=2 x tensor=2 against the
single-device run over several steps, on packed rows whose segments cross device boundaries;
a GRPO update on a context-sharded batch against one device."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy import TINY_MODEL

from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, ShardingConfig, load_config
from jaxalign.errors import ConfigError
from jaxalign.models import context_attention as ca
from jaxalign.trainers import make_algorithm
from jaxalign.trainers.loop import Trainer, batch_sharding
from jaxalign.trainers.rollout import validate_rl_config

DATA = Path(__file__).resolve().parent.parent / "data" / "tiny"


# ---------------------------------------------------------------------------------------------
# The attention function against float64 NumPy.


def reference_attention(q, k, v, seg, window, cap, dout):
    """Output and (dq, dk, dv) of causal grouped-query attention within segments, float64;
    `dout` is the output's cotangent."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    z = np.einsum("bthd,bshd->bhts", q, kk) * hd**-0.5
    s = cap * np.tanh(z / cap) if cap else z
    i = np.arange(t)
    mask = i[None, :] <= i[:, None]
    if window:
        mask &= i[None, :] > i[:, None] - window
    mask = (mask[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", p, vv)
    dp = np.einsum("bthd,bshd->bhts", dout, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dz = ds * (1 - np.tanh(z / cap) ** 2) if cap else ds
    dz *= hd**-0.5
    dq = np.einsum("bhts,bshd->bthd", dz, kk)
    dk = np.einsum("bhts,bthd->bshd", dz, q).reshape(b, t, -1, g, hd).sum(3)
    dv = np.einsum("bhts,bthd->bshd", p, dout).reshape(b, t, -1, g, hd).sum(3)
    return out, (dq, dk, dv)


def test_attention_equals_float64_reference_forward_and_gradients():
    """Ring and all-gather attention over context=4 (x data=2) in the zig-zag layout: causal,
    GQA, segments crossing device boundaries and padding; ring with a sliding window and a
    soft-cap."""
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=1, context=4))
    rules = shd.resolve_rules(ShardingConfig())
    b, t, h, kv, hd, c = 2, 32, 4, 2, 8, 4
    rng = np.random.default_rng(0)
    q, k, v, dout = (
        rng.normal(size=s).astype(np.float32)
        for s in [(b, t, h, hd), (b, t, kv, hd), (b, t, kv, hd), (b, t, h, hd)]
    )
    # Device d holds sequence chunks d and 7 - d (4 tokens each): segments span several.
    seg = np.ones((b, t), np.int32)
    seg[0, 13:] = 2
    seg[1, 5:27], seg[1, 27:] = 3, 0
    # Both methods fold blocks with the same update: each case checks the other's masking too.
    cases = [("ring", 7, 5.0), ("allgather", None, None)]

    @jax.jit
    def run(q, k, v, seg, dout):
        index = jnp.broadcast_to(ca.zigzag_order(t, c), (b, t))
        outs = []
        for method, window, cap in cases:

            def f(q, k, v, method=method, window=window, cap=cap):
                z = [ca.to_zigzag(a, c) for a in (q, k, v, seg)]
                o = ca.context_attention(*z, index, method=method, window=window, soft_cap=cap)
                return ca.from_zigzag(o, c)

            out, vjp = jax.vjp(f, q, k, v)
            outs.append((out, vjp(dout)))
        return outs

    with shd.activation_sharding(mesh, rules):
        got = jax.device_get(run(q, k, v, seg, dout))
    for (method, window, cap), (out, grads) in zip(cases, got):
        want_out, want_grads = reference_attention(q, k, v, seg, window, cap, dout)
        np.testing.assert_allclose(out, want_out, atol=2e-6, err_msg=method)
        for name, g, w in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(g, w, atol=2e-5, err_msg=f"{method} d{name}")


def test_zigzag_layout_round_trips_and_balances_causal_work():
    order = ca.zigzag_order(16, 4)
    assert order[:8].tolist() == [0, 1, 14, 15, 2, 3, 12, 13]  # chunks 0, 7 | 1, 6 | ...
    x = jnp.arange(2 * 16).reshape(2, 16)
    np.testing.assert_array_equal(ca.to_zigzag(x, 4), np.asarray(x)[:, order])
    np.testing.assert_array_equal(ca.from_zigzag(ca.to_zigzag(x, 4), 4), x)
    # Causal (query, key) pairs per device: equal in the zig-zag layout.
    work = [(order[d * 4 : d * 4 + 4, None] >= np.arange(16)[None]).sum() for d in range(4)]
    assert len(set(work)) == 1, work


def test_row_widths_must_divide_into_the_zigzag_chunks():
    with pytest.raises(ConfigError, match=r"train.seq_len \(36\).*context axis.*= 4"):
        load_config(None, ["train.seq_len=36", "mesh.context=4"], base={"model": dict(TINY_MODEL)})
    sets = ["trainer=grpo", "mesh.context=4", "data.prompt_buckets=[20, 32]"]
    sets += ["sampling.max_new_tokens=32", "train.seq_len=64", "rl.num_generations=2"]
    cfg = load_config(None, sets, base={"model": dict(TINY_MODEL)})
    with pytest.raises(ConfigError, match="prompt bucket 20 \\+ response bucket 16 tokens"):
        validate_rl_config(cfg, "grpo")


# ---------------------------------------------------------------------------------------------
# Training steps: context-sharded against one device.

STEPS = 3
SEQ = 32


def sft_config(tmp_path, mesh: dict):
    sets = {
        "trainer": "sft",
        "run_dir": str(tmp_path / "run"),
        "data.tokenizer": str(DATA / "tokenizer.model"),
        "train.batch_size": 4,
        "train.seq_len": SEQ,
        # AdamW moves a weight by about lr whatever the size of its gradient: near-zero
        # gradients' rounding differences would show at lr scale. 1e-3 keeps them below 1e-5.
        "train.lr": 1e-3,
        "train.warmup_steps": 0,
        "loss.vocab_chunks": 2,
        **{f"mesh.{k}": v for k, v in mesh.items()},
    }
    base = {"model": {**TINY_MODEL, "vocab_size": 512, "num_layers": 1}}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()], base=base)


def packed_batches(steps: int, rows: int, vocab: int) -> list[dict]:
    """Packed SFT rows [1, rows, SEQ]: segments of random lengths (crossing the 4-token chunks
    of context=4's zig-zag layout), positions restarting per segment, a padded tail."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(steps):
        seg = np.zeros((rows, SEQ), np.int32)
        pos = np.zeros((rows, SEQ), np.int32)
        for r in range(rows):
            at, s = 0, 1
            while at < SEQ - 3:
                n = int(rng.integers(3, 14))
                end = min(at + n, SEQ - 2)
                seg[r, at:end], pos[r, at:end] = s, np.arange(end - at)
                at, s = end, s + 1
        tokens = rng.integers(1, vocab, (rows, SEQ + 1)).astype(np.int32)
        mask = (seg > 0) & (np.roll(seg, -1, axis=1) == seg)
        out.append(
            {
                "inputs": tokens[None, :, :-1],
                "targets": tokens[None, :, 1:],
                "loss_mask": mask[None].astype(np.float32),
                "segment_ids": seg[None],
                "positions": pos[None],
            }
        )
    return out


def train_steps(cfg, devices, batches):
    """Losses, final and initial parameters of `len(batches)` train steps under `cfg` on
    `devices`."""
    algo = make_algorithm(cfg)
    trainer = Trainer(cfg, algo, devices=devices)
    state = trainer.fresh_state()
    initial = jax.device_get(state["params"])
    sharding = batch_sharding(trainer.mesh, trainer.rules, 3)
    losses = []
    with shd.activation_sharding(trainer.mesh, trainer.rules):
        first = {k: jax.device_put(v, sharding) for k, v in batches[0].items()}
        step = trainer.compile_step(first).lower(state, first, None).compile()
        for batch in batches:
            state, metrics = step(
                state, {k: jax.device_put(v, sharding) for k, v in batch.items()}, None
            )
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"]), initial


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("context_sft")
    batches = packed_batches(STEPS, 4, 512)
    meshes = {
        "one": ({"fsdp": 1}, jax.devices()[:1]),
        "context4": ({"fsdp": -1, "context": 4}, None),
        "context2_fsdp2_tensor2": ({"fsdp": 2, "context": 2, "tensor": 2}, None),
    }
    return {
        name: train_steps(sft_config(tmp / name, mesh), devices, batches)
        for name, (mesh, devices) in meshes.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["context4", "context2_fsdp2_tensor2"])
def test_sft_steps_on_a_context_mesh_equal_one_device(sft_runs, layout):
    want_losses, want_params, initial = sft_runs["one"]
    losses, params, _ = sft_runs[layout]
    moved = max(
        np.abs(a - b).max() for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(initial))
    )
    assert moved > 1e-3  # the steps move the weights far beyond the tolerance
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def grpo_batch(rows: int, prompt: int, response: int, vocab: int) -> dict:
    """A GRPO minibatch [rows, prompt + response]: left-padded prompts, responses, rollout-time
    and reference log-probs, advantages."""
    rng = np.random.default_rng(2)
    width = prompt + response
    lengths = rng.integers(3, prompt, rows)
    seg = (np.arange(width)[None] >= prompt - lengths[:, None]).astype(np.int32)
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    mask = np.ones((rows, response), np.float32)
    mask[0, response - 5 :] = 0
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {
        "tokens": rng.integers(1, vocab, (rows, width)).astype(np.int32),
        "positions": pos,
        "segment_ids": seg,
        "mask": mask,
        "old_logprobs": f(rows, response) * 0.1 - 6.0,
        "advantages": f(rows, response),
        "ref_logprobs": f(rows, response) * 0.1 - 6.0,
    }


def grpo_loss_and_grads(tmp_path, batch):
    """(loss, metrics) and gradients of the GRPO loss on `batch`: on one device, and with the
    rows split over context=4 (x fsdp=2) inside the trainer's activation sharding."""
    sets = {
        "trainer": "grpo",
        "rl.kl_coef": 0.1,
        "run_dir": str(tmp_path / "run"),
        "data.tokenizer": str(DATA / "tokenizer.model"),
        "data.train_file": str(DATA / "rl_prompts_train.jsonl"),
        "data.prompt_buckets": "[16]",
        "sampling.max_new_tokens": 16,
        "sampling.max_prompt_len": 16,
        "rl.prompts_per_rollout": 8,
        "rl.num_generations": 2,
        "train.steps": 2,
        "train.batch_size": 8,
        "train.seq_len": 32,
        "mesh.context": 4,
    }
    base = {"model": {**TINY_MODEL, "vocab_size": 512, "num_layers": 1}}
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()], base=base)
    algo = make_algorithm(cfg)
    trainer = Trainer(cfg, algo)
    params = trainer.initial_params()

    def loss(params, batch):
        value, denom, metrics = algo.loss_fn(
            nnx.merge(trainer.graphdef, params), batch, jax.random.PRNGKey(0)
        )
        return value / denom, {k: v / denom for k, v in metrics.items()}

    one = jax.devices()[0]
    single = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        jax.device_put(params, one), jax.device_put(batch, one)
    )
    sharding = batch_sharding(trainer.mesh, trainer.rules, 2)
    with shd.activation_sharding(trainer.mesh, trainer.rules):
        placed = {k: jax.device_put(v, sharding) for k, v in batch.items()}
        # A new function: jit's cache does not know the activation sharding it was traced in.
        sharded = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b), has_aux=True))(params, placed)
    return jax.device_get(single), jax.device_get(sharded)


@pytest.mark.slow
def test_grpo_update_on_a_context_sharded_batch_equals_one_device(tmp_path):
    """The GRPO loss (the policy's log-probs and entropies over the rows, clipped ratios, KL to
    the reference) and its gradients with the rows split over context=4 equal one device's."""
    single, sharded = grpo_loss_and_grads(tmp_path, grpo_batch(4, 16, 16, 512))
    (want, want_metrics), want_grads = single
    (got, metrics), grads = sharded
    assert want_metrics["policy/entropy"] > 1.0  # a real forward, not a degenerate one
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for key in want_metrics:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_prefill_and_decoding_on_a_context_mesh_equal_one_device():
    """A prompt's prefill (context-parallel attention in sequence order) and a decoding step over
    the KV cache (kept whole per device) on context=4 x fsdp=2 give one device's hidden states;
    the training forward of the same row (zig-zag layout) too."""
    from jaxalign.config import ModelConfig
    from jaxalign.models.llama import Transformer

    cfg = ModelConfig(**TINY_MODEL, scan_layers=True)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    b, prompt, total = 2, 16, 24
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, total), 1, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(total), (b, total))
    segments = jnp.ones((b, total), jnp.int32)

    def run(params):
        model = nnx.merge(graphdef, params)
        full = model(tokens, positions, segments)
        cache = model.init_cache(b, total)
        hidden, cache = model.with_cache(
            tokens[:, :prompt], positions[:, :prompt], segments[:, :prompt], cache
        )
        step, _ = model.with_cache(
            tokens[:, prompt : prompt + 1],
            positions[:, prompt : prompt + 1],
            segments[:, prompt : prompt + 1],
            cache,
            jnp.int32(prompt),
            segments,
        )
        return full, jnp.concatenate([hidden, step], axis=1)

    want = jax.jit(run)(params)
    mesh = shd.make_mesh(MeshConfig(fsdp=2, context=4))
    with shd.activation_sharding(mesh, shd.resolve_rules(ShardingConfig())):
        got = jax.jit(lambda p: run(p))(params)  # a new function: traced under the mesh
    for g, w in zip(jax.device_get(got), jax.device_get(want)):
        np.testing.assert_allclose(g, w, atol=2e-6)
    np.testing.assert_allclose(want[1], want[0][:, : prompt + 1], atol=2e-6)
