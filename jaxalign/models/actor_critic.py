"""PPO's trained module: the policy and a value model in one NNX module, so one optimizer, one
train state and one checkpoint hold both (`{"policy": ..., "value": {"backbone", "score"}}`; with
LoRA and a critic of adapters, `value/backbone` holds only the critic's adapters)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.models.lora import share_base
from jaxalign.models.params import AuxMetric, pop_aux_metrics
from jaxalign.models.registry import build
from jaxalign.models.reward import RewardModel


class ActorCritic(nnx.Module):
    """`policy`: `cfg.family`'s module; `value`: a RewardModel (a backbone of that family + scalar
    head) read at every position, so a reward-model run's parameters load into it unchanged.

    A mixture-of-experts value backbone sows its own router losses (`AuxLoss`): they join the
    objective beside the policy's, unscaled by `rl.vf_coef` (the critic's experts need balancing
    as much as the policy's). Its router metrics are reported under `value/` (`value/moe/aux_loss`,
    ...), apart from the policy's `moe/*`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora_critic: str = "adapters"):
        """With `cfg.lora`, `lora_critic` (`rl.lora_critic`) "adapters": the value backbone has
        adapters of its own on the policy's base parameters (the same `nnx.Param`s: one copy,
        listed under `policy/`); "separate": the value model is a plain model of its own."""
        self.policy = build(cfg, rngs)
        if cfg.lora is not None and lora_critic == "separate":
            self.value = RewardModel(dataclasses.replace(cfg, lora=None), rngs)
        else:
            self.value = RewardModel(cfg, rngs)
            if cfg.lora is not None:
                share_base(self.value.backbone, self.policy)

    def values(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """The value head at every position: [B, T] float32 (V of the state after token t)."""
        hidden = self.value.backbone(tokens, positions, segment_ids)
        for name, metric in pop_aux_metrics(self.value).items():
            self.sow(AuxMetric, f"value/{name}", metric)
        return hidden.astype(jnp.float32) @ self.value.score[...].astype(jnp.float32)
