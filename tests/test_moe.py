"""Mixture of experts (Qwen3-MoE, Mixtral): routing and experts against float64 NumPy, import and
export against transformers (logits, router logits, load-balancing loss), and the aux loss and
metrics reaching the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import models
from jaxalign import sharding as shd
from jaxalign.config import MeshConfig, ModelConfig
from jaxalign.errors import ConfigError
from jaxalign.models import moe
from jaxalign.models.params import pop_aux_metrics
from jaxalign.trainers.step import accumulate_gradients

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
    """(logits, router logits per MoE layer [L', N, E], the router terms) of one forward."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))
    model = nnx.merge(graphdef, params)
    model.capture_router_logits = True
    logits = model.logits(model(jnp.asarray(ids)))
    router = jax.tree.leaves(nnx.pop(model, moe.RouterLogits))[0]
    return np.asarray(logits), np.asarray(router), pop_aux_metrics(model)


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
