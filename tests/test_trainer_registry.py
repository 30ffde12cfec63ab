"""The trainer registry: a new trainer is one class plus one `register_trainer` line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy import ToyData, losses, toy_config

from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.trainers import get_trainer, make_algorithm, register_trainer, registry
from jaxalign.trainers.base import Algorithm
from jaxalign.trainers.loop import Trainer

EPS = 0.1


class LabelSmoothedSFT(Algorithm):
    """Next-token cross-entropy against (1 - EPS) one-hot + EPS uniform targets."""

    def loss_fn(self, model, batch, rng, frozen=None):
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        logps = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32))
        vocab = logps.shape[-1]
        targets = (1 - EPS) * jax.nn.one_hot(batch["targets"], vocab) + EPS / vocab
        per_token = -(targets * logps).sum(-1)
        return (per_token * batch["loss_mask"]).sum(), batch["loss_mask"].sum(), {}

    def train_data(self, process_index, process_count):
        return ToyData(self.cfg, process_index, process_count)


@pytest.fixture
def registered(monkeypatch):
    """`trainer: sft_smooth` for this test only."""
    monkeypatch.setattr(registry, "_TRAINERS", dict(registry._TRAINERS))
    register_trainer("sft_smooth", LabelSmoothedSFT)


def smoothed_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """float64 reference: mean over tokens of -sum_v q_v log p_v. logits [N, V], targets [N]."""
    logits = logits.astype(np.float64)
    logps = logits - logits.max(-1, keepdims=True)
    logps -= np.log(np.exp(logps).sum(-1, keepdims=True))
    q = np.full(logits.shape, EPS / logits.shape[-1])
    q[np.arange(len(targets)), targets] += 1 - EPS
    return float(-(q * logps).sum(-1).mean())


def test_registered_trainer_is_validated_built_and_trained_by_the_loop(registered, tmp_path):
    cfg = toy_config(tmp_path, trainer="sft_smooth")
    assert type(make_algorithm(cfg)) is LabelSmoothedSFT
    assert get_trainer("sft_smooth").name == "sft_smooth" and not LabelSmoothedSFT.is_rl

    trainer = Trainer(cfg, make_algorithm(cfg), devices=jax.devices()[:1])
    params = trainer.initial_params()
    first = next(ToyData(cfg))
    model = nnx.merge(trainer.graphdef, params)
    logits = model.logits(model(first["inputs"][0], first["positions"][0], first["segment_ids"][0]))
    expected = smoothed_cross_entropy(
        np.asarray(logits).reshape(-1, cfg.model.vocab_size), first["targets"][0].reshape(-1)
    )

    result = trainer.run()
    got = losses(result)
    assert len(got) == cfg.train.steps
    assert got[0] == pytest.approx(expected, rel=1e-5)
    # The uniform part bounds the loss below by EPS * mean(-log p) > 0; it still learns.
    assert got[-1] < got[0] - 0.05


def test_unknown_trainer_names_the_closest_registered_one(registered, tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown trainer 'sft_smoth' \(did you mean 'sft_smooth'"
    ):
        load_config(None, ["trainer=sft_smoth"])
    with pytest.raises(ConfigError, match=r"unknown trainer 'xyz' \(one of sft, rm, dpo, ppo"):
        load_config(None, ["trainer=xyz"])


def test_trainer_facts_need_no_data():
    """What plan, shardings, export and generate read, from the classes alone."""
    ppo, rm = get_trainer("ppo"), get_trainer("rm")
    assert [get_trainer(n).is_rl for n in registry.trainer_names()] == [
        False, False, False, True, True, True, True
    ]  # fmt: skip
    assert ppo.policy_params({"policy": 1, "value": 2}) == 1
    assert ppo.policy_target("t") == {"policy": "t"} and rm.policy_target("t") == "t"
    assert rm.is_reward_model and not ppo.is_reward_model
    cfg = load_config(None, ["trainer=ppo", "model.tie_embeddings=false"])
    assert ppo.unused_params(cfg) == ["^value/backbone/lm_head$"]
    assert get_trainer("sft").unused_params(cfg) == []
