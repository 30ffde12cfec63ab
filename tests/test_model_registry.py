"""The model-family registry: a new family is its own module plus one `register_family` line,
and then trains and generates like Llama; an unknown family is a one-line config error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy import losses, random_params, run_toy, toy_config

from jaxalign import models
from jaxalign.config import SamplingConfig
from jaxalign.errors import ConfigError
from jaxalign.generate import Sampler
from jaxalign.models import llama
from jaxalign.models.params import AuxLoss
from jaxalign.trainers.step import accumulate_gradients


# --- A whole new family: Llama with a squared-ReLU MLP (Primer's activation). -----------------
class ReluSquaredMLP(llama.MLP):
    def activation(self, gate):
        return jnp.square(jax.nn.relu(gate))


class ReluSquaredBlock(llama.Block):
    mlp_class = ReluSquaredMLP


class ReluSquaredLM(llama.Transformer):
    block_class = ReluSquaredBlock


models.register_family(
    models.ModelFamily(
        name="relu2",
        module=ReluSquaredLM,
        flops_per_token=llama.FAMILY.flops_per_token,
        hf=None,  # no Hugging Face architecture to convert to
    )
)
# ----------------------------------------------------------------------------------------------

N = 6  # new tokens
PROMPT_LENS = (5, 11, 3, 8)


def test_a_registered_family_trains_and_generates(tmp_path):
    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "model.family": "relu2", "train.steps": 8})
    trainer, result = run_toy(cfg, devices=jax.devices()[:1])
    assert isinstance(nnx.merge(trainer.graphdef, result.state["params"]), ReluSquaredLM)
    history = losses(result)
    assert history[-1] < history[0] - 0.1

    # Generation builds the family through the registry too: greedy decoding equals the argmax of
    # the family's full forward, step by step.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(0))))
    params = jax.device_put(random_params(state, 0, std=0.25), jax.devices()[0])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, cfg.model.vocab_size, size=n).astype(np.int32) for n in PROMPT_LENS]
    sampler = Sampler(cfg.model, SamplingConfig(temperature=0.0, max_new_tokens=N))
    out = jax.device_get(sampler.generate(params, prompts))

    @jax.jit
    def logits(module_graphdef, params, tokens):
        model = nnx.merge(module_graphdef, params)
        return model.logits(model(tokens)).astype(jnp.float32)

    llama_graphdef = nnx.graphdef(nnx.eval_shape(lambda: llama.Transformer(cfg.model, nnx.Rngs(0))))
    for r, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(N):
            seq.append(int(np.argmax(logits(graphdef, params, np.array([seq]))[0, -1])))
        assert out.tokens[r, : out.lengths[r]].tolist() == seq[len(prompt) :]
    tokens = np.array([prompts[0]])  # and the family's activation is the one that ran
    assert not np.allclose(logits(graphdef, params, tokens), logits(llama_graphdef, params, tokens))


def test_unknown_family_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        toy_config(tmp_path, **{"model.family": "lama"})
    message = str(e.value)
    assert "\n" not in message
    assert "model.family 'lama' is not registered" in message
    assert "did you mean 'llama'?" in message
    assert "relu2" in message  # the known names include registered families


class _Sowing(nnx.Module):
    """A one-parameter 'model' whose forward sows an auxiliary loss w^2."""

    def __init__(self):
        self.w = nnx.Param(jnp.array(3.0))

    def __call__(self):
        self.sow(AuxLoss, "balance", self.w[...] ** 2)
        return self.w[...]


def test_sown_aux_losses_are_added_to_every_algorithms_loss():
    """loss_fn returns sum 2w over denominator 2; the step adds the sown w^2 per target."""
    graphdef, params = nnx.split(_Sowing())

    def loss_fn(model, batch, rng, frozen):
        return 2.0 * model(), jnp.float32(2.0), {}

    batch = {"x": jnp.zeros((1, 1))}
    grads, loss_sum, denom, _ = accumulate_gradients(
        graphdef, loss_fn, params, batch, jax.random.PRNGKey(0)
    )
    w = 3.0
    assert float(loss_sum) == pytest.approx(2 * w + 2 * w**2)
    assert float(grads["w"][...]) == pytest.approx(2 + 4 * w)
    assert float(denom) == 2.0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logical_axes_are_flax_sharding_metadata(scan_layers):
    """`nnx.get_partition_spec` reads the same names as `logical_axes`; scanned blocks carry the
    leading `layers` axis."""
    from toy import TINY_MODEL

    from jaxalign.config import ModelConfig
    from jaxalign.models.params import logical_axes

    cfg = ModelConfig(**TINY_MODEL, scan_layers=scan_layers)
    state = nnx.state(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))
    names = logical_axes(state).to_pure_dict()
    specs = jax.tree.map(tuple, nnx.get_partition_spec(state).to_pure_dict())
    assert specs == names
    wq = names["blocks"]["attn"]["wq"] if scan_layers else names["blocks"][0]["attn"]["wq"]
    assert wq == (("layers",) if scan_layers else ()) + ("embed", "heads", "head_dim")
    assert names["embed"] == ("vocab", "embed")
