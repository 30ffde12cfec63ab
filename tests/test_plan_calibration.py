"""`jaxalign plan`'s fast estimate (no libtpu) against the compiled peaks XLA's TPU compiler
gave for the recipes (bench/results/tpu_compile.json, written by bench/tpu_compile.py): within
15% for every compiled train step. No compile here: the estimate takes a second per recipe."""

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
    r
    for r in json.loads(RESULTS.read_text())["results"]
    if r["program"] == "train_step" and "error" not in r and not r.get("tag")
]


def test_results_cover_the_8b_sft_recipes():
    assert {"sft_8b_v5p64", "sft_8b_v5e256"} <= {r["recipe"] for r in COMPILED}


@pytest.mark.parametrize("row", COMPILED, ids=lambda r: f"{r['recipe']}-{r['program']}")
def test_estimate_is_within_15_percent_of_the_compiled_peak(row):
    cfg = load_config(ROOT / "configs" / "recipes" / f"{row['recipe']}.yaml", row["sets"])
    plan = make_plan(cfg, row["devices"], platform="tpu")
    estimate = plan.train_step_bytes(get_trainer(cfg.trainer).is_rl) / GIB
    assert abs(estimate - row["peak_gib"]) <= 0.15 * row["peak_gib"], (estimate, row["peak_gib"])
