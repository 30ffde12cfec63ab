"""Splash attention (`model.attention_kernel: splash`): the Pallas kernel, run here in interpret
mode, computes what the einsum attention does, values and gradients, alone, under the mesh's
shard_map and inside the model; and it compiles for a TPU topology on this CPU host."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from toy import TINY_MODEL

from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, ModelConfig, ShardingConfig, load_config
from jaxalign.models.llama import Transformer, blocked_causal_attention, resolve_attention_kernel
from jaxalign.models.splash import splash_block_size, splash_causal_attention

# 200 positions (padded to 256 inside: two blocks of 128), 4 query heads over 2 K/V heads; row 0
# packs two documents and padding, row 1 three documents. A window of 50 (shorter than a block)
# and a soft cap.
B, T, H, KV, HD = 2, 200, 4, 2, 16
SEGMENTS = np.repeat([[1, 2, 0], [1, 2, 3]], [90, 80, 30], axis=1)
WINDOW, SOFT_CAP = 50, 3.0


def reference_attention(q, k, v, segments, window, soft_cap):
    """float64 NumPy: softmax(cap(q.k / sqrt(hd)) + mask) v, masked causally, by segment and by
    window. q: [B, T, H, hd]; k, v: [B, T, KV, hd]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if soft_cap is not None:
        scores = soft_cap * np.tanh(scores / soft_cap)
    idx = np.arange(q.shape[1])
    allowed = idx[None, :] <= idx[:, None]
    if window is not None:
        allowed &= idx[None, :] > idx[:, None] - window
    allowed = allowed[None] & (segments[:, :, None] == segments[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.normal(size=(B, T, n, HD)), jnp.float32) for n in (H, KV, KV))


def splash(q, k, v):
    segments = jnp.asarray(SEGMENTS, jnp.int32)
    return splash_causal_attention(q, k, v, segments, WINDOW, SOFT_CAP, block=128)


@pytest.fixture(scope="module")
def splash_single_device(qkv):
    """Splash's output and gradients with no mesh: one kernel call for the whole batch."""
    return values_and_grads(splash, *qkv)


def values_and_grads(attention, q, k, v):
    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(got, want):
    (out, grads), (want_out, want_grads) = got, want
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, err_msg=f"d{name}")


def test_splash_equals_einsum_attention_values_and_gradients(qkv, splash_single_device):
    """Packed segments with padding, grouped-query heads, a sliding window shorter than the
    sequence, a soft cap, a length that is not a multiple of the kernel's block (padded inside),
    two blocks (the block above the diagonal skipped). Both equal a float64 reference."""
    segments = jnp.asarray(SEGMENTS, jnp.int32)
    einsum = values_and_grads(
        lambda q, k, v: blocked_causal_attention(q, k, v, segments, 64, WINDOW, SOFT_CAP), *qkv
    )
    assert_close(splash_single_device, einsum)
    want = reference_attention(*qkv, SEGMENTS, WINDOW, SOFT_CAP)
    np.testing.assert_allclose(np.asarray(splash_single_device[0]), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(einsum[0]), want, atol=1e-5)


@pytest.mark.parametrize(
    "mesh_shape",
    [dict(data=2, fsdp=1, tensor=4), dict(data=4, fsdp=1, tensor=2)],
    ids=["rows2-heads4-over-2-kv-heads", "rows-replicated-heads2"],
)
def test_sharded_splash_equals_single_device(qkv, splash_single_device, mesh_shape):
    """Under the activation rules the kernel runs in shard_map on each device's rows and query
    heads. With more head shards (4) than K/V heads (2) each device gets its K/V head repeated;
    where the batch (2 rows) does not divide its axes (data 4) the rows are replicated, and the
    gradients are still not summed over the replicas. Same numbers as one device."""
    mesh = shd.make_mesh(MeshConfig(**mesh_shape))
    rules = shd.resolve_rules(ShardingConfig())
    with shd.activation_sharding(mesh, rules):
        lowered = jax.jit(splash).lower(*qkv).as_text()
        sharded = values_and_grads(splash, *qkv)
    assert "manual_computation" in lowered  # the shard_map
    assert_close(sharded, splash_single_device)


def test_block_size_is_the_largest_of_512_256_128_dividing_the_padded_length():
    assert [splash_block_size(n) for n in (128, 256, 384, 640, 1024, 8192)] == [
        128,
        256,
        128,
        128,
        512,
        512,
    ]
    with pytest.raises(ValueError, match="not a multiple of 128"):
        splash_block_size(200)


def test_model_with_splash_equals_einsum():
    """The tiny model's hidden states with attention_kernel=splash equal the einsum model's:
    packed rows with padding, causal attention without a window, grouped-query heads."""
    cfgs = {
        kernel: ModelConfig(**TINY_MODEL, attention_kernel=kernel)
        for kernel in ("einsum", "splash")
    }
    graphdef, params = nnx.split(Transformer(cfgs["einsum"], nnx.Rngs(0)))
    splash_graphdef = nnx.split(Transformer(cfgs["splash"], nnx.Rngs(0)))[0]
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, TINY_MODEL["vocab_size"], (2, 24)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 1]], [10, 9, 5], axis=1), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(10), np.arange(9), np.arange(5)]))
    positions = jnp.broadcast_to(positions, (2, 24))

    def run(graphdef):
        forward = jax.jit(lambda params: nnx.merge(graphdef, params)(tokens, positions, segments))
        return np.asarray(forward(params))

    np.testing.assert_allclose(run(splash_graphdef), run(graphdef), atol=1e-5)


def tpu_topology(name: str, chip_config: str = "default"):
    """The devices of a TPU slice, for compiling on this CPU host (libtpu's compiler)."""
    pytest.importorskip("libtpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask on this host
    # libtpu takes a machine-wide lock file unless told otherwise; other processes (the other
    # test worker, a compile in another shell) may hold it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="tpu",
        topology_name=name,
        chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=(False, False, False),
    ).devices


def test_splash_train_step_compiles_for_tpu_v5e_4():
    """`auto` on TPU is splash; the tiny model's forward and backward (one layer), sharded over
    a v5e-4 (fsdp 2 x tensor 2), compiles with the forward, dq and dK/dV splash kernels as
    Mosaic custom calls."""
    from jaxalign.models.params import build_model

    devices = tpu_topology("v5e:2x2")
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices)
    rules = shd.resolve_rules(ShardingConfig())
    kernel = resolve_attention_kernel("auto", devices[0].platform)
    assert kernel == "splash"
    model = dict(TINY_MODEL, num_layers=1, attention_kernel=kernel)  # one layer compiles faster
    cfg = load_config(None, [], base={"model": model})
    graphdef, abstract, shardings = build_model(cfg, mesh, rules)

    def loss(params, tokens):
        with shd.activation_sharding(mesh, rules):
            hidden = nnx.merge(graphdef, params)(tokens)
            return jnp.mean(hidden.astype(jnp.float32) ** 2)

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = (
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        ),
        jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=batch),
    )
    lowered = jax.jit(jax.grad(loss)).lower(*args)
    text = lowered.as_text()
    assert "tpu_custom_call" in text
    for phase in ("fwd_segmented_residuals", "dq_segmented", "dkv_segmented"):
        assert f"splash_mha_{phase}" in text, phase
    compiled = lowered.compile()
    # One forward, one dq and one dK/dV kernel per layer, nothing falls back to XLA attention.
    assert compiled.as_text().count("tpu_custom_call") == 3
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_sampler_with_splash_prefill_equals_einsum():
    """Generation with attention_kernel=splash: the prefill runs splash on left-padded prompts
    (padding is segment 0), the decode steps run `attend_cache` over the KV cache it filled. On a
    2 x 2 mesh, with a sliding window: the einsum sampler's tokens and log-probs."""
    from jaxalign.config import SamplingConfig
    from jaxalign.generate import Sampler

    model = ModelConfig(**TINY_MODEL, sliding_window=6)
    params = nnx.split(Transformer(model, nnx.Rngs(0)))[1].to_pure_dict()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [3] * 12, [5, 4]]
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    rules = shd.resolve_rules(ShardingConfig())
    outs = {}
    for kernel in ("einsum", "splash"):
        cfg = ModelConfig(**TINY_MODEL, sliding_window=6, attention_kernel=kernel)
        sampler = Sampler(
            cfg, SamplingConfig(temperature=0.0, max_new_tokens=8), mesh=mesh, rules=rules
        )
        outs[kernel] = jax.device_get(sampler.generate(params, prompts))
    np.testing.assert_array_equal(outs["splash"].tokens, outs["einsum"].tokens)
    np.testing.assert_allclose(
        outs["splash"].model_logprobs, outs["einsum"].model_logprobs, atol=1e-5
    )
