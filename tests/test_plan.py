"""`jaxalign plan`: every shipped recipe fits the hardware it names; a bad plan fails clearly."""

import math
import re
from pathlib import Path

import pytest

from jaxalign import cli
from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.plan import GIB, check_fits, make_plan

RECIPES = sorted((Path(__file__).resolve().parent.parent / "configs" / "recipes").glob("*.yaml"))


def _target(path: Path) -> tuple[int, float]:
    m = re.search(r"--devices (\d+) --hbm-gib (\d+)", path.read_text())
    return int(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_its_hardware(recipe, capsys):
    devices, hbm = _target(recipe)
    assert cli.main(["plan", str(recipe), "--devices", str(devices), "--hbm-gib",
                     str(hbm)]) == 0
    out = capsys.readouterr().out
    trained = "16.06B" if recipe.stem.startswith("ppo") else "8.03B"  # PPO: policy + value
    assert f"{trained} parameters" in out and f"of {hbm:g} GiB" in out


def test_plan_bytes_match_hand_count():
    """fsdp=8: each float32 matrix is split 8 ways, norms are replicated; AdamW adds two float32
    moments per parameter."""
    recipe = next(p for p in RECIPES if p.stem == "sft_8b_h100x8")
    plan = make_plan(load_config(recipe), 8)
    assert plan.num_params == 8_030_261_248  # Llama 3 8B
    norms = (2 * 32 + 1) * 4096  # replicated: the 'norm' axis maps to no mesh axis
    assert plan.params == (plan.num_params - norms) * 4 // 8 + norms * 4
    assert plan.optimizer == 2 * plan.params and plan.gradients == plan.params
    assert plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}


def test_ppo_plan_counts_policy_value_and_reference():
    recipe = next(p for p in RECIPES if p.stem == "ppo_8b_v5p64")  # reference kept on device
    ppo = make_plan(load_config(recipe), 32)
    sft = make_plan(load_config(next(p for p in RECIPES if p.stem == "sft_8b_v5p64")), 32)
    assert ppo.params == 3 * sft.params and ppo.optimizer == 2 * sft.optimizer
    assert ppo.num_params == 2 * sft.num_params


def test_plan_that_does_not_fit_fails_naming_the_sizes():
    recipe = next(p for p in RECIPES if p.stem == "sft_8b_v5e256")
    cfg = load_config(recipe, ["mesh.data=-1", "mesh.fsdp=1"])  # pure data parallel: no sharding
    plan = make_plan(cfg, 256)
    assert math.isclose(plan.params / GIB, 8_030_261_248 * 4 / GIB)
    with pytest.raises(ConfigError, match=r"plan: needs \d+\.\d GiB per device but only 16 GiB"):
        check_fits(plan, 16)


def test_plan_rejects_a_mesh_the_device_count_cannot_hold():
    recipe = next(p for p in RECIPES if p.stem == "sft_8b_v5p64")
    with pytest.raises(ConfigError, match="fsdp=3"):
        make_plan(load_config(recipe, ["mesh.fsdp=3"]), 32)
