"""LoRA: adapters beside their base weights, the base frozen (no gradient, no optimizer state),
adapters off as the DPO reference, sharded like their base, and small checkpoints tied to their
base."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding as shd
from jaxalign.config import ModelConfig
from jaxalign.errors import ConfigError, UserError
from jaxalign.models.lora import adapters_off, base_params, project
from jaxalign.models.lora_config import LoraConfig
from jaxalign.models.params import logical_axes
from jaxalign.models.registry import build
from jaxalign.optim import param_path
from tests.toy import TINY_MODEL, losses, run_toy, toy_config

ALL_TARGETS = r".*attn/w.|.*mlp/w_.*|embed|lm_head"


def _paths(tree) -> list[str]:
    return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _lora_model(scan: bool, targets: str = ALL_TARGETS, **lora):
    cfg = ModelConfig(**TINY_MODEL, scan_layers=scan)
    lcfg = dataclasses.replace(cfg, lora=LoraConfig(targets=targets, **lora))
    return build(cfg, nnx.Rngs(0)), build(lcfg, nnx.Rngs(0))


def _perturbed(model, seed=1, scale=0.2):
    """`model` with every adapter B (and embedding A) set to random values."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
            if param_path(p).endswith(("_lora_b", "embed_lora_a"))
            else x
        ),
        state.to_pure_dict(),
    )
    return graphdef, params


@pytest.mark.parametrize("scan", [False, True])
def test_init_logits_equal_base_exactly_and_adapters_off_is_the_base(scan):
    base, lora = _lora_model(scan)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    want = base.logits(base(tokens))
    np.testing.assert_array_equal(lora.logits(lora(tokens)), want)
    # The base weights do not depend on the adapters (same stream, built first).
    jax.tree.map(
        np.testing.assert_array_equal,
        base_params(nnx.split(lora)[1].to_pure_dict()),
        nnx.split(base)[1].to_pure_dict(),
    )
    graphdef, params = _perturbed(lora)
    model = nnx.merge(graphdef, params)
    assert not np.allclose(model.logits(model(tokens)), want, atol=1e-3)
    with adapters_off():
        np.testing.assert_array_equal(model.logits(model(tokens)), want)


def test_adapter_shapes_axes_and_init_follow_the_contract():
    _, lora = _lora_model(scan=True, rank=4, alpha=8.0)
    state = nnx.split(lora)[1]
    tree = logical_axes(state).to_pure_dict()
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    axes = {param_path(p): a for p, a in leaves[0]}
    params = state.to_pure_dict()
    wo_a = params["blocks"]["attn"]["wo_lora_a"]
    wo_b = params["blocks"]["attn"]["wo_lora_b"]
    L, h, hd, d = 2, 4, 8, 32
    assert wo_a.shape == (L, h, hd, 4) and wo_b.shape == (L, 4, d)
    assert axes["blocks/attn/wo_lora_a"] == ("layers", "heads", "head_dim", "lora_rank")
    assert axes["blocks/attn/wo_lora_b"] == ("layers", "lora_rank", "embed")
    assert axes["embed_lora_a"] == ("vocab", "lora_rank")
    assert axes["embed_lora_b"] == ("lora_rank", "embed")
    # Kaiming-uniform (a=sqrt(5)) bound 1/sqrt(fan_in); B zero; embeddings: A zero.
    bound = 1 / math.sqrt(h * hd)
    assert np.abs(wo_a).max() <= bound and np.abs(wo_a).max() > 0.9 * bound
    assert not np.any(wo_b) and not np.any(params["embed_lora_a"])
    wq_a = params["blocks"]["attn"]["wq_lora_a"]
    assert abs(float(np.std(wq_a)) - (1 / math.sqrt(d)) / math.sqrt(3)) < 0.02
    assert "blocks/attn_norm_lora_a" not in axes


def test_projection_equals_float64_reference():
    """x @ W + (x @ A) @ B * scale for a two-dim contraction (wo), rslora scaling."""
    _, lora = _lora_model(scan=False, rank=4, alpha=8.0, rslora=True)
    graphdef, params = _perturbed(lora)
    attn = nnx.merge(graphdef, params).blocks[0].attn
    x = np.random.default_rng(3).standard_normal((2, 5, 4, 8)).astype(np.float32)
    got = project(attn, "wo", jnp.asarray(x), n_in=2)
    w, a, b = (
        np.asarray(getattr(attn, n)[...], np.float64) for n in ("wo", "wo_lora_a", "wo_lora_b")
    )
    xf = x.astype(np.float64).reshape(10, 32)
    want = xf @ w.reshape(32, -1) + (xf @ a.reshape(32, 4)) @ b * (8.0 / math.sqrt(4))
    np.testing.assert_allclose(np.asarray(got).reshape(10, -1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "lora, message",
    [
        (
            {"targets": "blocks/.*/q_proj"},
            "model.lora.targets: 'blocks/.*/q_proj' matches no parameter (blocks/0/attn/wq",
        ),
        ({"targets": ".*attn_norm"}, "is not a matrix"),
    ],
)
def test_bad_targets_are_one_line_errors(lora, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _lora_model(scan=False, **lora)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rank", 0, "model.lora.rank must be positive, got 0"),
        ("dropout", 1.0, "model.lora.dropout must be in [0, 1)"),
        ("targets", "(", "model.lora.targets: '(' is not a regular expression"),
        ("ranks", 4, "unknown config key 'model.lora.ranks' (did you mean 'model.lora.rank'?)"),
    ],
)
def test_bad_lora_config_is_a_one_line_error(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        toy_config(tmp_path, **{f"model.lora.{key}": value})


def test_lora_rank_is_always_replicated(tmp_path):
    with pytest.raises(ConfigError, match="'lora_rank' is always replicated"):
        shd.resolve_rules(toy_config(tmp_path, **{"sharding.rules": "{lora_rank: fsdp}"}).sharding)


# -- training --------------------------------------------------------------------------------------

# A constant learning rate: every toy LoRA run compiles the same step, whatever its length.
LORA_RUN = {
    "train.lr": 0.03,
    "train.lr_schedule": "constant",
    "train.warmup_steps": 0,
    "model.lora.rank": 4,
    "model.lora.alpha": 8.0,
    "model.lora.train": "['.*final_norm']",
}


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """A 4-step LoRA run (checkpoint every 2) and its resume from step 2, and the initial
    parameters of the same run."""
    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm

    root = tmp_path_factory.mktemp("lora_toy")
    cfg = toy_config(root / "a", **LORA_RUN, **{"train.steps": 4, "checkpoint.every": 2})
    trainer = Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:1])
    initial = _host(trainer.initial_params())
    _, full = run_toy(cfg, devices=jax.devices()[:1])
    cfg_b = toy_config(root / "b", **LORA_RUN, **{"train.steps": 2, "checkpoint.every": 2})
    run_toy(cfg_b, devices=jax.devices()[:1])
    cfg_b = toy_config(root / "b", **LORA_RUN, **{"train.steps": 4, "checkpoint.every": 2})
    _, resumed = run_toy(cfg_b, devices=jax.devices()[:1])
    return {"cfg": cfg, "initial": initial, "full": full, "resumed": resumed, "trainer": trainer}


@pytest.mark.slow
def test_only_adapters_and_lora_train_move_and_hold_optimizer_state(toy_runs):
    initial, state = toy_runs["initial"], _host(toy_runs["full"].state)
    moved = {
        path
        for path, a, b in zip(
            _paths(initial), jax.tree.leaves(initial), jax.tree.leaves(state["params"])
        )
        if not np.array_equal(a, b)
    }
    adapters = {p for p in _paths(initial) if p.endswith(("_lora_a", "_lora_b"))}
    assert len(adapters) == 2 * 7 * 2  # 7 projections x 2 layers
    assert moved == adapters | {"final_norm"}
    # AdamW moments exist for the trained leaves only: 2 x their elements.
    trained = sum(
        np.asarray(x).size for p, x in zip(_paths(initial), jax.tree.leaves(initial)) if p in moved
    )
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * trained
    losses_ = losses(toy_runs["full"])
    assert losses_[-1] < losses_[0]


@pytest.mark.slow
def test_lora_resume_is_bitwise_and_checkpoints_hold_no_base(toy_runs):
    full, resumed = _host(toy_runs["full"].state), _host(toy_runs["resumed"].state)
    jax.tree.map(np.testing.assert_array_equal, full, resumed)
    assert losses(toy_runs["full"])[2:] == losses(toy_runs["resumed"])
    from jaxalign.checkpoint import Checkpointer

    ckpt_dir = toy_runs["cfg"].run_dir + "/checkpoints"
    saved = Checkpointer._saved_base(__import__("pathlib").Path(ckpt_dir) / "4")
    assert saved == {"source": "seed 0", "hash": saved["hash"]} and len(saved["hash"]) == 32


@pytest.mark.slow
def test_resume_refuses_another_base_in_one_line(toy_runs, tmp_path):
    import shutil

    cfg = toy_runs["cfg"]
    shutil.copytree(cfg.run_dir, tmp_path / "run")
    other = toy_config(tmp_path, **LORA_RUN, **{"train.steps": 6, "train.seed": 1})
    with pytest.raises(
        UserError,
        match=r"trained on another base \(base seed 0, hash \w+\); "
        r"this run's base is seed 1",
    ) as e:
        run_toy(other, devices=jax.devices()[:1])
    assert "\n" not in str(e.value)


def _merged_f64(params: dict, scale: float) -> dict:
    """A float64 NumPy merge: every W with adapters becomes W + (A @ B) * scale."""
    out = {}
    for key, value in params.items():
        if str(key).endswith(("_lora_a", "_lora_b")):
            continue
        if isinstance(value, dict):
            out[key] = _merged_f64(value, scale)
            continue
        w = np.asarray(value, np.float64)
        if f"{key}_lora_a" in params:
            a = np.asarray(params[f"{key}_lora_a"], np.float64)
            b = np.asarray(params[f"{key}_lora_b"], np.float64)
            delta = a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
            w = w + scale * delta.reshape(w.shape)
        out[key] = w
    return out


@pytest.mark.slow
@pytest.mark.parametrize("trainer_name, lora", [("sft", False), ("rm", True)])
def test_init_from_a_lora_run_starts_from_its_merged_model(toy_runs, tmp_path, trainer_name, lora):
    """`init_from` a LoRA SFT run, as peft's merge_and_unload: the run's adapters merged into
    its base are the new run's model (a reward model's backbone), trained in full (the loop's
    default start, as DPO's and GRPO's) or under fresh adapters of its own."""
    from jaxalign.trainers.loop import Trainer
    from jaxalign.trainers.rm import RewardModelAlgorithm
    from tests.toy import ToyAlgorithm

    sft = toy_runs["cfg"]
    sets = {"trainer": trainer_name, "init_from": sft.run_dir, "mesh.fsdp": 1}
    if lora:
        sets.update({"model.lora.rank": 2, "model.lora.alpha": 2.0})
    cfg = toy_config(tmp_path, **sets)
    algorithm = RewardModelAlgorithm.for_compile(cfg) if trainer_name == "rm" else ToyAlgorithm(cfg)
    params = _host(Trainer(cfg, algorithm, devices=jax.devices()[:1]).initial_params())
    model = params["backbone"] if trainer_name == "rm" else params
    want = _merged_f64(_host(toy_runs["full"].state["params"]), 8.0 / 4)
    got = base_params(model)
    assert _paths(got) == _paths(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=2e-6), got, want)
    assert not np.allclose(
        got["blocks"][0]["attn"]["wq"], toy_runs["initial"]["blocks"][0]["attn"]["wq"]
    )
    adapters = [p for p in _paths(model) if p.endswith(("_lora_a", "_lora_b"))]
    assert len(adapters) == (2 * 7 * 2 if lora else 0)
    if lora:  # fresh adapters of this run's rank: B = 0
        assert model["blocks"][0]["mlp"]["w_up_lora_a"].shape == (32, 2)
        assert not np.any(model["blocks"][1]["attn"]["wo_lora_b"])
    if trainer_name == "rm":
        assert params["score"].shape == (32,)


def _preference_run(tmp_path, trainer_name, steps=2):
    from jaxalign.trainers.dpo import DPO
    from jaxalign.trainers.loop import Trainer
    from jaxalign.trainers.rm import RewardModelAlgorithm
    from tests.test_rm_dpo import pref_config

    cfg = pref_config(
        tmp_path, trainer_name, **{**LORA_RUN, "train.steps": steps, "data.eval_file": "null"}
    )
    algo = (DPO if trainer_name == "dpo" else RewardModelAlgorithm)(cfg)
    trainer = Trainer(cfg, algo, devices=jax.devices()[:1])
    initial = _host(trainer.initial_params())
    return cfg, algo, trainer, initial, trainer.run()


@pytest.mark.slow
def test_dpo_reference_is_the_base_with_adapters_off_without_a_copy(tmp_path):
    from jaxalign.models.params import build_model, init_params
    from jaxalign.trainers.dpo import policy_statistics

    cfg, algo, trainer, initial, result = _preference_run(tmp_path, "dpo")
    # No second copy of the weights: only the initial values of what trains beside the adapters.
    assert _paths(trainer.frozen) == ["base_trained/final_norm"]
    params = result.state["params"]
    batch = {k: v[0] for k, v in trainer.to_global(next(algo.train_data(0, 1))).items()}
    reference = jax.jit(
        lambda p, b: algo.reference_logps(
            *nnx.split(nnx.merge(trainer.graphdef, p)), b, trainer.frozen
        )
    )

    # The base built and initialized on its own, from a config without LoRA.
    base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
    graphdef, _, shardings = build_model(base_cfg, trainer.mesh, trainer.rules)
    base = init_params(base_cfg, shardings, base_cfg.train.seed)
    want = jax.jit(lambda p, b: policy_statistics(nnx.merge(graphdef, p), b)["logps"])(base, batch)
    np.testing.assert_array_equal(reference(params, batch), want)
    policy = jax.jit(lambda p, b: policy_statistics(nnx.merge(trainer.graphdef, p), b)["logps"])
    assert np.abs(np.asarray(policy(params, batch)) - np.asarray(want)).max() > 1e-3
    history = result.history
    assert history[0]["rewards/margins"] == 0.0 and history[-1]["rewards/margins"] != 0.0


@pytest.mark.slow
def test_reward_model_trains_adapters_and_score_head_only(tmp_path):
    _, _, _, initial, result = _preference_run(tmp_path, "rm")
    end = _host(result.state["params"])
    moved = {
        p
        for p, a, b in zip(_paths(initial), jax.tree.leaves(initial), jax.tree.leaves(end))
        if not np.array_equal(a, b)
    }
    assert "score" in moved and "backbone/final_norm" in moved
    assert moved - {"score", "backbone/final_norm"} == {
        p for p in _paths(initial) if p.endswith("_lora_b") or p.endswith("_lora_a")
    }


@pytest.mark.slow
def test_sharded_lora_equals_single_device_and_adapters_follow_their_base(tmp_path):
    """fsdp 4 x tensor 2 on 8 devices against one device: same losses and parameters; A keeps
    its weight's input sharding, B its output sharding, the rank axis replicated."""
    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm

    sets = {**LORA_RUN, "train.steps": 3}
    sharded_cfg = toy_config(tmp_path / "s", **sets, **{"mesh.fsdp": 4, "mesh.tensor": 2})
    trainer = Trainer(sharded_cfg, ToyAlgorithm(sharded_cfg))
    specs = jax.tree.map(lambda s: tuple(s.spec), trainer.param_shardings)["blocks"][0]
    attn, mlp = specs["attn"], specs["mlp"]
    assert attn["wq"] == ("fsdp", "tensor", None) and attn["wq_lora_a"] == ("fsdp", None)
    assert attn["wq_lora_b"] == (None, "tensor", None)
    assert attn["wo_lora_a"] == ("tensor", None, None) and attn["wo_lora_b"] == (None, "fsdp")
    assert mlp["w_down_lora_a"] == ("tensor", None) and mlp["w_up_lora_b"] == (None, "tensor")
    _, sharded = run_toy(sharded_cfg)
    single_cfg = toy_config(tmp_path / "one", **sets, **{"mesh.fsdp": 1})
    _, single = run_toy(single_cfg, devices=jax.devices()[:1])
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
        _host(sharded.state["params"]),
        _host(single.state["params"]),
    )


LLAMA_LIKE = {  # embeddings dominate the full checkpoint, as in real Llama-style models
    "model.vocab_size": 8192,
    "model.hidden_size": 256,
    "model.intermediate_size": 704,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.num_layers": 2,
    "train.batch_size": 2,
    "train.seq_len": 16,
}


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_rank8_checkpoint_is_under_2_percent_and_the_step_holds_no_base_gradient(tmp_path):
    """Bytes on disk of a rank-8 LoRA checkpoint against the full one of the same Llama-like
    model; and the compiled LoRA step's temporaries are smaller than the gradient of the base's
    LM head alone (8 MiB), so no gradient of the base is ever materialized."""
    from pathlib import Path

    from jaxalign.checkpoint import Checkpointer
    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm, ToyData

    sizes = {}
    for name, sets in {"full": {}, "lora": {"model.lora.rank": 8}}.items():
        cfg = toy_config(tmp_path / name, **LLAMA_LIKE, **sets, **{"mesh.fsdp": 1})
        trainer = Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:1])
        state = trainer.fresh_state()
        ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", keep=1, async_save=False)
        ckpt.save(1, trainer.checkpoint_state(state), {}, {}, force=True)
        ckpt.close()
        sizes[name] = _dir_bytes(Path(cfg.run_dir) / "checkpoints")
    assert sizes["lora"] <= 0.02 * sizes["full"], sizes
    batch = trainer.to_global(next(ToyData(cfg)))
    compiled = trainer.compile_step(batch).lower(state, batch, None).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    lm_head_bytes = 4 * 256 * 8192
    assert temp < lm_head_bytes, (temp, lm_head_bytes)


def test_plan_counts_no_gradient_or_optimizer_state_for_the_base_and_no_dpo_reference():
    """Llama 3 8B DPO on 8 devices (fsdp): LoRA rank 16 on every projection. The plan's
    optimizer and gradient bytes are those of the adapters alone; the reference is the base
    with adapters off, so it costs nothing."""
    from pathlib import Path

    from jaxalign.config import load_config
    from jaxalign.plan import make_plan

    recipe = Path(__file__).resolve().parent.parent / "configs/recipes/dpo_8b_h100x8.yaml"
    full = make_plan(load_config(recipe, ["dpo.precompute_ref=false"]), 8)
    plan = make_plan(load_config(recipe, ["dpo.precompute_ref=false", "model.lora.rank=16"]), 8)
    d, f, kv, r, layers = 4096, 14336, 1024, 16, 32
    # A: in + r, B: r + out per projection (wq wk wv wo, w_gate w_up w_down).
    assert plan.num_params == full.num_params + layers * r * (9 * d + 2 * kv + 3 * f)
    # Each A is sharded like its weight's input, each B like its output: fsdp splits the
    # 'embed' side (A of wq wk wv w_gate w_up, B of wo w_down); the rest is replicated here
    # (heads and mlp map to `tensor`, of size 1).
    per_device = layers * r * (7 * d // 8 + 2 * d + 2 * kv + 3 * f)
    assert plan.gradients == 4 * per_device
    assert plan.optimizer == 2 * plan.gradients
    assert "reference" not in plan.parts and full.parts["reference"] == full.params


def test_shardings_command_shows_the_adapters(tmp_path, capsys):
    from jaxalign import cli

    config = Path(__file__).resolve().parent.parent / "configs/sft_tiny.yaml"
    assert cli.main(["shardings", str(config), "--set", "model.lora.rank=4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"blocks\.0\.attn\.wq_lora_a +\(128, 4\) +P\('fsdp', None\)", out)
    assert re.search(r"blocks\.0\.attn\.wo_lora_b +\(4, 128\) +P\(None, 'fsdp'\)", out)


@pytest.mark.slow
def test_two_processes_give_the_single_process_lora_run(tmp_path, monkeypatch):
    """tests/test_multihost.py's set-up (2 processes x 4 devices against 1 x 8) with LoRA: the
    same losses, and the 2-process LoRA checkpoint (adapters only) resumes in one process. The
    one-process runs are this process's own 8 devices (no second start-up and compile)."""
    import shutil

    from jaxalign.config import load_config
    from jaxalign.trainers import train
    from tests.test_multihost import OVERRIDES, REPO, two_processes
    from tests.test_multihost import losses as run_losses

    lora = ("model.lora.rank=4", "train.lr=0.01")
    monkeypatch.chdir(REPO)  # the config's data paths

    def one_process(run_dir):
        sets = [*OVERRIDES, f"run_dir={run_dir}", *lora]
        train(load_config(REPO / "configs/sft_tiny.yaml", sets))

    two_processes(tmp_path / "multi", tmp_path, extra=lora)
    one_process(tmp_path / "single")
    single, multi = run_losses(tmp_path / "single"), run_losses(tmp_path / "multi")
    assert sorted(multi) == [1, 2, 3, 4, 5] and single[5] < single[1]
    np.testing.assert_allclose(
        [multi[s] for s in range(1, 6)], [single[s] for s in range(1, 6)], atol=1e-5, rtol=0
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "multi", resumed)
    shutil.rmtree(resumed / "checkpoints" / "5")
    (resumed / "metrics.jsonl").unlink()
    one_process(resumed)
    got = run_losses(resumed)
    assert sorted(got) == [4, 5]
    np.testing.assert_allclose([got[4], got[5]], [single[4], single[5]], atol=1e-5)


@pytest.mark.slow
def test_nan_guard_skips_a_nonfinite_lora_step_leaving_adapters_and_moments(tmp_path):
    """nan_policy=skip: a step whose loss is NaN changes neither the adapters nor their AdamW
    state: the run after a poisoned second step equals the run stopped after its first."""
    sets = {**LORA_RUN, "train.nan_policy": "skip", "train.max_consecutive_skips": 3}
    _, one = run_toy(
        toy_config(tmp_path / "one", **sets, **{"train.steps": 1}), devices=jax.devices()[:1]
    )

    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm

    cfg = toy_config(tmp_path / "two", **sets, **{"train.steps": 2})
    algo = ToyAlgorithm(cfg)
    algo.poison.add(1)  # the second batch
    two = Trainer(cfg, algo, devices=jax.devices()[:1]).run()
    assert [h["nonfinite"] for h in two.history] == [0.0, 1.0]
    a, b = _host(one.state), _host(two.state)
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])


@pytest.mark.slow
def test_sigkilled_lora_run_resumes_to_the_uninterrupted_adapters(tmp_path, capsys):
    """scripts/crash_fuzz.py --lora: SIGKILL at random moments (often mid-save), resume, and
    the final adapters equal those of an uninterrupted run bitwise. Two kills (the full-weight
    crash fuzzing of tests/test_reliability.py kills up to four times)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import crash_fuzz

    # Seed 4 kills both attempts mid-save or early (seed 5 drew two late kill times, and a
    # resume with the compiled step cached finished before either: no kill at all).
    args = ["--trials", "1", "--work-dir", str(tmp_path), "--seed", "4", "--lora"]
    assert crash_fuzz.main([*args, "--max-kills", "2"]) == 0
    kills = re.search(r"1 trials, (\d+) kills", capsys.readouterr().out)
    assert kills and int(kills.group(1)) >= 1


@pytest.mark.slow
def test_lora_on_an_init_from_checkpoint_keeps_its_base_and_names_it(tmp_path):
    """`init_from` a full run: the base comes from that checkpoint, the adapters are fresh, and
    the base reference is that checkpoint."""
    from jaxalign.trainers.loop import Trainer
    from tests.toy import ToyAlgorithm, write_run

    full_cfg = toy_config(tmp_path / "full", **{"mesh.fsdp": 1})
    trainer = Trainer(full_cfg, ToyAlgorithm(full_cfg), devices=jax.devices()[:1])
    params = jax.tree.map(lambda x: x + 0.01, _host(trainer.initial_params()))
    write_run(tmp_path / "sft", full_cfg, params)
    cfg = toy_config(tmp_path / "lora", **LORA_RUN, **{"init_from": str(tmp_path / "sft")})
    lora_trainer, result = run_toy(cfg, devices=jax.devices()[:1])
    end = _host(result.state["params"])
    np.testing.assert_array_equal(end["embed"], params["embed"])
    np.testing.assert_array_equal(
        end["blocks"][1]["mlp"]["w_up"], params["blocks"][1]["mlp"]["w_up"]
    )
    assert np.any(end["blocks"][1]["mlp"]["w_up_lora_b"])
    assert lora_trainer._base_ref["source"].endswith("sft/checkpoints/1")
