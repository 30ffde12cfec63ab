"""Model families, declared once: `model.family` names an entry here, and every caller that
builds a model asks the registry (`build(cfg.model, rngs)`) rather than naming a class.

A family is one module (its `nnx.Module` class plus a `register_family(...)` line). What an
entry gives:

- `module`: `(ModelConfig, nnx.Rngs) -> nnx.Module`. The module's `__call__(tokens, positions,
  segment_ids)` returns hidden states [B, T, D]; `logits(hidden)` projects them with
  `output_weight()` [D, V] (what the losses read, with its `cfg.final_logit_softcap`: the
  module keeps its ModelConfig as `cfg`); and `with_cache(...)` is the same forward
  pass with a KV cache from its `init_cache(batch, length)` (see `models/llama.py`).
- logical axes: each parameter's `out_sharding` metadata (Flax's own sharding metadata, read by
  `nnx.get_partition_spec`), with logical names the sharding rules map to mesh axes.
- `hf`: Hugging Face import and export hooks (None: no HF interop).
- `flops_per_token(model_cfg, seq_len)`: training FLOPs per token, for MFU.
- `extra_layer_params(model_cfg)`: parameters each layer holds beyond a Llama block's (Gemma
  2/3's two post-norms), for `metrics.param_count` (None: none).
- LoRA: a module reads each weight through `jaxalign.models.lora.project` (or `embed_lookup`,
  `merged_weight`), so `build` can add adapters to any family; a module whose weight contracts
  more than one input dim declares it in `lora_in_dims` (Llama's attention: `{"wo": 2}`), and
  embeddings are named in `lora_embeddings`.
- auxiliary losses: a module that has them (a MoE router's load balancing loss) sows each, already
  weighted, as a `models.params.AuxLoss` variable during its forward pass; the train step adds
  `pop_aux_loss(model)` to the algorithm's loss. Llama sows none.

This module imports only `jaxalign.errors` (and not JAX), so the config can validate family names
with it and families can import it without cycles. Built-in families are imported on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxalign.errors import ConfigError

if TYPE_CHECKING:
    from flax import nnx

    from jaxalign.config import ModelConfig

# Families that ship with jaxalign: name -> the module whose import registers it.
BUILTIN_FAMILIES = {
    "llama": "jaxalign.models.llama",
    "gemma2": "jaxalign.models.gemma",
    "gemma3": "jaxalign.models.gemma",
    # mixture of experts
    "qwen3_moe": "jaxalign.models.moe",
    "mixtral": "jaxalign.models.moe",
}


@dataclasses.dataclass(frozen=True)
class HFConverter:
    """A family's Hugging Face hooks (see `jaxalign/hf/convert.py` for the Llama family's).

    resolve_config(model_cfg, explicit, where): `model_cfg` with its architecture read from
      `model_cfg.from_hf`'s config.json (fields in `explicit`, the raw `model:` mapping, must
      agree).
    config_from_hf(source, base): a ModelConfig from an HF directory, config.json or dict.
    config_to_hf(model_cfg, ...): the HF config.json dict for export.
    tensor_maps(model_cfg, reward=False): the HF tensor name <-> parameter path maps, each with
      its layout transforms (import and export).
    """

    resolve_config: Callable[..., ModelConfig]
    config_from_hf: Callable[..., ModelConfig]
    config_to_hf: Callable[..., dict]
    tensor_maps: Callable[..., list]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family: the module class and what the rest of jaxalign needs to know about it."""

    name: str
    module: Callable[[ModelConfig, nnx.Rngs], nnx.Module]
    flops_per_token: Callable[[ModelConfig, int], float]
    hf: HFConverter | None = None
    extra_layer_params: Callable[[ModelConfig], int] | None = None


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add `family` under `family.name` (replacing an entry of that name); returns it."""
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    """Every family `model.family` may name: registered ones and the built-in ones."""
    return sorted(set(_FAMILIES) | set(BUILTIN_FAMILIES))


def unknown_family_message(name: str) -> str:
    """`model.family 'x' is not registered (known: ...)`, with a did-you-mean when one is close."""
    known = family_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"model.family '{name}' is not registered (known: {', '.join(known)}){hint}"


def get_family(name: str) -> ModelFamily:
    """The family registered as `name` (built-in families are imported here on first use)."""
    if name not in _FAMILIES and name in BUILTIN_FAMILIES:
        importlib.import_module(BUILTIN_FAMILIES[name])
    if name not in _FAMILIES:
        raise ConfigError(unknown_family_message(name))
    return _FAMILIES[name]


def build(model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The module of `model_cfg.family`, built from `model_cfg`, with LoRA adapters added
    (`jaxalign.models.lora.add_adapters`) when `model_cfg.lora` is set. The base is built
    first, from the same random stream, so its weights do not depend on the adapters."""
    module = get_family(model_cfg.family).module(model_cfg, rngs)
    if model_cfg.lora is not None:
        from jaxalign.models.lora import add_adapters

        add_adapters(module, model_cfg.lora, rngs)
    return module
