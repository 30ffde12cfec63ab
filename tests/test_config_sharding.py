"""Config validation, sharding presets and rules, model numerics that the engine relies on."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from toy import TINY_MODEL

from jaxalign import cli
from jaxalign import sharding as shd
from jaxalign.config import Config, ModelConfig, ShardingConfig, load_config
from jaxalign.errors import ConfigError
from jaxalign.losses import target_logprobs, token_cross_entropy_sum
from jaxalign.models.llama import Transformer, logical_axes

REPO = Path(__file__).resolve().parent.parent


# -- config errors: one line, naming the key ------------------------------------------------------


def run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_key_names_the_closest_valid_one(capsys):
    code, err = run_cli(
        ["train", str(REPO / "configs/sft_tiny.yaml"), "--set", "train.setps=3"], capsys
    )
    assert code == 2
    assert err.count("\n") == 0
    assert "unknown config key 'train.setps'" in err and "did you mean 'train.steps'" in err


def test_wrong_type_names_the_key(capsys):
    code, err = run_cli(
        ["train", str(REPO / "configs/sft_tiny.yaml"), "--set", "train.batch_size=eight"], capsys
    )
    assert code == 2 and err.count("\n") == 0
    assert "train.batch_size: expected an integer, got 'eight'" in err


def test_non_dividing_mesh_is_one_line(capsys):
    code, err = run_cli(
        ["shardings", str(REPO / "configs/sft_tiny.yaml"), "--set", "mesh.fsdp=3"], capsys
    )
    assert code == 2 and err.count("\n") == 0
    assert (
        "mesh: data=1 x fsdp=3 x expert=1 x context=1 x tensor=1 needs 3 devices per slice, but 8"
        in err
    )


def test_parameter_that_does_not_divide_names_its_path(capsys):
    code, err = run_cli(
        [
            "shardings",
            str(REPO / "configs/sft_tiny.yaml"),
            "--set",
            "mesh.fsdp=1",
            "--set",
            "mesh.tensor=8",
            "--set",
            "sharding.rules_file=" + str(REPO / "configs/sharding/fsdp_tensor.yaml"),
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 0
    assert "blocks.0.attn.wk" in err and "does not divide by mesh axes tensor (size 8)" in err


def test_batch_that_does_not_divide_is_an_error(capsys):
    code, err = run_cli(
        ["shardings", str(REPO / "configs/sft_tiny.yaml"), "--set", "train.batch_size=12"], capsys
    )
    assert code == 2 and "micro-batch of 12 rows" in err and "(size 8)" in err


def test_unknown_mesh_axis_in_rules():
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        shd.resolve_rules(ShardingConfig(rules={"mlp": "model"}))
    with pytest.raises(ConfigError, match="unknown logical axis 'hidden'"):
        shd.resolve_rules(ShardingConfig(rules={"hidden": "fsdp"}))


def test_activation_table_defaults_to_the_parameter_table():
    rules = shd.resolve_rules(ShardingConfig(rules={"vocab": None}))
    assert rules.activations == dict(rules)
    assert rules["vocab"] == () and rules["embed"] == ("fsdp",)


def test_activation_rules_place_activations_and_leave_parameters(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  embed: fsdp\nactivation_rules:\n  length: tensor\n  mlp: null\n")
    cfg = ShardingConfig(rules_file=str(path), activation_rules={"heads": None})
    rules = shd.resolve_rules(cfg)
    assert (rules["mlp"], rules["heads"], rules["length"]) == (
        ("tensor",),
        ("tensor",),
        ("context",),
    )
    acts = rules.activations
    assert (acts["mlp"], acts["heads"], acts["length"]) == ((), (), ("tensor",))
    # Parameter specs read the parameter table; `batch` and `length` the activation table.
    assert shd.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("batch", "length"), rules) == P(("data", "fsdp"), "tensor")
    # `constrain` (inside `activation_sharding`) pins activations per the activation table.
    mesh = shd.make_mesh(load_config(None, ["mesh.fsdp=4", "mesh.tensor=2"]).mesh)

    def f(x):
        return shd.constrain(x * 2, ("batch", "length", "mlp"))

    with shd.activation_sharding(mesh, rules):
        out = jax.jit(f)(jnp.ones((8, 4, 16)))
    expected = NamedSharding(mesh, P(("data", "fsdp"), "tensor", None))
    assert out.sharding.is_equivalent_to(expected, out.ndim)
    assert shd.batch_divisor(mesh, rules) == 4


def test_rules_file_sections_are_checked(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  embed: fsdp\nactivations:\n  length: tensor\n")
    with pytest.raises(ConfigError, match="unknown section 'activations'"):
        shd.resolve_rules(ShardingConfig(rules_file=str(path)))
    with pytest.raises(ConfigError, match="sharding.activation_rules: unknown logical axis 'seq'"):
        shd.resolve_rules(ShardingConfig(activation_rules={"seq": "tensor"}))
    with pytest.raises(ConfigError, match="unknown mesh axis 'sequence'"):
        shd.resolve_rules(ShardingConfig(activation_rules={"length": "sequence"}))


def test_yaml_values_are_typed_and_overrides_apply():
    cfg = load_config(
        REPO / "configs/sft_tiny.yaml",
        ["train.lr=1e-4", "model.rope_scaling=null", "mesh.tensor=2"],
    )
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 1e-4 and cfg.mesh.tensor == 2 and cfg.model.rope_scaling is None


# -- sharding presets: each parameter gets the intended spec -----------------------------------

PRESET_EXPECTED = {
    "data_parallel": {
        "embed": P(None, None),
        "wq": P(None, None, None),
        "w_down": P(None, None),
        "attn_norm": P(None),
    },
    "fsdp": {
        "embed": P(None, "fsdp"),
        "wq": P("fsdp", None, None),
        "wo": P(None, None, "fsdp"),
        "w_gate": P("fsdp", None),
        "w_down": P(None, "fsdp"),
        "attn_norm": P(None),
    },
    "fsdp_tensor": {
        "embed": P("tensor", "fsdp"),
        "wq": P("fsdp", "tensor", None),
        "wk": P("fsdp", "tensor", None),
        "wo": P("tensor", None, "fsdp"),
        "w_gate": P("fsdp", "tensor"),
        "w_down": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "attn_norm": P(None),
    },
}


@pytest.mark.parametrize("preset", sorted(PRESET_EXPECTED))
def test_preset_partition_specs(preset):
    from jaxalign.trainers.loop import build_model

    cfg = load_config(
        None,
        [
            f"sharding.rules_file={REPO}/configs/sharding/{preset}.yaml",
            "mesh.fsdp=4",
            "mesh.tensor=2",
        ],
        base={"model": dict(TINY_MODEL)},
    )
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.resolve_rules(cfg.sharding)
    _, _, shardings = build_model(cfg, mesh, rules)
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="."): s.spec
        for p, s in jax.tree_util.tree_leaves_with_path(shardings)
    }
    for name, spec in PRESET_EXPECTED[preset].items():
        matches = {k: v for k, v in flat.items() if k.split(".")[-1] == name}
        assert matches, name
        for key, got in matches.items():
            assert got == spec, f"{preset}: {key} has {got}, expected {spec}"
    assert shd.batch_divisor(mesh, rules) == (8 if preset == "data_parallel" else 4)


def test_scanned_layers_get_a_leading_layers_axis():
    cfg = ModelConfig(**TINY_MODEL, scan_layers=True)
    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    names = logical_axes(state).to_pure_dict()
    assert names["blocks"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert names["embed"] == ("vocab", "embed")


def test_shardings_command_prints_the_activation_rules(capsys):
    config = str(REPO / "configs/sft_tiny.yaml")
    assert cli.main(["shardings", config]) == 0
    assert "activation rules: the parameter rules (batch over data x fsdp)" in (
        capsys.readouterr().out
    )
    sets = ["--set", "sharding.activation_rules.length=tensor"]
    assert (
        cli.main(["shardings", config, *sets, "--set", "sharding.activation_rules.embed=null"]) == 0
    )
    out = capsys.readouterr().out
    assert "activation rules: the parameter rules except length: tensor, embed: replicated" in out


def test_shardings_command_prints_every_parameter(capsys):
    assert cli.main(["shardings", str(REPO / "configs/sft_tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "mesh: {'data': 1, 'fsdp': 8, 'expert': 1, 'context': 1, 'tensor': 1}" in out
    assert "blocks.3.mlp.w_down" in out and "P(None, 'fsdp')" in out
    assert "total parameter bytes per device" in out


@pytest.mark.parametrize(
    "config, paths",
    [
        ("rm_tiny", ["backbone.blocks.3.mlp.w_down", "score"]),
        ("ppo_tiny", ["policy.blocks.3.mlp.w_down", "value.backbone.blocks.3", "value.score"]),
    ],
)
def test_shardings_command_prints_the_trained_tree_of_the_trainer(config, paths, capsys):
    """A reward model is a backbone and a score head; PPO trains {policy, value}."""
    assert cli.main(["shardings", str(REPO / f"configs/{config}.yaml")]) == 0
    out = capsys.readouterr().out
    assert all(path in out for path in paths), out
    assert "\nblocks." not in out and "  blocks." not in out  # no bare Transformer


# -- model numerics ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return Transformer(ModelConfig(**TINY_MODEL), nnx.Rngs(0))


def test_packed_loss_equals_unpacked_loss(tiny_model):
    """Three examples packed in one row give the same per-token losses as run one by one."""
    rng = np.random.default_rng(0)
    lengths = [5, 7, 4]
    seqs = [rng.integers(0, 64, n + 1).astype(np.int32) for n in lengths]
    t = 18
    inputs = np.zeros((1, t), np.int32)
    targets = np.zeros((1, t), np.int32)
    segs = np.zeros((1, t), np.int32)
    pos = np.zeros((1, t), np.int32)
    start = 0
    for i, s in enumerate(seqs):
        n = len(s) - 1
        inputs[0, start : start + n], targets[0, start : start + n] = s[:-1], s[1:]
        segs[0, start : start + n], pos[0, start : start + n] = i + 1, np.arange(n)
        start += n

    def logps(tokens, tgts, positions, segment_ids):
        h = tiny_model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))
        return np.asarray(target_logprobs(h, tiny_model.output_weight(), jnp.asarray(tgts))[0])

    packed = logps(inputs, targets, pos, segs)[0]
    start = 0
    for s in seqs:
        n = len(s) - 1
        alone = logps(s[None, :-1], s[None, 1:], np.arange(n)[None], np.ones((1, n), np.int32))
        np.testing.assert_allclose(packed[start : start + n], alone[0], atol=1e-5)
        start += n


def test_query_blocked_attention_equals_full(tiny_model):
    cfg = ModelConfig(**TINY_MODEL, attention_query_block=4)
    blocked = Transformer(cfg, nnx.Rngs(0))
    tokens = jnp.arange(30, dtype=jnp.int32).reshape(2, 15) % 64
    np.testing.assert_allclose(
        np.asarray(blocked(tokens)), np.asarray(tiny_model(tokens)), atol=1e-5
    )


def test_auto_query_block_is_64_on_cpu_one_block_elsewhere_and_exact():
    from jaxalign.models.llama import resolve_query_block

    assert [resolve_query_block("auto", b) for b in ("cpu", "gpu", "tpu")] == [64, 0, 0]
    assert resolve_query_block(16, "gpu") == 16
    auto = Transformer(ModelConfig(**TINY_MODEL, attention_query_block="auto"), nnx.Rngs(0))
    full = Transformer(ModelConfig(**TINY_MODEL, attention_query_block=0), nnx.Rngs(0))
    assert auto.cfg.attention_query_block == 64  # resolved when built (tests run on CPU)
    tokens = jnp.arange(2 * 150, dtype=jnp.int32).reshape(2, 150) % 64  # 3 query blocks
    segment_ids = jnp.concatenate([jnp.ones((2, 100), jnp.int32), jnp.full((2, 50), 2)], 1)
    np.testing.assert_allclose(
        np.asarray(auto(tokens, segment_ids=segment_ids)),
        np.asarray(full(tokens, segment_ids=segment_ids)),
        atol=1e-5,
    )


@pytest.mark.parametrize("window", [None, 5])
def test_dot_product_attention_call_equals_einsum_attention(window):
    """The cudnn kernel's call (jax.nn.dot_product_attention with our segment mask, causal flag
    and window; its XLA implementation here on CPU) computes what the einsum attention does,
    values and gradients: packed segments, padding, grouped-query heads. bench/gpu_check.py runs
    the same comparison with implementation="cudnn" on a GPU."""
    from jaxalign.models.llama import blocked_causal_attention, cudnn_causal_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 24, h, 8)), jnp.float32) for h in (4, 2, 2))
    segments = jnp.asarray(np.repeat([[1, 2, 0], [1, 1, 0]], [10, 9, 5], axis=1), jnp.int32)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out

    einsum = lambda q, k, v: blocked_causal_attention(q, k, v, segments, 8, window)  # noqa: E731
    flash = lambda q, k, v: cudnn_causal_attention(q, k, v, segments, window, "xla")  # noqa: E731
    (_, want), want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
        einsum, q, k, v
    )
    (_, got), got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(flash, q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_attention_kernel_auto_is_splash_on_tpu_and_einsum_elsewhere():
    from jaxalign.models.llama import resolve_attention_kernel

    assert load_config(None, []).model.attention_kernel == "auto"
    assert [resolve_attention_kernel("auto", b) for b in ("tpu", "gpu", "cpu")] == [
        "splash",
        "einsum",
        "einsum",
    ]
    assert resolve_attention_kernel("splash", "cpu") == "splash"
    auto = Transformer(ModelConfig(**TINY_MODEL), nnx.Rngs(0))
    assert auto.cfg.attention_kernel == "einsum"  # resolved when built (tests run on CPU)
    cfg = load_config(None, ["model.attention_kernel=splash"])
    assert cfg.model.attention_kernel == "splash"
    with pytest.raises(ConfigError, match="model.attention_kernel"):
        load_config(None, ["model.attention_kernel=flash"])


def test_attention_kernel_cudnn_needs_bfloat16():
    with pytest.raises(ConfigError, match="attention_kernel=cudnn needs model.dtype=bfloat16"):
        load_config(None, ["model.attention_kernel=cudnn"])
    cfg = load_config(None, ["model.attention_kernel=cudnn", "model.dtype=bfloat16"])
    assert cfg.model.attention_kernel == "cudnn"


def test_chunked_cross_entropy_matches_float64_reference():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 7, 16)).astype(np.float32)
    w = rng.normal(size=(16, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) > 0.3).astype(np.float32)
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum()
    for chunks in (1, 4, 5):
        loss, n = token_cross_entropy_sum(
            jnp.asarray(hidden),
            jnp.asarray(w),
            jnp.asarray(targets),
            jnp.asarray(mask),
            chunks=chunks,
        )
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        assert float(n) == mask.sum()
    # Gradients of the chunked and unchunked loss agree.
    grad = [
        jax.grad(
            lambda h, c=c: token_cross_entropy_sum(
                h, jnp.asarray(w), jnp.asarray(targets), jnp.asarray(mask), chunks=c
            )[0]
        )(jnp.asarray(hidden))
        for c in (1, 4)
    ]
    np.testing.assert_allclose(np.asarray(grad[0]), np.asarray(grad[1]), atol=1e-5)


def test_llama3_rope_scaling_matches_reference():
    from jaxalign.models.llama import rope_frequencies

    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    got = np.asarray(rope_frequencies(16, 10000.0, scaling), np.float64)
    inv = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
    out = []
    for f in inv:  # the published Llama 3.1 reference, written as a loop
        wavelen = 2 * np.pi / f
        if wavelen < 64 / 4.0:
            out.append(f)
        elif wavelen > 64 / 1.0:
            out.append(f / 8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            out.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(got, np.array(out), rtol=1e-6)


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md is generated from config.py (scripts/make_config_docs.py)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


# -- multi-slice (DCN) meshes ---------------------------------------------------------------------


class FakeDevice:
    """Enough of a jax.Device for building device arrays: an id, a process and maybe a slice."""

    platform = device_kind = "cpu"

    def __init__(self, id, process_index=0, slice_index=None):
        self.id, self.process_index = id, process_index
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"D{self.id}"


def device_ids(arr) -> list:
    return np.vectorize(lambda d: d.id)(np.asarray(arr)).tolist()


def test_hybrid_mesh_groups_by_slice_index_like_jax():
    """Slices interleaved in the device list (even ids on slice 0): the same array as JAX's
    create_hybrid_device_mesh, with each slice's devices contiguous along the DCN axis."""
    from jax.experimental import mesh_utils

    devices = [FakeDevice(i, slice_index=i % 2) for i in range(8)]
    for ici, dcn in [([2, 2, 1], [2, 1, 1]), ([1, 2, 2], [1, 2, 1]), ([2, 1, 2], [1, 1, 2])]:
        ours = shd.hybrid_device_array(ici, dcn, devices)
        theirs = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        assert device_ids(ours) == device_ids(theirs)
    assert device_ids(shd.hybrid_device_array([2, 2, 1], [2, 1, 1], devices)) == [
        [[0], [2]],
        [[4], [6]],
        [[1], [3]],
        [[5], [7]],
    ]


def test_slices_are_processes_when_devices_have_no_slice_index():
    devices = [FakeDevice(i, process_index=i // 2) for i in range(8)]  # 4 hosts x 2 devices
    groups = shd.slice_groups(devices, 2)
    assert [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(
        ConfigError,
        match=r"make 3 slices, but the devices form 2 slice\(s\) by "
        r"slice_index \(devices per slice: 0: 4, 1: 4\)",
    ):
        shd.slice_groups([FakeDevice(i, slice_index=i // 4) for i in range(8)], 3)


@pytest.mark.parametrize(
    ("mesh", "slice_along_axis"),
    [
        ({"data": 2, "fsdp": 2, "dcn_data": 2}, [[0, 0], [0, 0], [1, 1], [1, 1]]),
        ({"data": 2, "fsdp": 2, "dcn_fsdp": 2}, [[0, 0, 1, 1], [0, 0, 1, 1]]),
    ],
    ids=["dcn_data", "dcn_fsdp"],
)
def test_simulated_slices_are_contiguous_on_the_dcn_axis(mesh, slice_along_axis):
    """One process, 8 CPU devices without slice_index: devices 0-3 are slice 0, 4-7 slice 1; the
    DCN axis is outermost, the ICI part of the axis stays within a slice."""
    from jaxalign.config import MeshConfig

    built = shd.make_mesh(MeshConfig(**mesh))
    expected = {"data": 4, "fsdp": 2} if "dcn_data" in mesh else {"data": 2, "fsdp": 4}
    assert dict(built.shape) == {**expected, "expert": 1, "context": 1, "tensor": 1}
    slice_of = np.asarray(built.device_ids)[..., 0, 0, 0] // 4
    assert slice_of.tolist() == slice_along_axis


def test_multi_slice_training_equals_single_slice(tmp_path):
    """Five SFT steps on four simulated slices of two devices (dcn_data=2 x dcn_fsdp=2), whose
    device order differs from the plain one, give the losses of one slice with the same axis
    sizes."""
    from toy import ToyAlgorithm, losses, toy_config

    from jaxalign.trainers.loop import Trainer

    results = {}
    for name, mesh in {
        "single": {"mesh.data": 4, "mesh.fsdp": 2},
        "multi": {"mesh.data": 2, "mesh.fsdp": 1, "mesh.dcn_data": 2, "mesh.dcn_fsdp": 2},
    }.items():
        cfg = toy_config(tmp_path / name, **mesh)
        trainer = Trainer(cfg, ToyAlgorithm(cfg))
        assert dict(trainer.mesh.shape) == {
            "data": 4,
            "fsdp": 2,
            "expert": 1,
            "context": 1,
            "tensor": 1,
        }
        results[name] = (trainer.mesh.device_ids[..., 0, 0, 0].tolist(), losses(trainer.run()))
    assert results["single"][0] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert results["multi"][0] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # slice s: devices 2s, 2s+1
    np.testing.assert_allclose(results["multi"][1], results["single"][1], atol=1e-5, rtol=0)


def test_host_copies_keep_each_shard_once_and_come_back_exactly():
    """rl.offload_frozen's host copies: sharded, tensor-split and replicated arrays of an 8-device
    mesh go to host memory as their distinct shards (a replicated array once) and come back
    equal, with the same shardings."""
    mesh = shd.make_mesh(load_config(None, ["mesh.fsdp=4", "mesh.tensor=2"]).mesh)
    rng = np.random.default_rng(0)
    values = {
        "fsdp": rng.standard_normal((8, 6)).astype(np.float32),
        "both": rng.standard_normal((4, 8)).astype(np.float32),
        "replicated": np.arange(5, dtype=np.int32),
    }
    specs = {"fsdp": P("fsdp", None), "both": P("fsdp", "tensor"), "replicated": P()}
    tree = {
        k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k])) for k, v in values.items()
    }
    host = shd.to_host(tree)
    assert {k: len(h.shards) for k, h in host.items()} == {"fsdp": 4, "both": 8, "replicated": 1}
    back = shd.to_device(host)
    for k, v in values.items():
        assert back[k].sharding == tree[k].sharding
        np.testing.assert_array_equal(np.asarray(back[k]), v)
