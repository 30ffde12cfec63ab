"""Gemma 2 and Gemma 3 (text): import and export equal transformers with several local and global
layers and a window shorter than the sequence; soft-capping in every attention kernel against a
float64 reference; per-layer windows in the KV cache (greedy decoding equals the full forward),
packing, scan over layers with remat; the tiny config trains through SFT."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import hf, models  # noqa: E402
from jaxalign import sharding as shd  # noqa: E402
from jaxalign.config import MeshConfig, ModelConfig, SamplingConfig, load_config  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402
from jaxalign.generate import Sampler  # noqa: E402
from jaxalign.losses import target_logprobs  # noqa: E402
from jaxalign.metrics import param_count  # noqa: E402
from jaxalign.models import llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=5,  # shorter than the 12-token sequences
    query_pre_attn_scalar=12,
)
HF_CONFIGS = {
    # layers: local, global, local, global; both soft-caps small enough to bite.
    "gemma2": dict(num_hidden_layers=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # layers: local, local, global, local, local, global; separate local RoPE base, linear scaling.
    "gemma3_text": dict(
        num_hidden_layers=6,
        sliding_window_pattern=3,
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        attention_bias=True,
    ),
}
IDS = np.random.default_rng(0).integers(1, 127, (2, 12))
TOL = 1e-4


def one_device_mesh():
    return shd.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """model_type -> (directory, torch model): tiny random transformers models, saved."""
    out = {}
    for model_type, fields in HF_CONFIGS.items():
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(model_type, **TINY, **fields)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # every weight non-trivial, norms (1 + w) included
            for _, p in model.named_parameters():
                p.copy_(0.2 * torch.randn_like(p))
        directory = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(directory)
        out[model_type] = (directory, model)
    return out


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_import_and_export_logits_match_transformers(model_type, hf_models, tmp_path):
    directory, torch_model = hf_models[model_type]
    expected = torch_logits(torch_model, IDS)
    unrolled = hf.from_pretrained(directory, mesh=one_device_mesh())
    assert unrolled.cfg.family == {"gemma2": "gemma2", "gemma3_text": "gemma3"}[model_type]
    kinds = unrolled.cfg.layer_types
    assert "sliding_attention" in kinds and kinds.count("full_attention") >= 2
    assert np.abs(np.asarray(unrolled(IDS)) - expected).max() <= TOL
    # Scanned layers: the per-layer windows and RoPE frequencies are scanned arrays.
    scanned = hf.from_pretrained(
        directory, mesh=one_device_mesh(), base=ModelConfig(scan_layers=True)
    )
    logits = np.asarray(scanned(IDS))
    assert np.abs(logits - expected).max() <= TOL

    out = hf.save_pretrained(scanned, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(torch_model)
    assert reloaded.config.layer_types == torch_model.config.layer_types
    assert np.abs(torch_logits(reloaded, IDS) - logits).max() <= TOL


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_param_count_equals_the_transformers_models(model_type, hf_models):
    """Two post-norms per layer beyond a Llama block (and Gemma 3's attention biases here)."""
    directory, torch_model = hf_models[model_type]
    cfg = hf.model_config_from_hf(directory)
    want = sum(p.numel() for p in torch_model.parameters())
    assert param_count(cfg) == {"total": want, "non_embedding": want}  # tied: the head counts


def _np_attention(q, k, v, q_seg, k_seg, q_idx, k_idx, window, soft_cap, scale):
    """float64 reference: [B, T, H, hd] x [B, S, KV, hd] grouped-query attention."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    if soft_cap is not None:
        s = soft_cap * np.tanh(s / soft_cap)
    mask = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        mask &= k_idx[None, :] > q_idx[:, None] - window
    mask = mask[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_every_attention_kernel_soft_caps_scales_and_windows_like_float64_reference():
    """einsum (one block), query-blocked (static window: key blocks outside it skipped), a traced
    per-layer window, the decode kernel over a cache, and cuDNN's call (XLA implementation on CPU;
    no soft-cap there) all equal the float64 reference."""
    rng = np.random.default_rng(0)
    b, t, h, kv, hd = 2, 12, 4, 2, 8
    q = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, hd)).astype(np.float32)
    v = rng.standard_normal((b, t, kv, hd)).astype(np.float32)
    seg = np.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], np.int32)
    idx = np.arange(t)
    window, soft_cap, scale = 5, 1.5, 0.4
    ref = _np_attention(q, k, v, seg, seg, idx, idx, window, soft_cap, scale)
    ref_nocap = _np_attention(q, k, v, seg, seg, idx, idx, window, None, scale)
    valid = (seg > 0)[:, :, None, None]  # padding rows attend to padding: compare real tokens

    def close(out, want):
        np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, want, 0), atol=2e-5)

    one = llama.attend(q, k, v, seg, seg, idx, idx, window, soft_cap, scale)
    close(one, ref)
    close(llama.blocked_causal_attention(q, k, v, seg, 4, window, soft_cap, scale), ref)
    traced = jax.jit(lambda w: llama.blocked_causal_attention(q, k, v, seg, 4, w, soft_cap, scale))(
        jnp.int32(window)
    )
    close(traced, ref)
    ref_full = _np_attention(q, k, v, seg, seg, idx, idx, None, soft_cap, scale)
    no_window = jax.jit(
        lambda w: llama.blocked_causal_attention(q, k, v, seg, 4, w, soft_cap, scale)
    )(jnp.int32(llama.NO_WINDOW))
    close(no_window, ref_full)

    # Decode kernel: a cache of S = t + 3 slots (the last ones empty), queries at slots [4, 12).
    s = t + 3
    k_cache = np.zeros((b, kv, hd, s), np.float32)
    v_cache = np.zeros((b, kv, s, hd), np.float32)
    k_cache[..., :t] = k.transpose(0, 2, 3, 1)
    v_cache[:, :, :t] = v.transpose(0, 2, 1, 3)
    kv_seg = np.concatenate([seg, np.zeros((b, 3), np.int32)], axis=1)
    for w in (window, jnp.int32(window)):
        out = llama.attend_cache(
            q[:, 4:], k_cache, v_cache, seg[:, 4:], kv_seg, idx[4:], w, soft_cap, scale
        )
        np.testing.assert_allclose(
            np.where(valid[:, 4:], out, 0), np.where(valid[:, 4:], ref[:, 4:], 0), atol=2e-5
        )

    # Splash (Pallas interpret mode on CPU): the score scale enters through the queries, the
    # soft-cap is the kernel's, and a traced per-layer window picks a static-window branch.
    cfg = ModelConfig(
        num_layers=2,
        attention_kernel="splash",
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcap=soft_cap,
        query_pre_attn_scalar=scale**-2,
    )
    splash = jax.jit(lambda w: llama.causal_attention(q, k, v, seg, cfg, w))
    close(splash(jnp.int32(window)), ref)
    close(splash(jnp.int32(llama.NO_WINDOW)), ref_full)

    # cuDNN's call: a static window goes to local_window_size, a traced one into the mask.
    close(llama.cudnn_causal_attention(q, k, v, seg, window, "xla", scale=scale), ref_nocap)
    traced = jax.jit(lambda w: llama.cudnn_causal_attention(q, k, v, seg, w, "xla", scale=scale))
    close(traced(jnp.int32(window)), ref_nocap)


def test_final_logit_soft_cap_in_the_losses_matches_float64_reference():
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((3, 5, 8)).astype(np.float32)
    w_out = rng.standard_normal((8, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 5))
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), w_out)
    capped = 2.0 * np.tanh(logits / 2.0)
    lse = np.log(np.exp(capped).sum(-1))
    want = np.take_along_axis(capped, targets[..., None], -1)[..., 0] - lse
    for chunks in (1, 4):
        logps, _ = target_logprobs(hidden, w_out, targets, chunks=chunks, soft_cap=2.0)
        np.testing.assert_allclose(logps, want, atol=1e-5)


@pytest.fixture(scope="module")
def imported(hf_models):
    """model_type -> (ModelConfig, params) of the transformers models, scanned for gemma3."""
    out = {}
    for model_type, scan in (("gemma2", False), ("gemma3_text", True)):
        base = ModelConfig(scan_layers=scan)
        m = hf.from_pretrained(hf_models[model_type][0], mesh=one_device_mesh(), base=base)
        out[model_type] = (m.cfg, m.params)
    return out


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_greedy_decoding_with_windowed_layers_equals_full_forward_argmax(model_type, imported):
    """Prompts plus new tokens run well past the 5-token window, so the local layers' cache
    masking is exercised (gemma2 unrolled, gemma3 with scanned layers)."""
    cfg, params = imported[model_type]
    n = 8
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, cfg.vocab_size, size=m).astype(np.int32) for m in (3, 9, 6)]
    out = jax.device_get(
        Sampler(cfg, SamplingConfig(temperature=0.0, max_new_tokens=n)).generate(params, prompts)
    )
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))
    width = 9 + n

    @jax.jit
    def logits(params, tokens, segment_ids):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
        return model.logits(model(tokens, positions, segment_ids))

    seqs = [list(p) for p in prompts]
    for _ in range(n):
        tokens = np.zeros((len(seqs), width), np.int32)
        segment_ids = np.zeros_like(tokens)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)], segment_ids[r, : len(s)] = s, 1
        full = np.asarray(logits(params, tokens, segment_ids))
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(full[r, len(s) - 1])))
    expected = [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]
    assert [out.tokens[r, : out.lengths[r]].tolist() for r in range(3)] == expected


def test_packed_rows_equal_separate_sequences(imported):
    """Two sequences packed in one row with segment ids and restarted positions give the same
    logits as each alone (query-blocked kernel with blocks of 4, window 5, soft-caps on)."""
    cfg, params = imported["gemma2"]
    cfg = dataclasses.replace(cfg, attention_query_block=4)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))

    @jax.jit
    def logits(params, tokens, positions, segment_ids):
        model = nnx.merge(graphdef, params)
        return model.logits(model(tokens, positions, segment_ids))

    a, b = IDS[0, :7], IDS[1, :9]
    packed = np.concatenate([a, b, [0, 0]])[None]
    positions = np.concatenate([np.arange(7), np.arange(9), [0, 0]])[None]
    segment_ids = np.array([[1] * 7 + [2] * 9 + [0, 0]])
    got = np.asarray(logits(params, packed, positions, segment_ids))[0]
    for seq, lo in ((a, 0), (b, 7)):
        n = len(seq)
        alone = np.asarray(
            logits(
                params,
                np.pad(seq, (0, 18 - n))[None],
                np.arange(18)[None],
                (np.arange(18) < n).astype(np.int32)[None],
            )
        )[0, :n]
        np.testing.assert_allclose(got[lo : lo + n], alone, atol=2e-5)


def test_scanned_layers_with_remat_give_the_unrolled_gradients(imported):
    """Per-layer windows and RoPE bases as scanned arrays under jax.checkpoint: same loss and
    gradients as the unrolled model (static per-layer values)."""
    cfg, scanned_params = imported["gemma3_text"]
    unrolled_params = llama.unstack_layers(scanned_params, cfg.num_layers)

    def loss_and_grads(cfg, params):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))

        def loss(params):
            model = nnx.merge(graphdef, params)
            hidden = model(jnp.asarray(IDS))
            return -target_logprobs(hidden[:, :-1], model.output_weight(), IDS[:, 1:])[0].mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    remat = dataclasses.replace(cfg, remat="full")
    loss_s, grads_s = loss_and_grads(remat, scanned_params)
    loss_u, grads_u = loss_and_grads(dataclasses.replace(remat, scan_layers=False), unrolled_params)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    grads_s = llama.unstack_layers(grads_s, cfg.num_layers)
    for gs, gu in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_u), strict=True):
        np.testing.assert_allclose(gs, gu, atol=1e-6)


@pytest.mark.parametrize(
    "sets,named",
    [
        (["model.attention_kernel=cudnn", "model.dtype=bfloat16"], "cannot soft-cap"),
        (["model.layer_types=[full_attention]"], "model.layer_types has 1 entries"),
        (["model.sliding_window=0"], "model.sliding_window must be positive"),
    ],
)
def test_bad_gemma_settings_are_one_line_config_errors(sets, named):
    base = {"model": {"family": "gemma2", "num_layers": 2, "attn_logit_softcap": 50.0}}
    with pytest.raises(ConfigError) as e:
        load_config(None, sets, base=base)
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(layer_types=["sliding_attention"]), "layer_types"),
        (dict(altup_num_inputs=4), "altup_num_inputs"),
    ],
)
def test_unsupported_gemma_config_is_an_error_naming_the_field(fields, named):
    raw = {"model_type": "gemma2", "num_hidden_layers": 2, **TINY, **fields}
    with pytest.raises(ConfigError, match=named):
        hf.model_config_from_hf(raw)


@pytest.mark.slow
def test_tiny_gemma3_config_trains_through_sft(tmp_path):
    from jaxalign.trainers import train

    sets = [
        f"run_dir={tmp_path / 'run'}",
        f"data.train_file={REPO / 'data/tiny/sft_train.jsonl'}",
        f"data.tokenizer={REPO / 'data/tiny/tokenizer.model'}",
        f"sharding.rules_file={REPO / 'configs/sharding/fsdp.yaml'}",
        "data.eval_file=null",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "model.head_dim=16",
        "model.sliding_window=16",
        "model.scan_layers=true",
        "train.steps=8",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.progress=false",
        "checkpoint.every=0",
        "logging.tensorboard=false",
    ]
    cfg = load_config(str(REPO / "configs/gemma3_tiny.yaml"), sets)
    assert cfg.model.family == "gemma3" and "full_attention" in cfg.model.layer_types
    result = train(cfg, devices=jax.devices()[:1])
    history = [h["loss"] for h in result.history]
    assert all(np.isfinite(history)) and history[-1] < history[0] - 0.5
