"""PEFT-format LoRA adapters (jaxalign/hf/peft.py): `peft` loads what we write with the logits of
our merged model, its merge equals ours, and our reader inverts our writer exactly."""

import json
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxalign import hf  # noqa: E402
from jaxalign import sharding as shd  # noqa: E402
from jaxalign.config import MeshConfig  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402
from jaxalign.hf.peft import merge_lora, read_peft_adapter, write_peft_adapter  # noqa: E402
from jaxalign.models.lora_config import LoraConfig  # noqa: E402

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IDS = np.random.default_rng(0).integers(1, 95, (2, 10))
# (module, weight) -> how many leading dims contract (wo [H, hd, D] contracts two).
N_IN = {"wo": 2}
ALL = r"(.*/)?(attn/(wq|wk|wv|wo)|mlp/(w_gate|w_up|w_down))"
ALL_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random transformers Llama saved to disk, and our import of it (one device)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(directory)
    mesh = shd.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    ours = hf.from_pretrained(directory, mesh=mesh)
    return directory, ours


def with_adapters(params: dict, targets: list[str], rank: int, seed: int) -> dict:
    """`params` (unrolled layers) plus random non-zero A and B on `targets` ('0/attn/wq')."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, params)
    for target in targets:
        if "/" in target:  # a block's weight, 'LAYER/MODULE/NAME'
            layer, module, name = target.split("/")
            parent = params["blocks"][int(layer)][module]
        else:  # 'embed' (looked up: A [V, r], B [r, D]) or 'lm_head'
            parent, name = params, target
        w = parent[name]
        n_in = N_IN.get(name, 1)
        parent[name + "_lora_a"] = 0.3 * rng.standard_normal((*w.shape[:n_in], rank))
        parent[name + "_lora_b"] = 0.3 * rng.standard_normal((rank, *w.shape[n_in:]))
        parent[name + "_lora_a"] = parent[name + "_lora_a"].astype(np.float32)
        parent[name + "_lora_b"] = parent[name + "_lora_b"].astype(np.float32)
    return params


def every_projection(num_layers=2):
    names = [("attn", n) for n in ("wq", "wk", "wv", "wo")]
    names += [("mlp", n) for n in ("w_gate", "w_up", "w_down")]
    return [f"{i}/{m}/{n}" for i in range(num_layers) for m, n in names]


def get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def forward_with(model, params) -> np.ndarray:
    """`model(IDS)` with `params` in place of its own: the same compiled program."""
    own = model.params
    model.params = jax.tree.map(lambda p, o: jax.device_put(np.asarray(p), o.sharding), params, own)
    try:
        return np.asarray(model(IDS))
    finally:
        model.params = own


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


CASES = {
    "all_projections_embed_head": (
        [*every_projection(), "embed", "lm_head"],
        LoraConfig(rank=4, alpha=8.0, targets=ALL),
    ),
    "rslora_subset": (
        ["0/attn/wq", "1/attn/wv", "1/attn/wo", "0/mlp/w_down"],
        LoraConfig(rank=3, alpha=5.0, rslora=True, dropout=0.1),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_our_adapter_with_the_logits_of_our_merged_model(case, base, tmp_path):
    directory, ours = base
    targets, lora_cfg = CASES[case]
    params = with_adapters(ours.params, targets, lora_cfg.rank, seed=len(case))
    out = write_peft_adapter(tmp_path / "adapter", params, ours.cfg, lora_cfg)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["use_rslora"]) == (
        "LORA",
        lora_cfg.rank,
        lora_cfg.rslora,
    )

    assert isinstance(config["target_modules"], list if "all" in case else str)
    merged = jax.jit(lambda tree: merge_lora(tree, lora_cfg))(params)
    assert jax.tree.structure(merged) == jax.tree.structure(jax.tree.map(np.asarray, ours.params))
    logits = forward_with(ours, merged)

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    adapted = peft.PeftModel.from_pretrained(hf_base, out).eval()
    theirs = hf_logits(adapted, IDS)
    base_logits = np.asarray(ours(IDS))
    assert np.abs(theirs - base_logits).max() > 0.1  # the adapters change the model
    assert np.abs(theirs - logits).max() <= 1e-4, np.abs(theirs - logits).max()
    print(f"{case}: max |peft - ours merged| = {np.abs(theirs - logits).max():.2e}")

    # peft's own merge gives our merged weights.
    state = adapted.merge_and_unload().state_dict()
    maps = hf.tensor_maps(ours.cfg)
    for m in maps:
        np.testing.assert_allclose(
            state[m.hf_name].numpy(), m.to_hf(get(merged, m.path)), rtol=1e-5, atol=1e-6
        )

    # Our reader inverts our writer exactly, and the config round-trips.
    adapters, read_cfg = read_peft_adapter(out, ours.cfg)
    expected = {}
    for target in targets:
        if "/" not in target:
            for suffix in ("_lora_a", "_lora_b"):
                np.testing.assert_array_equal(adapters[target + suffix], params[target + suffix])
            expected[target] = True
            continue
        layer, module, name = target.split("/")
        for suffix in ("_lora_a", "_lora_b"):
            got = adapters["blocks"][int(layer)][module][name + suffix]
            np.testing.assert_array_equal(got, params["blocks"][int(layer)][module][name + suffix])
            expected[f"blocks/{layer}/{module}/{name}"] = True
    in_blocks = sum(len(m) for b in adapters["blocks"].values() for m in b.values())
    assert in_blocks + len(adapters) - 1 == 2 * len(targets)
    assert (read_cfg.rank, read_cfg.alpha, read_cfg.rslora, read_cfg.dropout) == (
        lora_cfg.rank,
        lora_cfg.alpha,
        lora_cfg.rslora,
        lora_cfg.dropout,
    )
    paths = [f"blocks/{i}/{m}/{n}" for i in range(2) for m in ("attn", "mlp") for n in ALL_NAMES]
    paths += ["embed", "lm_head"]
    assert {p for p in paths if re.fullmatch(read_cfg.targets, p)} == set(expected)


def test_scanned_layers_write_the_same_adapter_and_read_back_stacked(base, tmp_path):
    import dataclasses

    _, ours = base
    lora_cfg = CASES["all_projections_embed_head"][1]
    params = with_adapters(ours.params, every_projection(), lora_cfg.rank, seed=5)
    write_peft_adapter(tmp_path / "unrolled", params, ours.cfg, lora_cfg)
    scan_cfg = dataclasses.replace(ours.cfg, scan_layers=True)
    layers = [params["blocks"][i] for i in range(2)]  # models.llama.stack_layers, in NumPy
    stacked = {**params, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    write_peft_adapter(tmp_path / "stacked", stacked, scan_cfg, lora_cfg)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "stacked" / name).read_bytes() == (
            tmp_path / "unrolled" / name
        ).read_bytes()
    adapters, read_cfg = read_peft_adapter(tmp_path / "stacked", scan_cfg)
    for module, names in (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("w_gate", "w_up"))):
        for name in names:
            for suffix in ("_lora_a", "_lora_b"):
                got = adapters["blocks"][module][name + suffix]
                np.testing.assert_array_equal(
                    got, np.asarray(stacked["blocks"][module][name + suffix])
                )
    assert re.fullmatch(read_cfg.targets, "blocks/attn/wq")


def test_an_adapter_that_does_not_fit_is_a_one_line_error(base, tmp_path):
    import dataclasses

    from safetensors.numpy import load_file, save_file

    _, ours = base
    lora_cfg = LoraConfig(rank=2, alpha=4.0)
    params = with_adapters(ours.params, ["0/attn/wq", "1/mlp/w_up"], 2, seed=6)
    out = write_peft_adapter(tmp_path / "adapter", params, ours.cfg, lora_cfg)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")

    def broken(name, config_changes=None, drop=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        save_file({k: v for k, v in tensors.items() if k != drop}, d / "adapter_model.safetensors")
        return d

    with pytest.raises(ConfigError, match=r"adapter_config.json: 'peft_type' is 'IA3'"):
        read_peft_adapter(broken("ia3", {"peft_type": "IA3"}), ours.cfg)
    with pytest.raises(ConfigError, match=r"adapter_config.json: 'use_dora'"):
        read_peft_adapter(broken("dora", {"use_dora": True}), ours.cfg)
    key_b = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    with pytest.raises(
        ConfigError, match=rf"adapter_model.safetensors: tensor '{key_b}' is missing"
    ):
        read_peft_adapter(broken("missing", drop=key_b), ours.cfg)
    wider = dataclasses.replace(ours.cfg, intermediate_size=64)
    with pytest.raises(ConfigError, match=rf"tensor '{key_b}' has shape \(48, 2\), expected"):
        read_peft_adapter(out, wider)
    with pytest.raises(ConfigError, match="some layers only"):
        read_peft_adapter(out, dataclasses.replace(ours.cfg, scan_layers=True))


def test_reward_model_adapter_loads_as_peft_sequence_classifier(tmp_path):
    """An RM's adapters plus its trained score head: task_type SEQ_CLS with `score` in
    modules_to_save; peft's scores equal our merged reward model's."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(**TINY, num_labels=1, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "rm")
    mesh = shd.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    ours = hf.from_pretrained(tmp_path / "rm", mesh=mesh)
    lora_cfg = LoraConfig(rank=2, alpha=4.0)
    params = jax.tree.map(np.asarray, ours.params)
    params["backbone"] = with_adapters(params["backbone"], ["0/attn/wq", "1/mlp/w_down"], 2, 7)
    params["score"] = params["score"] + 0.5  # the score head trained too
    out = write_peft_adapter(tmp_path / "adapter", params, ours.cfg, lora_cfg)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])

    rewards = forward_with(ours, jax.jit(lambda tree: merge_lora(tree, lora_cfg))(params))
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_base.eval(), out).eval(), IDS)[:, 0]
    assert np.abs(theirs - rewards).max() <= 1e-4
    assert np.abs(rewards - np.asarray(ours(IDS))).max() > 0.1

    adapters, read_cfg = read_peft_adapter(out, ours.cfg)
    np.testing.assert_array_equal(adapters["score"], params["score"])
    np.testing.assert_array_equal(
        adapters["backbone"]["blocks"][1]["mlp"]["w_down_lora_b"],
        params["backbone"]["blocks"][1]["mlp"]["w_down_lora_b"],
    )
    assert read_cfg.targets == "blocks/0/attn/wq|blocks/1/mlp/w_down"


def test_merge_equals_float64_reference_stacked_and_quantized():
    """W + scale * A @ B per layer against float64 NumPy, for a stacked [L, H, hd, D] output
    projection (two input dims) and for an NF4-quantized base (merged from its dequantized
    weight, in float32)."""
    from jaxalign.models import quant

    rng = np.random.default_rng(8)
    w = rng.standard_normal((3, 4, 8, 64)).astype(np.float32)
    a = rng.standard_normal((3, 4, 8, 5)).astype(np.float32)
    b = rng.standard_normal((3, 5, 64)).astype(np.float32)
    lora_cfg = LoraConfig(rank=5, alpha=7.0, rslora=True)
    scale = 7.0 / np.sqrt(5)
    delta = scale * np.einsum("lir,lro->lio", a.reshape(3, 32, 5).astype(np.float64), b)
    want = w + delta.reshape(w.shape)
    merged = merge_lora({"attn": {"wo": w, "wo_lora_a": a, "wo_lora_b": b}}, lora_cfg)
    assert set(merged["attn"]) == {"wo"}
    np.testing.assert_allclose(np.asarray(merged["attn"]["wo"]), want, rtol=2e-6, atol=2e-6)

    q = jax.jit(jax.vmap(lambda x: quant.quantize(x, "nf4", 64)))(w)
    merge = jax.jit(lambda tree: merge_lora(tree, lora_cfg))  # one program, not op by op
    merged = merge({"wo": q, "wo_lora_a": a, "wo_lora_b": b})["wo"]
    base = np.asarray(jax.jit(quant.dequantize)(q), np.float64)
    want = base + delta.reshape(w.shape)
    assert merged.dtype == np.float32
    np.testing.assert_allclose(np.asarray(merged), want, rtol=2e-6, atol=2e-6)
