"""`jaxalign plan`: every shipped recipe fits the hardware it names; a bad plan fails clearly."""

import math
import re
from pathlib import Path

import pytest

from jaxalign import cli
from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.plan import GIB, HEAD_COPIES, check_fits, make_plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The recipes for a cluster (their header names `--devices N --hbm-gib G`); the SmolLM2 LoRA
# recipes are for this CPU (scripts/lora_smollm2.py).
RECIPES = sorted(p for p in (CONFIGS / "recipes").glob("*.yaml") if "--hbm-gib" in p.read_text())


def _target(path: Path) -> tuple[int, float]:
    m = re.search(r"--devices (\d+) --hbm-gib (\d+)", path.read_text())
    return int(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_its_hardware(recipe, capsys):
    devices, hbm = _target(recipe)
    platform = "gpu" if "h100" in recipe.stem else "tpu"
    args = ["plan", str(recipe), "--devices", str(devices), "--hbm-gib", str(hbm)]
    assert cli.main([*args, "--platform", platform]) == 0
    out = capsys.readouterr().out
    # Llama-3-8B class (PPO: policy + value); Gemma-3-12B text: HF's count with its 262208 vocab.
    trained = "16.06B" if recipe.stem.startswith("ppo") else "8.03B"
    if "gemma3_12b" in recipe.stem:
        trained = "11.77B"
    if "70b" in recipe.stem:  # Llama 3 70B
        trained = "70.55B"
    if "lora" in recipe.stem:  # the base plus its rank-16 adapters on every projection
        trained = {"8.03B": "8.07B", "70.55B": "70.76B"}[trained]
    if "qwen3_30b_a3b" in recipe.stem:  # Qwen3-30B-A3B: 30.5B, 3.3B active with the head
        trained = "30.53B"
        assert "(3.04B active per token, for FLOPs)" in out
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
    assert plan.mesh == {"data": 1, "fsdp": 8, "expert": 1, "context": 1, "tensor": 1}


def test_ppo_plan_counts_policy_value_and_reference():
    recipe = next(p for p in RECIPES if p.stem == "ppo_8b_v5p64")  # reference kept on device
    ppo = make_plan(load_config(recipe), 32)
    sft = make_plan(load_config(next(p for p in RECIPES if p.stem == "sft_8b_v5p64")), 32)
    score = 4096 // 32 * 4  # the value head: [D] float32, split over fsdp
    assert ppo.params == sft.params and ppo.optimizer == sft.optimizer
    # The value model's untied LM head is held but never trained: no gradients, no moments.
    head = 128256 * 4096 // 32  # elements per device of the [D, V] head, split over fsdp
    assert ppo.parts["value model"] == 2 * (sft.params + score) - 4 * head  # float32 params
    assert ppo.parts["value optimizer"] == sft.optimizer + 2 * score - 8 * head
    assert ppo.parts["reference"] == sft.params
    assert ppo.parts["reward model"] == sft.params + score  # no RM run here: the policy's shape
    assert ppo.num_params == 2 * sft.num_params + 4096


def tiny_policy_params(vocab, d, f, layers, heads, kv_heads, head_dim) -> tuple[int, int]:
    """Parameter count of a tied-embedding Llama and how many of them are norm weights."""
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    per_layer = attention + 3 * d * f + 2 * d
    return vocab * d + layers * per_layer + d, (2 * layers + 1) * d


def test_ppo_tiny_plan_matches_hand_count():
    """configs/ppo_tiny.yaml on 8 devices, FSDP rules (every matrix split 8 ways along `embed`,
    norms replicated, kv heads and vocab unsplit, rows over data x fsdp = 8)."""
    plan = make_plan(load_config(CONFIGS / "ppo_tiny.yaml"), 8)
    total, norms = tiny_policy_params(512, 128, 352, 4, 4, 2, 32)
    assert total == 803_968
    policy = ((total - norms) // 8 + norms) * 4
    score = 128 // 8 * 4
    rows = 64 // 8  # min(64 rows per rollout, sampling.batch_size 64 x 1 generation) / 8
    slots = 32 + 24 - 1  # the prompt bucket + max_new_tokens - 1
    assert plan.parts == {
        "params": policy,
        "optimizer": 2 * policy,
        "gradients": policy,
        "activations": plan.activations,
        "value model": 2 * (policy + score),
        "value optimizer": 2 * (policy + score),
        "reference": policy,
        "rollout KV cache": rows * slots * 4 * 2 * 32 * 2 * 4,  # layers, kv heads, hd, k+v, f32
        "rollout logits": rows * 24 * 512 * 4 * 2,  # logits and log-softmax, float32
    }
    assert plan.parts["rollout KV cache"] == 901_120 and plan.host == {}
    assert plan.total == sum(plan.parts.values())


def test_ppo_8b_rollout_memory_matches_hand_count(capsys):
    """ppo_8b_v5p64 on 32 chips: 512 rows per generate call, 16 per chip; bfloat16 cache; the
    log-prob forwards take rl.forward_batch_size = 128 rows at a time, 4 per chip."""
    recipe = next(p for p in RECIPES if p.stem == "ppo_8b_v5p64")
    plan = make_plan(load_config(recipe), 32)
    rows, slots = 512 // 32, 1024 + 1024 - 1
    assert plan.parts["rollout KV cache"] == rows * slots * 32 * 8 * 128 * 2 * 2 == 4_292_870_144
    assert plan.parts["rollout logits"] == (128 // 32) * 1024 * 128_256 * 4 * 2
    assert cli.main(["plan", str(recipe), "--devices", "32", "--hbm-gib", "95"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        "  rollout KV cache      4.00 GiB" in lines and "  reference             0.94 GiB" in lines
    )
    assert "  rollout logits        3.91 GiB" in lines
    # Packed rows, never more than plain ones: logits at min(K x N, P + N) positions per row.
    for per_row, positions in ((2, 2 * 1024), (3, 1024 + 1024)):
        packed = make_plan(load_config(recipe, [f"rl.pack_rows={per_row}"]), 32)
        assert packed.parts["rollout logits"] == (128 // 32) * positions * 128_256 * 4 * 2


def test_context_parallel_grpo_memory_matches_hand_count():
    """grpo_8b_16k_v5p128 on 64 chips (fsdp 16 x context 4): a device holds T / 4 of a training
    row's tokens and N / 4 of its response logits, while the rollout's KV cache is whole (8 rows
    of 17407 slots); the generate program adds the prompt embeddings gathered whole and the head
    gathered whole (prefill) and over the batch axes only (decode)."""
    recipe = CONFIGS / "recipes" / "grpo_8b_16k_v5p128.yaml"
    plan = make_plan(load_config(recipe), 64, platform="tpu")
    cache = 8 * (1024 + 16384 - 1) * 32 * 8 * 128 * 2 * 2
    assert plan.parts["rollout KV cache"] == cache
    assert plan.parts["rollout logits"] == 1 * (16384 // 4) * 128_256 * 4 * 2
    head = 4096 * 128_256 * 2
    prompts = 128 * 1024 * 4096 * 2
    assert plan.rollout_generate == plan.params + cache + prompts + head + head // 4
    t = 17408 // 4  # one row of the micro-batch per chip, a quarter of its tokens
    per_token = 32 * 2 * 4096 * 2 + 2 * 14336 * 2  # saved layer inputs, MLP working set
    scores = 32 * (t / 2) ** 2 * (4 + 4 + 1)  # one sub-block pair: f32 scores, gradient, mask
    inputs = 4 * 2 * t * (32 * 128 * (4 + 2) + 2 * 8 * 128 * 2)  # the block loop's inputs
    rl_logits = (16384 // 4) * 128_256 * 2
    expected = t * per_token + HEAD_COPIES * head + scores + inputs + rl_logits
    assert plan.activations == pytest.approx(expected, rel=1e-9)


def test_offloaded_reference_and_reward_model_are_shown_but_not_counted(capsys):
    recipe = next(p for p in RECIPES if p.stem == "ppo_8b_h100x8")  # rl.offload_frozen: true
    plan = make_plan(load_config(recipe), 8)
    assert set(plan.host) == {"reference", "reward model"} and plan.host["reference"] == plan.params
    assert "reference" not in plan.parts and plan.total == sum(plan.parts.values())
    assert cli.main(["plan", str(recipe), "--devices", "8", "--hbm-gib", "80"]) == 0
    assert (
        "  reference             3.74 GiB  in host memory between uses (rl.offload_frozen): "
        "not counted"
    ) in capsys.readouterr().out.splitlines()


def test_grpo_has_no_value_model_and_dpo_a_reference_unless_precomputed():
    grpo = make_plan(load_config(CONFIGS / "grpo_tiny.yaml"), 8)
    assert "value model" not in grpo.parts and grpo.parts["reference"] == grpo.params
    assert grpo.parts["rollout KV cache"] > 0
    recipe = next(p for p in RECIPES if p.stem == "dpo_8b_h100x8")  # precompute_ref: true
    assert "reference" not in make_plan(load_config(recipe), 8).parts
    dpo = make_plan(load_config(recipe, ["dpo.precompute_ref=false"]), 8)
    assert dpo.parts["reference"] == dpo.params
    simpo = make_plan(load_config(recipe, ["dpo.precompute_ref=false", "dpo.loss_type=simpo"]), 8)
    assert "reference" not in simpo.parts


def test_ppo_ptx_rows_add_their_activations():
    """rl.ptx_coef: the ptx rows' activations (rl.ptx_batch_size rows, default train.batch_size)
    come on top of the RL rows'; they are an SFT loss's (vocab-chunked logits, not the RL
    loss's response logits) without the output head's gathered weight and gradient (counted
    once with the RL rows), and linear in the rows."""
    from jaxalign import sharding as shd
    from jaxalign.plan import activation_bytes

    cfg = load_config(CONFIGS / "grpo_tiny.yaml")
    plain = make_plan(cfg, 8)
    assert "ptx activations" not in plain.parts
    same = make_plan(load_config(CONFIGS / "grpo_tiny.yaml", ["rl.ptx_coef=0.1"]), 8)
    sft = load_config(CONFIGS / "grpo_tiny.yaml", ["trainer=sft"])
    sizes, rules = shd.axis_sizes(sft.mesh, 8), shd.resolve_rules(sft.sharding)
    head = HEAD_COPIES * 128 * 512 * 4  # D x V, float32 compute
    assert same.parts["ptx activations"] == activation_bytes(sft, sizes, rules) - head
    rows = 2 * cfg.train.batch_size
    double = make_plan(
        load_config(CONFIGS / "grpo_tiny.yaml", ["rl.ptx_coef=0.1", f"rl.ptx_batch_size={rows}"]),
        8,
    )
    assert double.parts["ptx activations"] == 2 * same.parts["ptx activations"]


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


def test_compile_of_packed_preference_pairs_compiles_the_packed_step():
    """`plan --compile` of a DPO config with `preference.pack_pairs` compiles the step the run
    takes: rows of 2 x seq_len tokens (each pair in a row of its own, the largest batch a step
    can get), the loss over their segments. On the local (CPU) devices, one layer."""
    import jax

    from jaxalign import aot

    cfg = load_config("configs/dpo_tiny.yaml", ["model.num_layers=1", "preference.pack_pairs=true"])
    lowered, _ = aot.lower_train_step(cfg, jax.devices())
    batch = lowered.args_info[0][1]
    t = cfg.train
    lead = (t.grad_accum, t.batch_size // t.grad_accum)
    assert batch["tokens"].shape == (*lead, 2 * t.seq_len)
    assert batch["pair_mask"].shape == (*lead, 1)
    report = aot.compile_program("train_step", lowered, None)
    assert report.flops > 0 and report.temp_bytes > 0
