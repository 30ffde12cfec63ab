"""`jaxalign plan`'s fast estimate (no libtpu) against the compiled peaks XLA's TPU compiler
gave for the recipes (bench/results/tpu_compile.json, written by bench/tpu_compile.py): within
15% for every compiled train step and rollout generate program of every TPU recipe. No compile
here: the estimate takes a second per recipe. And the model FLOPs (MFU's numerator) of LoRA,
QLoRA and MoE models against the models' own parameter shapes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.config import load_config
from jaxalign.plan import GIB, make_plan
from jaxalign.trainers import get_trainer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "tpu_compile.json"
COMPILED = [
    r for r in json.loads(RESULTS.read_text())["results"] if "error" not in r and not r.get("tag")
]


def test_results_cover_every_tpu_recipe():
    """Every recipe of configs/recipes/ named for a TPU slice is in the calibration set, with
    its rollout's generate program for RL recipes."""
    bench = _bench()
    assert set(bench.tpu_recipes()) <= {r["recipe"] for r in COMPILED}


@pytest.mark.parametrize("row", COMPILED, ids=lambda r: f"{r['recipe']}-{r['program']}")
def test_estimate_is_within_15_percent_of_the_compiled_peak(row):
    cfg = load_config(ROOT / "configs" / "recipes" / f"{row['recipe']}.yaml", row["sets"])
    plan = make_plan(cfg, row["devices"], platform="tpu")
    if row["program"] == "rollout_generate":
        estimate = plan.rollout_generate / GIB
    else:
        estimate = plan.train_step_bytes(get_trainer(cfg.trainer).is_rl) / GIB
    assert abs(estimate - row["peak_gib"]) <= 0.15 * row["peak_gib"], (estimate, row["peak_gib"])


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tpu_compile", ROOT / "bench/tpu_compile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_model_flops_of_llama3_8b_match_a_hand_count():
    """bench/tpu_compile.py's model FLOPs (the MFU numerator) of the 8B SFT recipe: 6 x matmul
    parameters (all but the embedding lookup and the norms) x tokens, plus causal attention,
    12 x layers x heads x head_dim x T / 2 per token (jaxalign.metrics' convention)."""
    bench = _bench()
    cfg = load_config(ROOT / "configs" / "recipes" / "sft_8b_v5p64.yaml")
    matmul_params = 8_030_261_248 - 128256 * 4096
    tokens = 256 * 4096
    attention = 12 * 32 * 32 * 128 * 4096 / 2
    expected = (6 * matmul_params + attention) * tokens
    assert bench.model_flops(cfg, "train_step") == pytest.approx(expected, rel=1e-12)
    assert bench.model_flops(cfg, "rollout_generate") is None
    assert bench.recipe_topology("sft_8b_v5p64") == "v5p-64"
    assert bench.recipe_topology("sft_8b_h100x8") is None


def _matmul_weights(cfg) -> tuple[float, float, float]:
    """(frozen base, trained base, adapter) weights one token multiplies by, in float64, read
    from the abstract model's parameter shapes: every array but the input embedding (the norms'
    too, as the usual 6 N count does); a MoE layer's expert arrays count k / E of their size;
    a tied embedding counts once, as the output head."""
    from flax import nnx

    from jaxalign.models import lora as lora_mod
    from jaxalign.models.registry import build
    from jaxalign.optim import param_path

    m = cfg.model
    state = nnx.split(nnx.eval_shape(lambda: build(m, nnx.Rngs(0))))[1].to_pure_dict()
    frozen = trained = adapters = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = param_path(path)
        size = np.prod(leaf.shape, dtype=np.float64)
        if name == "embed" and not m.tie_embeddings:
            continue
        expert = m.num_experts and leaf.ndim >= 3 and leaf.shape[-3] == m.num_experts
        if name.rsplit("/", 1)[-1] in ("w_gate", "w_up", "w_down") and expert:
            size *= m.num_experts_per_tok / m.num_experts  # [(L,) E, ...]: k experts a token
        if lora_mod.is_adapter(name):
            adapters += size
        elif m.lora is None or lora_mod.path_matcher(m.lora.train)(name):
            trained += size
        else:
            frozen += size
    return frozen, trained, adapters


@pytest.mark.parametrize(
    "config, sets",
    [
        ("configs/sft_tiny.yaml", ["model.lora.rank=4"]),
        ("configs/sft_tiny.yaml", ["model.lora.rank=4", "model.tie_embeddings=false",
                                   "model.lora.targets=(.*/)?(attn/(wq|wv)|mlp/w_down|lm_head)"]),
        ("configs/sft_qwen3_moe_tiny.yaml", []),
    ],
)  # fmt: skip
def test_model_flops_per_token_counts_the_weights_of_the_model(config, sets):
    """LoRA: 6 FLOPs per token for each trained weight (adapters), 4 for each frozen base
    weight (forward and input gradient, no weight gradient); MoE: the active experts only;
    attention 3 x 2 x 2 x L x H x hd x T / 2. Checked against the abstract model's own
    parameter shapes in float64; a forward alone is 2 per weight plus attention's forward."""
    from jaxalign.metrics import lora_adapter_params, matmul_params, model_flops_per_token

    cfg = load_config(ROOT / config, sets)
    m, t = cfg.model, 64
    frozen, trained, adapters = _matmul_weights(cfg)
    attention = 3 * 2 * 2 * m.num_layers * m.num_heads * m.resolved_head_dim * t / 2
    expected = 4 * frozen + 6 * (trained + adapters) + attention
    assert model_flops_per_token(m, t) == pytest.approx(expected, rel=1e-12)
    assert lora_adapter_params(m) == adapters
    assert matmul_params(m) == pytest.approx(frozen + trained, rel=1e-12)
    forward = 2 * (frozen + trained) + attention / 3
    assert model_flops_per_token(m, t, trained=False) == pytest.approx(forward, rel=1e-12)


def test_bench_reads_the_buffers_live_at_the_peak_from_an_xla_dump(tmp_path):
    """bench/tpu_compile.py's `live_at_peak`: the live-range report's peak list, largest first,
    each named by its shape (buffer assignment) and its JAX operation (HLO metadata)."""
    bench = _bench()
    base = tmp_path / "module_0003.jit_train_step.cl_1.after_optimizations"
    Path(f"{base}-live-range.txt").write_text(
        "HloLiveRange (max 9):\n  Live ranges at 5 (peak):\n"
        "    fusion.1{}: 1024 bytes (cumulative: 1024 bytes)\n"
        "    param.2{}: 4096 bytes (cumulative: 5120 bytes)\n"
        "  Stack trace breakdown for peak usage: 5 120 bytes\n"
    )
    Path(f"{base}-buffer-assignment.txt").write_text(
        "allocation 0: size 4096, parameter 0:\n"
        " value: <7 param.2 @0> (size=4096,offset=0): f32[32,32]{1,0:T(8,128)}\n"
        " value: <8 fusion.1 @0> (size=1024,offset=0): bf16[16,32]{1,0:T(8,128)(2,1)}\n"
    )
    Path(f"{base}.txt").write_text(
        '  %fusion.1 = bf16[16,32]{1,0} fusion(%param.2), metadata={op_name="jit(f)/dot"}\n'
    )
    total, rows = bench.live_at_peak(tmp_path, "train_step")
    assert total == 5120
    assert [(r["shape"], r["source"]) for r in rows] == [
        ("f32[32,32]", "param.2{}"),
        ("bf16[16,32]", "jit(f)/dot"),
    ]
    assert bench.live_at_peak(tmp_path, "rollout_generate") == (0.0, [])
