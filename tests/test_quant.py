"""QLoRA base-weight quantization (jaxalign/models/quant.py): NF4 and int8 against float64 NumPy
references, the NF4 codebook's known error, packed storage, and sharded use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, ShardingConfig
from jaxalign.models import quant
from jaxalign.models.llama import dense

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's values, as printed there.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


# Jitted once per shape and setting: eager ops would compile each primitive separately.
quantize = jax.jit(quant.quantize, static_argnums=(1, 2, 3))
dequantize = jax.jit(quant.dequantize, static_argnums=(1, 2))


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_quantize(w: np.ndarray, kind: str, block: int):
    """float64: (codes per element, absmax per block) for blocks along the last axis."""
    blocks = w.astype(np.float64).reshape(*w.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1)
    u = blocks / np.where(absmax > 0, absmax, 1)[..., None]
    if kind == "int8":
        codes = np.clip(np.round(u * 127), -127, 127)
    else:
        table = np.asarray(PUBLISHED_NF4, np.float64)
        codes = np.abs(u[..., None] - table).argmin(-1)
    return codes.reshape(w.shape), absmax, u.reshape(w.shape)


def reference_dequantize(codes: np.ndarray, absmax: np.ndarray, kind: str) -> np.ndarray:
    """float64 weights from per-element codes and per-block absmax (blocks along the last axis)."""
    values = codes / 127.0 if kind == "int8" else np.asarray(PUBLISHED_NF4, np.float64)[codes]
    block = codes.shape[-1] // absmax.shape[-1]
    return (values.reshape(*absmax.shape, block) * absmax[..., None]).reshape(codes.shape)


def unpacked_codes(q) -> np.ndarray:
    codes = np.asarray(q["codes"])
    if quant.kind_of(q) == "int8":
        return codes.astype(np.int64)
    return np.stack([codes >> 4, codes & 15], -1).reshape(quant.weight_shape(q)).astype(np.int64)


def test_nf4_codebook_is_the_published_one():
    np.testing.assert_array_equal(quant.NF4_VALUES, np.asarray(PUBLISHED_NF4, np.float32))
    assert quant.NF4_VALUES[7] == 0 and len(set(quant.NF4_VALUES.tolist())) == 16


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_codes_and_dequantize_equal_float64_reference(kind):
    w = normal((48, 256))
    q = quantize(w, kind, 64, False)
    codes, absmax, u = reference_quantize(w, kind, 64)
    np.testing.assert_allclose(np.asarray(q["scales"]), absmax, rtol=1e-7)
    # float32 and float64 may round a value lying within 1e-6 of a midpoint differently.
    if kind == "nf4":
        mids = (quant.NF4_VALUES[1:] + quant.NF4_VALUES[:-1]).astype(np.float64) / 2
        clear = np.abs(u[..., None] - mids).min(-1) > 1e-6
    else:
        clear = np.abs(u * 127 - np.floor(u * 127) - 0.5) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(unpacked_codes(q)[clear], codes[clear])
    got = np.asarray(dequantize(q))
    want = reference_dequantize(unpacked_codes(q), absmax, kind)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_nf4_error_on_normal_weights_matches_the_codebook_spacing():
    """N(0, 1) weights: each error is at most half the gap around its value times the block's
    absmax; on average it is a quarter of that gap times absmax (values spread evenly within
    a gap), which the measured mean error must match."""
    w = normal((256, 1024), seed=1)
    q = quantize(w, "nf4", 64, False)
    error = np.abs(np.asarray(dequantize(q)) - w)
    _, absmax, u = reference_quantize(w, "nf4", 64)
    table = np.asarray(PUBLISHED_NF4, np.float64)
    cell = np.clip(np.searchsorted(table, u) - 1, 0, 14)  # the gap [table[i], table[i+1]] u is in
    gap = (table[cell + 1] - table[cell]) * np.repeat(absmax, 64, axis=-1)
    assert np.all(error <= gap / 2 + 1e-6)
    predicted = (gap / 4).mean()
    assert abs(error.mean() / predicted - 1) < 0.05
    # The largest gap is 1 - 0.7230 (or 0.6962 - 1 below zero): no error above 0.152 absmax.
    assert error.max() <= 0.152 * absmax.max()
    assert 0.05 < error.mean() < 0.09  # ~0.073: NF4's known error on N(0, 1), blocks of 64


def test_codebook_values_times_absmax_are_reproduced_exactly():
    rng = np.random.default_rng(2)
    index = rng.integers(0, 16, (16, 256))
    index[:, ::64] = 15  # every block holds a +1 value, so its absmax is its scale
    absmax = rng.uniform(0.01, 3.0, (16, 4)).astype(np.float32)
    w = quant.NF4_VALUES[index] * np.repeat(absmax, 64, axis=-1)
    q = quantize(w, "nf4", 64, False)
    np.testing.assert_array_equal(unpacked_codes(q), index)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), w)


def test_int8_error_is_within_half_a_step():
    w = normal((64, 512), seed=3)
    q = quantize(w, "int8", 64, False)
    error = np.abs(np.asarray(dequantize(q)) - w)
    step = np.repeat(np.asarray(q["scales"]), 64, axis=-1) / 127
    assert np.all(error <= step / 2 * (1 + 1e-5))
    assert abs(error.mean() / (step / 4).mean() - 1) < 0.05  # uniform within a step


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_double_quantized_scales_are_close(kind):
    w = normal((512, 1024), seed=4) * np.linspace(0.015, 0.025, 1024, dtype=np.float32)
    single = quantize(w, kind, 64, False)
    double = quantize(w, kind, 64, True)
    np.testing.assert_array_equal(np.asarray(double["codes"]), np.asarray(single["codes"]))
    absmax = np.asarray(single["scales"])
    got = np.asarray(jax.jit(quant.block_scales)(double))
    # Each of the 256-scale tiles rounds its mean-centred scales to 1/254 of their absmax.
    centred = absmax - absmax.mean()
    tile_max = np.repeat(np.abs(centred.reshape(-1, 256)).max(-1), 256).reshape(absmax.shape)
    assert np.all(np.abs(got - absmax) <= tile_max / 254 * (1 + 1e-4) + 1e-6)
    # Next to NF4's own error (7% of absmax per weight), well under 1% on a scale is noise.
    relative = np.abs(got / absmax - 1)
    assert relative.max() < 0.01 and relative.mean() < 0.002
    assert double["scales"].dtype == jnp.int8 and double["scale_scales"].shape == (
        32,
        1,
    )  # tiles of [16, 16]


def test_storage_is_half_a_byte_per_nf4_weight():
    w = jnp.asarray(normal((1024, 1024), seed=5))
    q = quantize(w, "nf4", 64, True)
    assert q["codes"].dtype == jnp.uint8 and q["codes"].size == w.size // 2
    per_param = quant.nbytes(q) / w.size
    # Nominal: 0.5 + 1/64 + 4/(64 * 256) (4.127 bits); stored: plus the one float32 offset.
    assert per_param - quant.bytes_per_param("nf4", 64, True) == 4 / w.size
    assert quant.bytes_per_param("nf4", 64, True) == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert quant.nbytes(q) / w.nbytes == pytest.approx(0.129, abs=1e-3)
    int8 = quantize(w, "int8", 64, False)
    assert quant.nbytes(int8) / w.size == quant.bytes_per_param("int8", 64, False) == 1.0625
    assert quant.bytes_per_param("none", dtype_bytes=2) == 2.0


def test_blocks_span_trailing_axes_when_the_last_is_short():
    """A [32, 4, 8] attention weight in blocks of 64: tiles of [2, 4, 8]; a stacked weight
    quantized layer by layer (vmap) equals the stack of its layers' quantizations."""
    w = normal((3, 32, 4, 8), seed=6)
    q = jax.jit(jax.vmap(lambda x: quant.quantize(x, "nf4", 64)))(w)
    assert {k: v.shape for k, v in q.items()} == {
        "codes": (3, 32, 4, 4),
        "scales": (3, 16, 1, 1),
        "scale_scales": (3, 1, 1, 1),
        "scale_offset": (3, 1, 1, 1),
    }
    for layer in range(3):
        one = quantize(w[layer], "nf4", 64, True)
        for name in q:
            np.testing.assert_array_equal(np.asarray(q[name][layer]), np.asarray(one[name]))
    got = np.asarray(dequantize(q, jnp.float32, w.shape))
    blocks = w.reshape(3, 16, 64)
    assert np.all(
        np.abs(got.reshape(3, 16, 64) - blocks) <= 0.16 * np.abs(blocks).max(-1)[..., None]
    )
    axes = quant.logical_axes(q, ("layers", "embed", "heads", "head_dim"))
    assert axes["codes"] == ("layers", "embed", "heads", "head_dim")
    assert axes["scales"] == ("layers", "embed", None, None)
    assert axes["scale_offset"] == ("layers", None, None, None)
    with pytest.raises(ValueError, match="blocks of 48"):
        quant.quantize(w[0], "nf4", 48)


@pytest.mark.parametrize("n_in", [1, 2])
def test_quant_dense_equals_dense_of_dequantized_and_keeps_no_weight(n_in, capsys):
    shape = (64, 128) if n_in == 1 else (4, 16, 128)  # an MLP weight; an output projection
    q = quantize(normal(shape, seed=7), "nf4", 64, True)
    x = jnp.asarray(normal((2, 5, *shape[:n_in]), seed=8))
    y = jax.jit(quant.quant_dense, static_argnums=2)(x, q, n_in)
    want = jax.jit(lambda x, q: dense(x, quant.dequantize(q), n_in))(x, q)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6, atol=1e-5)

    def loss(x, q):
        return (quant.quant_dense(x, q, n_in) ** 2).sum()

    grad = jax.jit(jax.grad(loss))(x, q)
    want = jax.jit(jax.grad(lambda x, q: (dense(x, quant.dequantize(q), n_in) ** 2).sum()))(x, q)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-4)
    # Between the passes only the inputs live: never the dequantized float32 weight.
    capsys.readouterr()
    print_saved_residuals(loss, x, q)
    saved = capsys.readouterr().out
    assert "f32[" + ",".join(map(str, shape)) + "]" not in saved and "q['codes']" in saved
    bf16 = jax.jit(quant.quant_dense, static_argnums=2)(x.astype(jnp.bfloat16), q, n_in)
    assert bf16.dtype == jnp.bfloat16


def test_sharded_quantize_and_matmul_equal_one_device():
    """fsdp=4 x tensor=2 on 8 devices: a [D, F] weight sharded ('embed', 'mlp') quantizes into
    codes and scales sharded the same way, and the matmul equals the one-device result."""
    mesh = shd.make_mesh(MeshConfig(fsdp=4, tensor=2))
    rules = shd.resolve_rules(ShardingConfig())
    w = normal((64, 512), seed=9)
    x = normal((8, 64), seed=10)
    want_q = quantize(w, "nf4", 64, True)
    want = np.asarray(jax.jit(quant.quant_dense)(x, want_q))

    abstract = jax.eval_shape(lambda w: quant.quantize(w, "nf4", 64), w)
    names = quant.logical_axes(abstract, ("embed", "mlp"))
    shardings = shd.logical_to_sharding(names, mesh, rules)
    shd.validate_shardings(abstract, shardings, mesh)
    w_sharded = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
    q = jax.jit(lambda w: quant.quantize(w, "nf4", 64), out_shardings=shardings)(w_sharded)
    assert q["codes"].sharding.spec == P("fsdp", "tensor")
    assert q["codes"].addressable_shards[0].data.shape == (16, 128)
    assert q["scales"].addressable_shards[0].data.shape == (16, 4)
    np.testing.assert_array_equal(np.asarray(q["codes"]), np.asarray(want_q["codes"]))
    # The scales' mean is summed in another order across devices: equal to the last bit or so.
    np.testing.assert_allclose(
        np.asarray(quant.block_scales(q)), np.asarray(quant.block_scales(want_q)), rtol=1e-6
    )
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("fsdp", None)))
    y = jax.jit(quant.quant_dense)(x_sharded, q)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
