"""QLoRA in the model (the frozen base stored quantized, dequantized in each matmul) and LoRA runs
through the CLI: `jaxalign export` writes a PEFT adapter that `peft` loads with our logits, or
with --merge-lora the merged model that transformers loads; `model.lora.from_peft` imports an
adapter back."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.models import quant
from jaxalign.models.lora import base_params, quantize_params
from jaxalign.models.lora_config import LoraConfig
from jaxalign.models.params import logical_axes
from jaxalign.models.registry import build
from jaxalign.optim import param_path
from tests.toy import TINY_MODEL, losses, run_toy, toy_config

# Blocks of 32 divide every tiny projection's last axis (64, 32, 8 x 4 heads).
QLORA = {
    "model.lora.quantize": "nf4",
    "model.lora.quant_block": 32,
    "train.lr": 1e-2,
    "train.lr_schedule": "constant",
    "train.warmup_steps": 0,
}


def _dequantized_base(plain: dict) -> dict:
    """`plain` (a QLoRA model's params) with each quantized weight replaced by what it holds."""
    if isinstance(plain, dict) and "codes" in plain:
        return quant.dequantize(plain)
    if isinstance(plain, dict):
        return {k: _dequantized_base(v) for k, v in plain.items()}
    return plain


def test_a_block_size_that_does_not_tile_a_weight_is_one_config_error():
    from jaxalign.errors import ConfigError

    cfg = ModelConfig(**TINY_MODEL, scan_layers=True)
    with pytest.raises(ConfigError, match=r"^model.lora.quant_block: 48 does not tile blocks"):
        lora = LoraConfig(quantize="int8", quant_block=48)
        build(dataclasses.replace(cfg, lora=lora), nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens):
    """The model's logits, compiled (one XLA program instead of an eager op-by-op forward)."""
    return model.logits(model(tokens))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_logits_at_init_equal_the_dequantized_base_model(kind):
    cfg = ModelConfig(**TINY_MODEL, scan_layers=True)
    lora = LoraConfig(quantize=kind, quant_block=32)
    qmodel = build(dataclasses.replace(cfg, lora=lora), nnx.Rngs(0))
    graphdef, state = nnx.split(qmodel)
    params = state.to_pure_dict()
    wq = params["blocks"]["attn"]["wq"]
    assert set(wq) >= {"codes", "scales"} and wq["codes"].shape[0] == 2  # per layer, stacked
    # The quantized arrays carry the base weight's logical axes (so its sharding rules).
    axes = logical_axes(state).to_pure_dict()["blocks"]["attn"]["wq"]
    assert axes["codes"] == ("layers", "embed", "heads", "head_dim")
    # The plain model with each target weight replaced by its dequantization, adapters dropped.
    plain = build(cfg, nnx.Rngs(0))
    pg, pstate = nnx.split(plain)
    want_params = _dequantized_base(base_params(params))
    for key in ("embed", "final_norm"):
        np.testing.assert_array_equal(want_params[key], pstate.to_pure_dict()[key])
    reference = nnx.merge(pg, want_params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    got = _logits(qmodel, tokens)
    np.testing.assert_allclose(got, _logits(reference, tokens), rtol=1e-5, atol=1e-5)
    # ... and NF4/int8 is a close but not exact copy of the full-precision model.
    full = _logits(plain, tokens)
    assert 0 < float(jnp.abs(got - full).max()) < (0.2 if kind == "nf4" else 0.02)


def test_qlora_sft_trains_adapters_only_and_its_base_is_derived_deterministically(tmp_path):
    cfg = toy_config(tmp_path, **QLORA, **{"train.steps": 5, "checkpoint.every": 5})
    trainer, result = run_toy(cfg)  # fsdp over 8 devices: the quantized leaves shard too
    loss = losses(result)
    assert loss[-1] < loss[0] - 0.03, loss
    params = result.state["params"]
    assert params["blocks"][0]["attn"]["wq"]["codes"].dtype == jnp.uint8
    # No optimizer state for the quantized base (and it did not move: below).
    moments = [
        param_path(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(result.state["opt_state"])
        if "codes" in param_path(p) or "scales" in param_path(p)
    ]
    assert moments == []
    # The checkpoint holds the adapters only: a QLoRA base is re-derived from its source.
    from jaxalign.checkpoint import load_params
    from jaxalign.optim import trained_part

    stored = load_params(tmp_path / "run", trained_part(trainer.abstract_params, trainer.labels))
    assert all(p.endswith(("_lora_a", "_lora_b")) for p in _leaf_paths(stored))
    # Quantizing a loaded full-precision base (what a from_hf / init_from run does) equals the
    # quantization the seeded build does, and is deterministic.
    plain_cfg = dataclasses.replace(
        cfg.model, lora=dataclasses.replace(cfg.model.lora, quantize="none")
    )
    plain_state = nnx.split(build(plain_cfg, nnx.Rngs(params=jax.random.PRNGKey(0))))[1]
    names_tree = logical_axes(plain_state).to_pure_dict()
    plain = base_params(plain_state.to_pure_dict())
    shardings = base_params(trainer.param_shardings)
    # quantize_params consumes (deletes) the full-precision weights it quantizes: copies here.
    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    plain_shardings = jax.tree.map(lambda _: replicated, plain)
    once, twice = (
        quantize_params(jax.tree.map(jnp.copy, plain), names_tree, cfg.model.lora, shardings, ps)
        for ps in (plain_shardings, plain_shardings)
    )
    seeded = base_params(
        nnx.split(build(cfg.model, nnx.Rngs(params=jax.random.PRNGKey(0))))[1].to_pure_dict()
    )
    jax.tree.map(np.testing.assert_array_equal, once, twice)
    # The eager build and the sharded jit reduce the scales' mean in another order (1 ulp).
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=0)
    jax.tree.map(close, once, seeded)
    jax.tree.map(close, base_params(params), seeded)  # the base did not move in training


def _leaf_paths(tree) -> list[str]:
    return [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_plan_counts_the_quantized_base_and_no_base_gradients(tmp_path):
    from jaxalign.plan import make_plan

    full = make_plan(toy_config(tmp_path), 1)
    lora = make_plan(toy_config(tmp_path, **{"model.lora.rank": 4}), 1)
    qlora = make_plan(toy_config(tmp_path, **{"model.lora.rank": 4, **QLORA}), 1)
    assert qlora.num_params == lora.num_params  # the same weights, stored in fewer bytes
    assert qlora.parts["optimizer"] == lora.parts["optimizer"] < full.parts["optimizer"] / 4
    assert qlora.parts["gradients"] == lora.parts["gradients"]
    # Hand count: the 7 projections of 2 layers quantized (NF4, blocks of 32, double quant),
    # the embedding (64 x 32), norms and adapters as they were.
    m = TINY_MODEL
    d, f, h, kv = m["hidden_size"], m["intermediate_size"], m["num_heads"], m["num_kv_heads"]
    hd = d // h
    proj = m["num_layers"] * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    saved = proj * 4 - m["num_layers"] * sum(
        quant.nbytes(jax.eval_shape(lambda w: quant.quantize(w, "nf4", 32, True), w))
        for w in _projection_shapes(m)
    )
    assert lora.parts["params"] - qlora.parts["params"] == saved


def _projection_shapes(m) -> list[jax.ShapeDtypeStruct]:
    """One layer's projection weights (the toy config builds unscanned layers)."""
    d, f, h, kv = m["hidden_size"], m["intermediate_size"], m["num_heads"], m["num_kv_heads"]
    hd = d // h
    shapes = [(d, h, hd), (d, kv, hd), (d, kv, hd), (h, hd, d), (d, f), (d, f), (f, d)]
    return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


# -- export and import through the CLI ---------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_TINY = dict(
    vocab_size=TINY_MODEL["vocab_size"],
    hidden_size=TINY_MODEL["hidden_size"],
    intermediate_size=TINY_MODEL["intermediate_size"],
    num_hidden_layers=TINY_MODEL["num_layers"],
    num_attention_heads=TINY_MODEL["num_heads"],
    num_key_value_heads=TINY_MODEL["num_kv_heads"],
)
IDS = np.random.default_rng(0).integers(1, 63, (2, 10))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny random transformers Llama saved to disk, and a LoRA SFT run from it whose adapters
    moved (B non-zero) after a few steps."""
    root = tmp_path_factory.mktemp("lora_export")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(root / "base")
    cfg = toy_config(
        root,
        **{
            "model.from_hf": str(root / "base"),
            "model.lora.rank": 4,
            "model.lora.alpha": 8.0,
            "train.steps": 4,
            "train.lr": 2e-2,
            "mesh.fsdp": 1,
            "checkpoint.every": 4,
            "checkpoint.async_save": False,
        },
    )
    _, result = run_toy(cfg, devices=jax.devices()[:1])
    params = result.state["params"]
    b = np.asarray(params["blocks"][0]["attn"]["wq_lora_b"])
    assert np.abs(b).max() > 1e-3  # the adapters trained
    return root, cfg, params, model


def _our_logits(cfg, params) -> np.ndarray:
    graphdef = nnx.split(nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(0))))[0]
    model = nnx.merge(graphdef, jax.device_get(params))
    return np.asarray(_logits(model, jnp.asarray(IDS, jnp.int32)))


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_export_writes_a_peft_adapter_peft_loads_with_our_logits(lora_run, tmp_path):
    from jaxalign.cli import main

    root, cfg, params, base = lora_run
    out = tmp_path / "adapter"
    assert main(["export", "--checkpoint", str(root / "run"), "--output", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(root / "base")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(fresh, out).eval()
    want = _our_logits(cfg, params)
    assert np.abs(want - _torch_logits(base)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(_torch_logits(peft_model), want, atol=1e-4, rtol=0)

    # --merge-lora: the merged full model loads in transformers with the same logits.
    merged = tmp_path / "merged"
    args = ["export", "--checkpoint", str(root / "run"), "--output", str(merged), "--merge-lora"]
    assert main(args) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    np.testing.assert_allclose(_torch_logits(hf_model), want, atol=1e-4, rtol=0)

    # Imported back (model.lora.from_peft): a fresh run starts from exactly these adapters.
    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm

    again = toy_config(
        tmp_path,
        **{
            "model.from_hf": str(root / "base"),
            "model.lora.rank": 4,
            "model.lora.alpha": 8.0,
            "model.lora.from_peft": str(out),
            "mesh.fsdp": 1,
        },
    )
    start = Trainer(again, ToyAlgorithm(again), devices=jax.devices()[:1]).initial_params()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
        jax.device_get(start),
        jax.device_get(params),
    )
    np.testing.assert_allclose(_our_logits(again, start), want, atol=1e-5, rtol=0)

    # The same adapter on a QLoRA base loaded from the HF directory (host, then quantized one
    # weight at a time onto 2 devices): the adapters as exported, the base its quantization.
    qlora = dataclasses.replace(
        again,
        mesh=dataclasses.replace(again.mesh, fsdp=2),
        model=dataclasses.replace(
            again.model,
            lora=dataclasses.replace(again.model.lora, quantize="int8", quant_block=32),
        ),
    )
    qstart = Trainer(qlora, ToyAlgorithm(qlora), devices=jax.devices()[:2]).initial_params()
    qstart = jax.device_get(qstart)
    np.testing.assert_allclose(
        qstart["blocks"][0]["attn"]["wq_lora_b"], params["blocks"][0]["attn"]["wq_lora_b"]
    )
    w = quant.dequantize(qstart["blocks"][0]["mlp"]["w_up"])
    assert 0 < np.abs(w - np.asarray(params["blocks"][0]["mlp"]["w_up"])).max() < 0.01


def test_from_peft_with_another_rank_is_one_config_error(lora_run, tmp_path):
    from jaxalign.cli import main
    from jaxalign.errors import ConfigError
    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm

    root, *_ = lora_run
    out = tmp_path / "adapter"
    main(["export", "--checkpoint", str(root / "run"), "--output", str(out)])
    cfg = toy_config(
        tmp_path,
        **{
            "model.from_hf": str(root / "base"),
            "model.lora.rank": 8,
            "model.lora.from_peft": str(out),
            "mesh.fsdp": 1,
        },
    )
    with pytest.raises(ConfigError, match=r"model.lora.from_peft: .* has shape \(.*4\)"):
        Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:1]).initial_params()
