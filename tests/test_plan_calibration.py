"""`jaxalign plan`'s fast estimate (no libtpu) against the compiled peaks XLA's TPU compiler
gave for the recipes (bench/results/tpu_compile.json, written by bench/tpu_compile.py): within
15% for every compiled train step and rollout generate program. No compile here: the estimate
takes a second per recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxalign.config import load_config
from jaxalign.plan import GIB, make_plan
from jaxalign.trainers import get_trainer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "tpu_compile.json"
COMPILED = [
    r for r in json.loads(RESULTS.read_text())["results"] if "error" not in r and not r.get("tag")
]


def test_results_cover_the_8b_sft_recipes():
    assert {"sft_8b_v5p64", "sft_8b_v5e256"} <= {r["recipe"] for r in COMPILED}


@pytest.mark.parametrize("row", COMPILED, ids=lambda r: f"{r['recipe']}-{r['program']}")
def test_estimate_is_within_15_percent_of_the_compiled_peak(row):
    cfg = load_config(ROOT / "configs" / "recipes" / f"{row['recipe']}.yaml", row["sets"])
    plan = make_plan(cfg, row["devices"], platform="tpu")
    if row["program"] == "rollout_generate":
        estimate = plan.rollout_generate / GIB
    else:
        estimate = plan.train_step_bytes(get_trainer(cfg.trainer).is_rl) / GIB
    assert abs(estimate - row["peak_gib"]) <= 0.15 * row["peak_gib"], (estimate, row["peak_gib"])


def test_bench_model_flops_of_llama3_8b_match_a_hand_count():
    """bench/tpu_compile.py's model FLOPs (the MFU numerator) of the 8B SFT recipe: 6 x matmul
    parameters (all but the embedding lookup and the norms) x tokens, plus causal attention,
    12 x layers x heads x head_dim x (T + 1) / 2 per token."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tpu_compile", ROOT / "bench/tpu_compile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(ROOT / "configs" / "recipes" / "sft_8b_v5p64.yaml")
    matmul_params = 8_030_261_248 - 128256 * 4096 - (2 * 32 + 1) * 4096
    tokens = 256 * 4096
    attention = 12 * 32 * 32 * 128 * (4096 + 1) / 2
    expected = (6 * matmul_params + attention) * tokens
    assert bench.model_flops(cfg, "train_step") == pytest.approx(expected, rel=1e-12)
    assert bench.model_flops(cfg, "rollout_generate") is None
    assert bench.recipe_topology("sft_8b_v5p64") == "v5p-64"
    assert bench.recipe_topology("sft_8b_h100x8") is None
