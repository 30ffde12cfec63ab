"""Mixture of experts (Qwen3-MoE, Mixtral): routing and experts against float64 NumPy, import and
export against transformers (logits, router logits, load-balancing loss), and the aux loss and
metrics reaching the train step."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy import random_params, run_toy, toy_config, train_steps

from jaxalign import models
from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.errors import ConfigError
from jaxalign.models import llama, moe
from jaxalign.models.params import pop_aux_metrics
from jaxalign.trainers.step import accumulate_gradients, with_aux_loss, with_aux_metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import hf  # noqa: E402

IDS = np.random.default_rng(0).integers(1, 127, (2, 12))
TOL = 1e-4
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
)
FAMILIES = {
    # a dense layer (mlp_only_layers) among the MoE ones; renormalized top-k
    "qwen3_moe": dict(num_experts=6, moe_intermediate_size=16, mlp_only_layers=[1]),
    "mixtral": dict(num_local_experts=5, sliding_window=7),
}


# --- float64 NumPy references ------------------------------------------------------------------
def np_route(logits, k, normalize):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, experts, -1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts, probs


def np_experts(x, experts, weights, w_gate, w_up, w_down, keep=None):
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(experts[n]):
            if keep is not None and not keep[n, j]:
                continue
            h = silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])
            out[n] += weights[n, j] * (h @ w_down[e])
    return out


def random_expert_weights(rng, e=4, d=8, f=6):
    return [rng.normal(size=s) * 0.5 for s in ((e, d, f), (e, d, f), (e, f, d))]


@pytest.mark.parametrize("normalize", [False, True])
def test_routing_and_dropless_experts_equal_float64_reference(normalize):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 8))
    logits = rng.normal(size=(10, 4))
    logits[3] = logits[3, 0]  # a four-way tie: the lower expert indices win
    ws = random_expert_weights(rng)
    w_ref, e_ref, p_ref = np_route(logits, 2, normalize)
    weights, experts, probs = moe.route(jnp.asarray(logits, jnp.float32), 2, normalize)
    assert experts.tolist() == e_ref.tolist() and experts[3].tolist() == [0, 1]
    np.testing.assert_allclose(weights, w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, p_ref, rtol=1e-5, atol=1e-6)
    out = moe.dropless_experts(
        jnp.asarray(x, jnp.float32), experts, weights, *map(jnp.asarray, ws), jax.nn.silu
    )
    np.testing.assert_allclose(out, np_experts(x, e_ref, w_ref, *ws), rtol=1e-4, atol=1e-5)


def test_capacity_mode_drops_late_assignments_first_choices_first():
    """Capacity 3 per expert: slots go to first choices in token order, then second choices;
    padding takes none; the rest are dropped and counted."""
    rng = np.random.default_rng(2)
    n, k, e = 10, 2, 4
    x = rng.normal(size=(n, 8))
    logits = rng.normal(size=(n, e))
    logits[:, 0] += 3.0  # expert 0 is everyone's first choice: it overflows
    valid = np.ones(n, bool)
    valid[-1] = False
    ws = random_expert_weights(rng, e=e)
    w_ref, e_ref, _ = np_route(logits, k, True)
    capacity = 3
    keep, used = np.zeros((n, k), bool), np.zeros(e, int)
    for j in range(k):
        for t in range(n):
            if valid[t] and used[e_ref[t, j]] < capacity:
                keep[t, j] = True
                used[e_ref[t, j]] += 1
    weights, experts, _ = moe.route(jnp.asarray(logits, jnp.float32), k, True)
    out, dropped = moe.capacity_experts(
        jnp.asarray(x, jnp.float32),
        experts,
        weights,
        jnp.asarray(valid),
        *map(jnp.asarray, ws),
        jax.nn.silu,
        capacity,
    )
    np.testing.assert_allclose(out, np_experts(x, e_ref, w_ref, *ws, keep), rtol=1e-4, atol=1e-5)
    assert int(dropped) == valid.sum() * k - keep.sum() > 0
    assert moe.expert_capacity(10, 2, 4, 0.6) == 3


# --- transformers parity -----------------------------------------------------------------------
_HF: dict = {}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    def make(family):
        if family not in _HF:
            torch.manual_seed(0)
            cfg = transformers.AutoConfig.for_model(family, **{**TINY, **FAMILIES[family]})
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    base = 1.0 if "norm" in name else 0.0
                    p.copy_(base + 0.2 * torch.randn_like(p))
            directory = tmp_path_factory.mktemp(f"hf_{family}")
            model.save_pretrained(directory)
            _HF[family] = (directory, model)
        return _HF[family]

    return make


def one_device_mesh():
    return shd.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def jax_forward(cfg, params, ids):
    """(logits, router logits per MoE layer [L', N, E], the router terms) of one forward (jitted:
    one compile instead of one per eager op)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))

    @jax.jit
    def forward(params):
        model = nnx.merge(graphdef, params)
        model.capture_router_logits = True
        logits = model.logits(model(jnp.asarray(ids)))
        router = jax.tree.leaves(nnx.pop(model, moe.RouterLogits))[0]
        return logits, router, pop_aux_metrics(model)

    logits, router, metrics = jax.device_get(forward(params))
    return np.asarray(logits), np.asarray(router), metrics


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_and_export_match_transformers_with_router_logits_and_aux_loss(
    family, hf_model, tmp_path
):
    directory, torch_model = hf_model(family)
    model = hf.from_pretrained(directory, mesh=one_device_mesh())
    assert model.cfg.family == family and model.cfg.num_experts == torch_model.config.num_experts
    logits, router, metrics = jax_forward(model.cfg, model.params, IDS)
    with torch.no_grad():
        out = torch_model(torch.tensor(IDS), output_router_logits=True)
    assert np.abs(logits - out.logits.numpy()).max() <= TOL
    want_router = np.stack([r.numpy() for r in out.router_logits])
    assert router.shape == want_router.shape
    assert np.abs(router - want_router).max() <= TOL
    assert float(metrics["moe/aux_loss"]) == pytest.approx(float(out.aux_loss), abs=1e-5)

    exported = hf.save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(torch_model)
    with torch.no_grad():
        again = reloaded(torch.tensor(IDS)).logits.numpy()
    assert np.abs(again - logits).max() <= TOL


# --- the train step, layer scan, capacity mode and expert parallelism ----------------------------
MOE_TOY = {
    "model.family": "qwen3_moe",
    "model.num_experts": 4,
    "model.num_experts_per_tok": 2,
    "model.moe_intermediate_size": 32,
    "model.router_aux_loss_coef": 0.01,
    "model.router_z_loss_coef": 0.001,
}
EXPERT_RULES = str(Path(__file__).resolve().parents[1] / "configs/sharding/expert.yaml")


def tiny_moe(**fields) -> ModelConfig:
    base = dict(
        family="qwen3_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_experts=4,
        moe_intermediate_size=16,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    return ModelConfig(**{**base, **fields})


def tiny_params(cfg: ModelConfig, seed: int = 0):
    state = nnx.state(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))
    return jax.device_put(random_params(state, seed, std=0.3), jax.devices()[0])


def test_aux_loss_and_metrics_reach_every_algorithms_loss():
    """A loss of 0 over 4 targets: the step's loss sum is 4 x (aux coef x balance + z coef x
    z-loss), and the router metrics come back as sums of per-target means."""
    cfg = tiny_moe()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))
    params = tiny_params(cfg)
    tokens = jnp.asarray(IDS[:, :8] % 64)

    def loss_fn(model, batch, rng, frozen):
        return 0.0 * model(batch["tokens"]).sum(), jnp.float32(4.0), {}

    step = jax.jit(
        lambda p, b: accumulate_gradients(graphdef, loss_fn, p, b, jax.random.PRNGKey(0))
    )
    _, loss_sum, _, metrics = jax.device_get(step(params, {"tokens": tokens[None]}))
    aux, z = float(metrics["moe/aux_loss"]) / 4, float(metrics["moe/z_loss"]) / 4
    assert float(loss_sum) == pytest.approx(4 * (0.01 * aux + 0.001 * z), rel=1e-5)
    assert 1.9 < aux < 4 and z > 0  # E x sum f P is k (2) for perfectly balanced routing
    load = np.asarray(metrics["moe/expert_load"]) / 4
    assert load.shape == (4,) and load.sum() == pytest.approx(1.0)
    assert float(metrics["moe/dropped_tokens"]) == 0.0


def test_scanned_layers_and_roomy_capacity_equal_the_dropless_unrolled_model():
    cfg = tiny_moe()
    params = tiny_params(cfg)
    tokens = jnp.asarray(IDS % 64)
    variants = {  # name: (config, its parameters)
        "unrolled": (cfg, params),
        "scanned": (dataclasses.replace(cfg, scan_layers=True), llama.stack_layers(params)),
        "roomy": (dataclasses.replace(cfg, moe_capacity_factor=2.0), params),
        "tight": (dataclasses.replace(cfg, moe_capacity_factor=0.5), params),
    }
    graphdefs = {
        name: nnx.graphdef(nnx.eval_shape(lambda c=c: models.build(c, nnx.Rngs(0))))
        for name, (c, _) in variants.items()
    }

    @jax.jit  # the four forwards in one program: one compile
    def run(all_params):
        out = {}
        for name, p in all_params.items():
            model = nnx.merge(graphdefs[name], p)
            out[name] = (model.logits(model(tokens)), pop_aux_metrics(model))
        return out

    out = jax.device_get(run({name: p for name, (_, p) in variants.items()}))
    want, want_metrics = out["unrolled"]
    scanned, scanned_metrics = out["scanned"]
    np.testing.assert_allclose(scanned, want, atol=1e-5, rtol=0)
    assert float(scanned_metrics["moe/aux_loss"]) == pytest.approx(
        float(want_metrics["moe/aux_loss"]), abs=1e-6
    )
    roomy, roomy_metrics = out["roomy"]
    np.testing.assert_allclose(roomy, want, atol=1e-5, rtol=0)
    assert float(roomy_metrics["moe/dropped_tokens"]) == 0.0
    tight, tight_metrics = out["tight"]
    assert float(tight_metrics["moe/dropped_tokens"]) >= 0.5  # at most half the slots exist
    assert np.abs(tight - want).max() > 1e-3


# The expert-parallel runs' model: one MoE layer, 8-token rows, 5 steps.
EP_TOY = {**MOE_TOY, "model.num_layers": 1, "train.seq_len": 8}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    """The per-step metrics of EP_TOY trained on one device."""
    cfg = toy_config(tmp_path_factory.mktemp("single"), **EP_TOY, **{"mesh.fsdp": 1})
    history = train_steps(cfg, jax.devices()[:1])[1]
    assert len(history) == 5 and history[-1]["loss"] < history[0]["loss"]
    return history


def assert_same_router_run(got, want, name):
    """Per-step losses and router metrics within 1e-5 (expert loads within 1e-6)."""
    assert len(got) == len(want), name
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "moe/aux_loss", "moe/z_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), (name, key)
        np.testing.assert_allclose(a["moe/expert_load"], b["moe/expert_load"], atol=1e-6)


@pytest.mark.slow
def test_expert_parallel_runs_equal_the_single_device_run(tmp_path, single_device_run, capfd):
    """expert=4 (x fsdp=2), and expert=2 x fsdp=2 x tensor=2, on the 8 simulated devices: the
    same losses and router metrics as one device over 5 steps, with the experts split; XLA's
    SPMD partitioner rematerializes no tensor whole in their compiles."""
    for name, mesh in {
        "expert4": {"mesh.expert": 4, "mesh.fsdp": 2},
        "expert2_fsdp2_tensor2": {"mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    }.items():
        cfg = toy_config(tmp_path / name, **EP_TOY, **mesh, **{"sharding.rules_file": EXPERT_RULES})
        state, history = train_steps(cfg)
        w_gate = state["params"]["blocks"][0]["mlp"]["w_gate"]
        assert w_gate.sharding.spec[0] == "expert"
        assert w_gate.addressable_shards[0].data.shape[0] == 4 // cfg.mesh.expert
        assert_same_router_run(history, single_device_run, name)
    assert "involuntary full rematerialization" not in capfd.readouterr().err.lower()


@pytest.mark.slow
def test_two_process_expert_parallel_run_equals_one_device(tmp_path, single_device_run):
    """Two processes x 4 devices (a jax.distributed cluster on localhost) with mesh expert=4 x
    tensor=2: the expert axis strides over both processes (devices 0, 2 | 4, 6), so each
    process holds two of the four experts and the all-to-all that carries tokens to them
    crosses the processes. The same losses and router metrics as one device over 5 steps."""
    from test_multihost import run_two

    mesh = {"mesh.expert": 4, "mesh.fsdp": 1, "mesh.tensor": 2}
    sets = [f"{k}={v}" for k, v in {**EP_TOY, **mesh, "sharding.rules_file": EXPERT_RULES}.items()]
    worker = str(Path(__file__).resolve().parent / "two_process_toy.py")
    logs = run_two([sys.executable, worker, str(tmp_path), *sets], tmp_path / "logs")
    lines = {"metrics": [], "mesh": []}
    for line in logs.splitlines():
        kind, _, record = line.partition(": ")
        if kind in lines:
            lines[kind].append(json.loads(record))
    want = {"data": [0], "fsdp": [0], "expert": [0, 0, 1, 1], "context": [0], "tensor": [0, 0]}
    assert lines["mesh"] == [want]
    history = lines["metrics"]
    assert_same_router_run(history, single_device_run, "two processes")


def test_experts_that_do_not_divide_over_the_expert_axis_are_named(tmp_path):
    cfg = toy_config(
        tmp_path,
        **{**MOE_TOY, "model.num_experts": 6, "mesh.expert": 4, "mesh.fsdp": 2},
        **{"sharding.rules_file": EXPERT_RULES},
    )
    with pytest.raises(ConfigError, match=r"mlp.w_.*size 6.*expert.*size 4"):
        run_toy(cfg)


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"model.num_experts": 0}, "needs model.num_experts > 0"),
        ({"model.num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"model.scan_layers": True, "model.mlp_only_layers": [0]}, "scan_layers"),
        ({"model.family": "llama"}, "needs a mixture-of-experts model.family"),
    ],
)
def test_bad_moe_config_is_a_one_line_error(tmp_path, fields, named):
    with pytest.raises(ConfigError, match=named) as e:
        toy_config(tmp_path, **{**MOE_TOY, **fields})
    assert "\n" not in str(e.value)


def router_objective(algo, graphdef, params, batch) -> dict:
    """The train step's objective on one micro-batch, forward only: the algorithm's loss sum and
    denominator, the objective with the sown router losses (`with_aux_loss`) and the metrics as
    per-target means."""
    model = nnx.merge(graphdef, params)
    loss_sum, denom, metrics = algo.loss_fn(model, batch, jax.random.PRNGKey(0))
    metrics = with_aux_metrics(model, metrics, denom)
    return {
        "loss_sum": loss_sum,
        "denom": denom,
        "objective": with_aux_loss(model, loss_sum, denom),
        "metrics": {k: v / denom for k, v in metrics.items()},
    }


def router_terms(metrics, prefix=""):
    """The weighted router losses MOE_TOY's coefficients give, from logged metrics."""
    return MOE_TOY["model.router_aux_loss_coef"] * float(
        metrics[prefix + "moe/aux_loss"]
    ) + MOE_TOY["model.router_z_loss_coef"] * float(metrics[prefix + "moe/z_loss"])


@pytest.mark.slow
def test_grpo_rloo_and_reinforce_pp_on_a_moe_policy_use_the_sampled_logprobs(tmp_path):
    """The sampler decodes the MoE policy (KV cache, routing per decoded token) with the same
    log-probs as the training forward: on a fresh rollout's first minibatch, the importance ratio
    of GRPO, RLOO and REINFORCE++ is 1 (they share the rollout and the policy forward and differ
    in advantages), and each objective is its loss plus the policy's router losses."""
    from test_ppo_grpo import rl_config, rollout_data

    from jaxalign.trainers import make_algorithm
    from jaxalign.trainers.rl_rows import response_logprobs

    overrides = {**MOE_TOY, "rl.old_logprobs": "sampler"}
    algo, trainer, state, data = rollout_data(rl_config(tmp_path, "grpo", **overrides))
    micro = {k: v[0] for k, v in next(data).items()}
    algos = {"grpo": algo}
    for name in ("rloo", "reinforce_pp"):
        algos[name] = make_algorithm(rl_config(tmp_path, name, **overrides))

    @jax.jit
    def check(params, batch):
        model = nnx.merge(trainer.graphdef, params)
        logp, _ = response_logprobs(algo.policy_module(model), batch, 1.0)
        objectives = {
            name: router_objective(a, trainer.graphdef, params, batch) for name, a in algos.items()
        }
        return logp, objectives

    logp, objectives = jax.device_get(check(state["params"], micro))
    mask = micro["mask"] > 0
    assert mask.sum() > 20
    np.testing.assert_allclose(np.exp(logp - micro["old_logprobs"])[mask], 1.0, atol=1e-6)
    for name, got in objectives.items():
        metrics = got["metrics"]
        assert abs(metrics["policy/ratio"] - 1.0) < 1e-6 and metrics["policy/approxkl"] < 1e-6
        assert float(metrics["moe/aux_loss"]) > 1.0, name  # about k = 2 when balanced
        want = got["loss_sum"] + got["denom"] * router_terms(metrics)
        assert float(got["objective"]) == pytest.approx(float(want), rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_ppo_on_a_moe_policy_and_critic_uses_the_sampled_logprobs_and_values(tmp_path):
    """PPO with a MoE policy and its MoE value model (a copy of the policy's backbone): the
    rollout's log-probs and values equal the training forward's (ratio 1), and the objective
    counts both router losses, the critic's logged apart under `value/moe/*` (equal to the
    policy's here, since the backbones are equal and read the same tokens)."""
    from test_ppo_grpo import rl_config, rollout_data

    from jaxalign.trainers.rl_rows import response_logprobs, response_values

    cfg = rl_config(tmp_path, "ppo", **{**MOE_TOY, "rl.old_logprobs": "sampler"})
    algo, trainer, state, data = rollout_data(cfg)
    micro = {k: v[0] for k, v in next(data).items()}

    @jax.jit
    def check(params, batch):
        model = nnx.merge(trainer.graphdef, params)
        logp, _ = response_logprobs(algo.policy_module(model), batch, 1.0)
        values = response_values(model, batch)
        return logp, values, router_objective(algo, trainer.graphdef, params, batch)

    logp, values, got = jax.device_get(check(state["params"], micro))
    mask = micro["mask"] > 0
    assert mask.sum() > 20
    np.testing.assert_allclose(np.exp(logp - micro["old_logprobs"])[mask], 1.0, atol=1e-6)
    np.testing.assert_allclose(values[mask], micro["old_values"][mask], atol=1e-5, rtol=0)
    metrics = got["metrics"]
    assert abs(metrics["policy/ratio"] - 1.0) < 1e-6
    for key in ("moe/aux_loss", "moe/z_loss"):
        assert float(metrics["value/" + key]) == pytest.approx(float(metrics[key]), rel=1e-5)
    np.testing.assert_allclose(metrics["value/moe/expert_load"], metrics["moe/expert_load"])
    router = router_terms(metrics) + router_terms(metrics, "value/")
    want = got["loss_sum"] + got["denom"] * router
    assert float(got["objective"]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_dpo_on_a_moe_policy_starts_at_log_2_plus_the_router_losses(tmp_path):
    """DPO's frozen reference is merged with the policy's structure from before its forward pass
    sowed the router terms; with policy = reference the loss is log 2 plus the weighted aux and
    z losses the step logged."""
    from test_rm_dpo import pref_config

    from jaxalign.trainers.dpo import DPO
    from jaxalign.trainers.loop import Trainer

    overrides = {**MOE_TOY, "model.num_layers": 1, "train.batch_size": 4, "train.seq_len": 48}
    cfg = pref_config(tmp_path, "dpo", **overrides)
    result = Trainer(cfg, DPO(cfg), devices=jax.devices()[:1]).run()
    first = result.history[0]
    router = 0.01 * first["moe/aux_loss"] + 0.001 * first["moe/z_loss"]
    assert first["loss"] == pytest.approx(np.log(2.0) + router, abs=1e-5)
    assert abs(first["rewards/margins"]) < 1e-4


@pytest.mark.parametrize("tile", [None, 2, 4])
def test_tiled_experts_equal_the_ragged_dot_experts(tile):
    """The CPU grouped matmul (whole tiles per expert) against ragged_dot's, with an empty
    expert, uneven groups, rows for no expert (groups >= E: zeros) and tiles not filled."""
    rng = np.random.default_rng(3)
    e, m = 4, 23
    groups = rng.choice([0, 1, 3, 4], size=m, p=[0.5, 0.2, 0.2, 0.1]).astype(np.int32)
    rows = jnp.asarray(rng.normal(size=(m, 8)), jnp.float32)
    ws = [jnp.asarray(w, jnp.float32) for w in random_expert_weights(rng, e=e)]
    got = moe._tiled_swiglu(rows, jnp.asarray(groups), *ws, jax.nn.silu, tile)
    order = np.argsort(groups, kind="stable")
    sizes = jnp.asarray(np.bincount(groups, minlength=e + 1)[:e], jnp.int32)
    xs = rows[order]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, ws[0], sizes)) * jax.lax.ragged_dot(xs, ws[1], sizes)
    want = np.zeros((m, 8), np.float32)
    want[order] = np.asarray(jax.lax.ragged_dot(h, ws[2], sizes))
    want[groups >= e] = 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- the megablox grouped matmul (TPU) -----------------------------------------------------------
def test_megablox_experts_equal_ragged_dot_values_and_gradients():
    """The megablox Pallas kernel (interpret mode here) against jax.lax.ragged_dot inside the
    experts: outputs and the gradients of a weighted sum with respect to the rows and the three
    expert weights, with an empty expert, uneven groups and rows for no expert (zeros)."""
    rng = np.random.default_rng(4)
    e, m = 4, 23
    groups = jnp.asarray(rng.choice([0, 1, 3, 4], size=m, p=[0.5, 0.2, 0.2, 0.1]), jnp.int32)
    rows = jnp.asarray(rng.normal(size=(m, 8)), jnp.float32)
    ws = [jnp.asarray(w, jnp.float32) for w in random_expert_weights(rng, e=e)]
    probe = jnp.asarray(rng.normal(size=(m, 8)), jnp.float32)

    def run(kernel):
        def loss(rows, *ws):
            y = moe._grouped_swiglu(rows, groups, *ws, jax.nn.silu, kernel)
            return jnp.sum(y * probe), y

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        return jax.device_get(jax.jit(grad)(rows, *ws))

    (_, got), got_grads = run("megablox")
    (_, want), want_grads = run("ragged_dot")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[np.asarray(groups) >= e] == 0)
    for name, a, b in zip(("rows", "w_gate", "w_up", "w_down"), got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_expert_parallel_moe_layer_with_megablox_compiles_for_tpu_v5e_4(capfd):
    """`moe_kernel: auto` on TPU is megablox. One MoE layer's forward and backward with its 4
    experts split over a v5e-4 (mesh.expert=4) compiles with the three grouped matmuls and
    their gradients (gmm x 2, tgmm) as Mosaic kernels inside the expert-parallel shard_map,
    counting about the grouped FLOPs (not every row times every expert), and without the SPMD
    partitioner's involuntary full rematerialization."""
    from test_splash import tpu_topology

    from jaxalign.config import load_config
    from jaxalign.models.params import build_model

    devices = tpu_topology("v5e:2x2")
    assert moe.auto.resolve("moe_kernel", "auto", devices[0].platform) == "megablox"
    n, d, f, e, k = 256, 128, 128, 4, 2
    model = {
        "family": "qwen3_moe",
        "vocab_size": 256,
        "hidden_size": d,
        "intermediate_size": f,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 64,
        "num_experts": e,
        "num_experts_per_tok": k,
        "moe_intermediate_size": f,
        "dtype": "bfloat16",
        "attention_kernel": "einsum",  # splash compiles apart (tests/test_splash.py)
    }
    cfg = load_config(None, ["mesh.expert=4", "mesh.fsdp=1"], base={"model": model})
    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = shd.resolve_rules(dataclasses.replace(cfg.sharding, rules_file=EXPERT_RULES))
    graphdef, abstract, shardings = build_model(cfg, mesh, rules)

    def loss(params, tokens):
        with shd.activation_sharding(mesh, rules):
            hidden = nnx.merge(graphdef, params)(tokens)
            return jnp.mean(hidden.astype(jnp.float32) ** 2)

    batch = shd.logical_to_sharding(("batch", "length"), mesh, rules.activations)
    args = (
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        ),
        jax.ShapeDtypeStruct((4, n // 4), jnp.int32, sharding=batch),
    )
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 9  # 3 x (forward, input and weight grads)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # Per device: its tokens' assignments (at most all n * k of them, padded to whole tiles)
    # through three projections, forward and two backward products each.
    assert cost["flops"] < 2.5 * 18 * n * k * d * f
    assert "involuntary full rematerialization" not in capfd.readouterr().err.lower()
