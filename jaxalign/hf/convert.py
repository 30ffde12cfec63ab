"""Hugging Face <-> jaxalign: model config mapping and tensor-name/layout mapping per family.

Families: llama (incl. Llama-3 rope scaling), mistral, qwen2, qwen3, gemma; gemma2 and gemma3_text
(text-only Gemma 3) in their own section at the end, for jaxalign's gemma2 / gemma3 families. A
config field jaxalign does not handle (with a value that would change the model) is a ConfigError
naming the field; an unsupported architecture is a ConfigError naming it.
Nothing here needs torch or transformers.

Layouts: torch's Linear stores [out, in]; jaxalign stores [in, out] with heads split out
(q: [D, H, hd], o: [H, hd, D]). Both use the rotate-half RoPE convention, so q/k need no
permutation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.config import ModelConfig
from jaxalign.errors import ConfigError
from jaxalign.hf.families import GEMMA_FAMILIES, hf_model_family, read_hf_config  # noqa: F401
from jaxalign.models.registry import HFConverter

ARCHITECTURES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",  # Gemma 2 / Gemma 3: see the "Gemma 2 / Gemma 3" section below
    "gemma3_text": "Gemma3",
}

# Hugging Face class defaults, used when a config.json omits a key.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "num_key_value_heads": None,
        "head_dim": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    "mistral": {
        "num_key_value_heads": 8,
        "head_dim": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    "qwen2": {
        "num_key_value_heads": 32,
        "head_dim": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    "qwen3": {
        "num_key_value_heads": 32,
        "head_dim": 128,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    "gemma": {
        "num_key_value_heads": 16,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    },
}

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}

# Generic PreTrainedConfig keys that do not change the model's function.
_IGNORED_KEYS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "max_position_embeddings",
    "pretraining_tp",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "attn_implementation",
    "_attn_implementation_autoset",
    "initializer_range",
    "cross_attention_hidden_size",
    "embedding_size",
}

# ModelConfig fields that describe the architecture (the rest are run settings: dtypes, remat...).
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "tie_embeddings",
    "qk_norm",
    "attention_bias",
    "attention_out_bias",
    "mlp_bias",
    "mlp_activation",
    "norm_plus_one",
    "scale_embeddings",
    "sliding_window",
)
# Gemma 2 / Gemma 3 architecture fields (ModelConfig defaults: absent from the other families).
GEMMA_ARCH_FIELDS = (
    "layer_types",
    "rope_local_theta",
    "rope_linear_factor",
    "attn_logit_softcap",
    "final_logit_softcap",
    "query_pre_attn_scalar",
)
ARCH_FIELDS += GEMMA_ARCH_FIELDS


def hf_family(hf: dict, where: str = "config.json") -> str:
    """The supported family ('llama', ...) of a config.json dict; ConfigError naming it if not."""
    model_type = hf.get("model_type")
    if model_type in MOE_ARCHITECTURES:
        _moe_fields(hf, where)  # checks the architecture names
        return model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join([*ARCHITECTURES, *MOE_ARCHITECTURES])})"
        )
    prefix = ARCHITECTURES[model_type]
    allowed = {f"{prefix}ForCausalLM", f"{prefix}ForSequenceClassification", f"{prefix}Model"}
    for arch in hf.get("architectures") or []:
        if arch not in allowed:
            raise ConfigError(
                f"{where}: architecture {arch!r} is not supported "
                f"(supported for {model_type}: {', '.join(sorted(allowed))})"
            )
    return model_type


def hf_arch_fields(hf: dict, where: str = "config.json") -> dict[str, Any]:
    """Map a Hugging Face config dict to ModelConfig architecture fields (see ARCH_FIELDS)."""
    family = hf_family(hf, where)
    if family in GEMMA_FAMILIES:
        return gemma_arch_fields(hf, where)
    defaults = _FAMILY_DEFAULTS[family]
    used: set[str] = set()

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        used.add(key)
        value = hf.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{where}: missing required field '{key}'")
            return defaults.get(key, default)
        return value

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{where}: field '{key}' = {hf.get(key)!r}: {why}")

    num_heads = get("num_attention_heads", required=True)
    hidden = get("hidden_size", required=True)
    out: dict[str, Any] = {
        "vocab_size": get("vocab_size", required=True),
        "hidden_size": hidden,
        "intermediate_size": get("intermediate_size", required=True),
        "num_layers": get("num_hidden_layers", required=True),
        "num_heads": num_heads,
        "num_kv_heads": get("num_key_value_heads") or num_heads,
        "head_dim": get("head_dim") or hidden // num_heads,
        "rms_norm_eps": float(get("rms_norm_eps")),
        "tie_embeddings": bool(get("tie_word_embeddings")),
        "qk_norm": family == "qwen3",
        "norm_plus_one": family == "gemma",
        "scale_embeddings": family == "gemma",
        "mlp_bias": False,
        "attention_bias": family == "qwen2",
        "attention_out_bias": False,
        "sliding_window": None,
    }

    act = get("hidden_act")
    if family == "gemma":
        legacy = get("hidden_activation")  # transformers < 4.42 Gemma configs
        act = legacy or act
        if act == "gelu":  # transformers maps Gemma's legacy "gelu" to the tanh approximation
            act = "gelu_pytorch_tanh"
        if get("use_bidirectional_attention"):
            fail("use_bidirectional_attention", "bidirectional attention is not supported")
    if act not in _ACTIVATIONS:
        key = (
            "hidden_activation"
            if family == "gemma" and hf.get("hidden_activation")
            else "hidden_act"
        )
        fail(key, f"activation not supported (supported: {', '.join(_ACTIVATIONS)})")
    out["mlp_activation"] = _ACTIVATIONS[act]

    if family in ("llama", "qwen3", "gemma"):
        out["attention_bias"] = out["attention_out_bias"] = bool(get("attention_bias", False))
    if family == "llama":
        out["mlp_bias"] = bool(get("mlp_bias", False))

    dropout = get("attention_dropout", 0.0)
    if dropout:
        fail("attention_dropout", "dropout is not supported (must be 0)")

    out["sliding_window"] = _sliding_window(hf, family, out["num_layers"], get, fail)
    out["rope_theta"], out["rope_scaling"] = _rope(hf, get, fail, where)
    out["initializer_range"] = float(hf.get("initializer_range", 0.02))

    for key, value in hf.items():
        if key in used or value is None or is_metadata_key(key, value):
            continue
        raise ConfigError(
            f"{where}: field '{key}' = {value!r} is not supported by jaxalign's {family} import"
        )
    return out


def _sliding_window(hf: dict, family: str, num_layers: int, get, fail) -> int | None:
    if family == "mistral":
        get("layer_types")  # ignored by transformers' Mistral, which windows every layer
        get("sliding_window")
        return hf.get("sliding_window", 4096)
    if family not in ("qwen2", "qwen3"):
        return None
    use = bool(get("use_sliding_window", False))
    window = get("sliding_window", 4096) if use else None
    get("sliding_window")
    max_window_layers = get("max_window_layers", 28)
    layer_types = get("layer_types")
    if layer_types is None:
        layer_types = [
            "sliding_attention"
            if window is not None and i >= max_window_layers
            else "full_attention"
            for i in range(num_layers)
        ]
    if len(layer_types) != num_layers:
        fail("layer_types", f"expected {num_layers} entries")
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window is not None:
        return int(window)
    if window is None:
        fail("layer_types", "sliding attention layers without use_sliding_window")
    fail(
        "layer_types" if "layer_types" in hf else "max_window_layers",
        "a sliding window on only some layers is not supported (jaxalign's window is uniform)",
    )
    return None


# Keys that other tools write into config.json and that never change the function: the
# transformers.js export settings, nanotron's marker. `rope_interleaved` is accepted at its
# default only (interleaved rotary embeddings would be another architecture).
_TOOL_KEYS = {"transformers.js_config", "is_llama_config"}
_DEFAULT_ONLY = {"rope_interleaved": False}


def is_metadata_key(key: str, value: Any = None) -> bool:
    """True for config.json keys that describe rather than define the model: generic
    PreTrainedConfig keys, token ids (`*_token_id`, `*_token_ids`), private keys (`_...`, e.g.
    `_name_or_path`, `_model_name_or_path`) and other tools' settings. Everything else must be
    read by the import or refused."""
    if key in _IGNORED_KEYS or key in _TOOL_KEYS or key.startswith("_"):
        return True
    if key.endswith(("_token_id", "_token_ids")):
        return True
    return key in _DEFAULT_ONLY and value == _DEFAULT_ONLY[key]


def _rope(hf: dict, get, fail, where: str) -> tuple[float, dict | None]:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`
    # (which wins when both are present, as in transformers).
    legacy, current = get("rope_scaling"), get("rope_parameters")
    params = legacy or current or {}
    key = "rope_scaling" if legacy else "rope_parameters"
    if not isinstance(params, dict):
        fail(key, "expected a mapping")
    theta = params.get("rope_theta", get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    known = {"rope_theta", "rope_type", "type"}
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": float(
                params.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings", 2048)
            ),
        }
        known |= set(scaling)
    else:
        raise ConfigError(
            f"{where}: field '{key}.rope_type' = {rope_type!r} is not supported "
            "(supported: default, llama3)"
        )
    for name, value in params.items():
        if (
            name not in known
            and value is not None
            and not (name == "partial_rotary_factor" and value == 1.0)
        ):
            raise ConfigError(f"{where}: field '{key}.{name}' = {value!r} is not supported")
    return float(theta), scaling


def model_config_from_hf(
    source: str | os.PathLike | dict, base: ModelConfig | None = None
) -> ModelConfig:
    """A ModelConfig whose architecture comes from a Hugging Face config (a model directory,
    its config.json, or the parsed dict); run settings (dtypes, remat, scan) come from `base`."""
    where = "config.json"
    if not isinstance(source, dict):
        where = str(Path(source) / "config.json" if Path(source).is_dir() else source)
        source = read_hf_config(source)
    fields = hf_arch_fields(source, where)
    return dataclasses.replace(base or ModelConfig(), **fields)


# ---------------------------------------------------------------------------------------------
# Export: ModelConfig -> config.json


def infer_family(cfg: ModelConfig) -> str:
    """The Hugging Face family that can express `cfg` (checked by `hf_config_from_model`)."""
    if cfg.norm_plus_one or cfg.scale_embeddings:
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.attention_bias and not cfg.attention_out_bias:
        return "qwen2"
    if cfg.sliding_window is not None and not (cfg.attention_bias or cfg.mlp_bias):
        return "mistral"
    return "llama"


def _arch(cfg: ModelConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, dict):  # fields a family's import leaves out keep ModelConfig's defaults
        defaults = ModelConfig()
        values = {k: cfg[k] if k in cfg else getattr(defaults, k) for k in ARCH_FIELDS}
    else:
        values = {k: getattr(cfg, k) for k in ARCH_FIELDS}
    values = dict(values)
    if not isinstance(cfg, dict):
        values["head_dim"] = cfg.resolved_head_dim
    scaling = values.get("rope_scaling")
    if scaling is not None:
        values["rope_scaling"] = {k: float(v) for k, v in scaling.items()}
    return {k: values[k] for k in ARCH_FIELDS}


def hf_config_from_model(
    cfg: ModelConfig,
    family: str | None = None,
    *,
    architecture: str = "ForCausalLM",
    extra: dict | None = None,
) -> dict:
    """A Hugging Face config.json dict for `cfg`; ConfigError naming the fields that `family`
    (default: `infer_family(cfg)`) cannot express."""
    if cfg.family in GEMMA_MODEL_TYPES:
        return gemma_config_to_hf(cfg, family, architecture=architecture, extra=extra)
    family = family or infer_family(cfg)
    if family in GEMMA_FAMILIES:
        raise ConfigError(
            f"cannot export model.family '{cfg.family}' as Hugging Face {family}: "
            f"set model.family to {GEMMA_FAMILIES[family]}"
        )
    if family not in ARCHITECTURES:
        raise ConfigError(
            f"unknown Hugging Face family {family!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    hidden_act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp_activation]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family] + architecture],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "max_position_embeddings": 8192,
        "rope_parameters": rope,
        # The same RoPE settings in the format transformers < 5 reads.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
        "attention_dropout": 0.0,
        "dtype": cfg.param_dtype,
    }
    if family in ("llama", "qwen3", "gemma"):
        hf["attention_bias"] = cfg.attention_bias
    if family == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if family in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        hf.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window is not None else cfg.num_layers,
            layer_types=[
                ("sliding_attention" if window is not None else "full_attention")
                for _ in range(cfg.num_layers)
            ],
        )
    hf.update(extra or {})
    _check_round_trip(family, got=_arch(hf_arch_fields(hf, f"export as {family}")), want=_arch(cfg))
    return hf


def _check_round_trip(family: str, *, got: dict[str, Any], want: dict[str, Any]) -> None:
    """ConfigError naming the model fields (`want`) that the exported config.json, imported back
    (`got`), does not reproduce: what Hugging Face `family` cannot express."""
    diff = [k for k in want if got[k] != want[k]]
    if diff:
        fields = ", ".join(f"model.{k}={want[k]!r}" for k in diff)
        raise ConfigError(
            f"cannot export as Hugging Face {family}: {fields} has no equivalent in that family"
        )


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor <-> one jaxalign parameter (path into the params dict).

    `to_jax` / `to_hf` are NumPy view transforms (transposes and reshapes, no copies), so the
    importer can slice a memory-mapped tensor without reading all of it.
    """

    hf_name: str
    path: tuple
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def tensor_maps(cfg: ModelConfig, *, reward: bool = False) -> list[TensorMap]:
    """Every tensor of the Hugging Face checkpoint for `cfg`, in checkpoint order.

    `reward`: the layout of `jaxalign.models.reward.RewardModel` (params under `backbone`, a [D]
    `score`) as a one-label `*ForSequenceClassification` checkpoint (`score.weight` [1, D], no
    lm_head).
    """
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    maps = [TensorMap("model.embed_tokens.weight", ("embed",), (v, d), _identity, _identity)]

    def in_heads(n):  # [n*hd, D] <-> [D, n, hd]
        return (lambda w: w.T.reshape(d, n, hd), lambda x: x.reshape(d, n * hd).T)

    def bias_heads(n):  # [n*hd] <-> [n, hd]
        return (lambda b: b.reshape(n, hd), lambda x: x.reshape(n * hd))

    heads_out = (lambda w: w.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        blk = ("blocks", i)

        def add(name, path, shape, fns=(_identity, _identity), pre=pre, blk=blk):
            maps.append(TensorMap(pre + name, blk + path, shape, *fns))

        add("input_layernorm.weight", ("attn_norm",), (d,))
        for proj, n in (("q", h), ("k", kv), ("v", kv)):
            add(f"self_attn.{proj}_proj.weight", ("attn", f"w{proj}"), (n * hd, d), in_heads(n))
            if cfg.attention_bias:
                add(f"self_attn.{proj}_proj.bias", ("attn", f"b{proj}"), (n * hd,), bias_heads(n))
        add("self_attn.o_proj.weight", ("attn", "wo"), (d, h * hd), heads_out)
        if cfg.attention_out_bias:
            add("self_attn.o_proj.bias", ("attn", "bo"), (d,))
        if cfg.qk_norm:
            add("self_attn.q_norm.weight", ("attn", "q_norm"), (hd,))
            add("self_attn.k_norm.weight", ("attn", "k_norm"), (hd,))
        add("post_attention_layernorm.weight", ("mlp_norm",), (d,))
        for proj, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            add(f"mlp.{proj}_proj.weight", ("mlp", f"w_{proj}"), shape, (_transpose, _transpose))
            if cfg.mlp_bias:
                add(f"mlp.{proj}_proj.bias", ("mlp", f"b_{proj}"), shape[:1])
    maps.append(TensorMap("model.norm.weight", ("final_norm",), (d,), _identity, _identity))
    if reward:
        maps = [dataclasses.replace(m, path=("backbone", *m.path)) for m in maps]
        maps.append(
            TensorMap("score.weight", ("score",), (1, d), lambda w: w[0], lambda x: x[None])
        )
    elif not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), _transpose, _transpose))
    return maps


# Tensors some checkpoints carry that are not parameters (recomputed RoPE buffers).
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)


def resolve_from_hf(model: ModelConfig, explicit: dict, where: str = "config") -> ModelConfig:
    """`model` with its architecture fields taken from `model.from_hf`'s config.json.

    A field the user set explicitly (`explicit`: the raw `model:` mapping) must agree with the
    Hugging Face config; ConfigError naming it otherwise.
    """
    resolved = model_config_from_hf(model.from_hf, model)
    want, got = _arch(model), _arch(resolved)
    for key in ARCH_FIELDS:
        if key in explicit and want[key] != got[key]:
            raise ConfigError(
                f"{where}: model.{key}={want[key]!r} conflicts with "
                f"{model.from_hf}/config.json ({got[key]!r}); remove it"
            )
    return resolved


# The Llama family's entry in the model registry (jaxalign/models/llama.py) routes here.
LLAMA_CONVERTER = HFConverter(
    resolve_config=resolve_from_hf,
    config_from_hf=model_config_from_hf,
    config_to_hf=hf_config_from_model,
    tensor_maps=tensor_maps,
)


# ---------------------------------------------------------------------------------------------
# Mixture of experts: Qwen3-MoE and Mixtral (families `qwen3_moe` and `mixtral`, models/moe.py).
# Each is read as its dense sibling (qwen3, mistral) plus its MoE keys, so attention, norms and
# RoPE share the code above. Tensors are the per-expert layout transformers writes
# (`experts.{e}.gate_proj.weight`, Mixtral's `experts.{e}.w1/w3/w2.weight`); each maps to one
# expert's slice of a stacked [E, ...] parameter (a trailing expert index in `TensorMap.path`).

# model_type -> (its dense sibling, the architecture prefix, where the MoE MLP lives)
MOE_ARCHITECTURES = {
    "qwen3_moe": ("qwen3", "Qwen3Moe", "mlp"),
    "mixtral": ("mistral", "Mixtral", "block_sparse_moe"),
}
# Hugging Face class defaults for keys a config.json may omit.
_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "num_experts": 128,
    },
    "mixtral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "num_local_experts": 8,
        "router_jitter_noise": 0.0,
    },
}
MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "output_router_logits",
    "decoder_sparse_step",
    "mlp_only_layers",
)


def _moe_fields(hf: dict, where: str) -> dict[str, Any]:
    """ModelConfig fields (ARCH_FIELDS and MOE_FIELDS) of a qwen3_moe or mixtral config.json."""
    model_type = hf.get("model_type")
    if model_type not in MOE_ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a mixture of experts")
    dense_type, prefix, _ = MOE_ARCHITECTURES[model_type]
    defaults = _MOE_DEFAULTS[model_type]
    allowed = {f"{prefix}ForCausalLM", f"{prefix}ForSequenceClassification", f"{prefix}Model"}
    for arch in hf.get("architectures") or []:
        if arch not in allowed:
            raise ConfigError(
                f"{where}: architecture {arch!r} is not supported "
                f"(supported for {model_type}: {', '.join(sorted(allowed))})"
            )
    view = {k: v for k, v in hf.items() if k != "architectures"}
    view["model_type"] = dense_type

    def take(key: str) -> Any:
        value = view.pop(key, None)
        return defaults.get(key) if value is None else value

    out: dict[str, Any] = {}
    if model_type == "qwen3_moe":
        # transformers 5 writes num_local_experts, earlier versions num_experts
        experts = view.pop("num_experts", None)
        local = view.pop("num_local_experts", None)
        out["num_experts"] = experts or local or defaults["num_experts"]
        out["moe_intermediate_size"] = take("moe_intermediate_size")
        out["norm_topk_prob"] = bool(take("norm_topk_prob"))
        out["decoder_sparse_step"] = int(take("decoder_sparse_step"))
        out["mlp_only_layers"] = [int(i) for i in take("mlp_only_layers")]
    else:
        out["num_experts"] = take("num_local_experts")
        out["moe_intermediate_size"] = None  # Mixtral's experts are intermediate_size wide
        out["norm_topk_prob"] = True  # Mixtral always renormalizes
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = []
        if take("router_jitter_noise"):
            raise ConfigError(
                f"{where}: field 'router_jitter_noise' = {hf['router_jitter_noise']!r}: "
                "router noise is not supported (must be 0)"
            )
        view["sliding_window"] = take("sliding_window")
    out["num_experts_per_tok"] = int(take("num_experts_per_tok"))
    out["router_aux_loss_coef"] = float(take("router_aux_loss_coef"))
    out["output_router_logits"] = bool(take("output_router_logits"))
    for key in ("num_key_value_heads", "rms_norm_eps"):
        if view.get(key) is None:
            view[key] = defaults[key]
    if "rope_theta" in defaults and not (view.get("rope_parameters") or view.get("rope_theta")):
        view["rope_theta"] = defaults["rope_theta"]
    if model_type == "qwen3_moe" and view.get("intermediate_size") is None:
        view["intermediate_size"] = 6144  # only the dense layers (mlp_only_layers) use it
    return {**hf_arch_fields(view, where), **out}


def moe_config_from_hf(
    source: str | os.PathLike | dict, base: ModelConfig | None = None
) -> ModelConfig:
    """`model_config_from_hf` for a qwen3_moe or mixtral config (family set from model_type)."""
    where = "config.json"
    if not isinstance(source, dict):
        where = str(Path(source) / "config.json" if Path(source).is_dir() else source)
        source = read_hf_config(source)
    fields = _moe_fields(source, where)
    return dataclasses.replace(base or ModelConfig(), family=source["model_type"], **fields)


def _moe_arch(cfg: ModelConfig) -> dict[str, Any]:
    values = _arch(cfg)
    values.update({k: getattr(cfg, k) for k in MOE_FIELDS})
    values["moe_intermediate_size"] = cfg.resolved_moe_intermediate_size
    values["mlp_only_layers"] = sorted(values["mlp_only_layers"])
    return values


def moe_config_to_hf(
    cfg: ModelConfig,
    family: str | None = None,
    *,
    architecture: str = "ForCausalLM",
    extra: dict | None = None,
) -> dict:
    """The config.json dict of a qwen3_moe or mixtral model; ConfigError naming the fields the
    family cannot express."""
    model_type = family or cfg.family
    if model_type not in MOE_ARCHITECTURES:
        raise ConfigError(
            f"cannot export model.family '{cfg.family}' as Hugging Face {model_type!r} "
            f"(supported: {', '.join(MOE_ARCHITECTURES)})"
        )
    dense_type, prefix, _ = MOE_ARCHITECTURES[model_type]
    hf = hf_config_from_model(cfg, dense_type, architecture=architecture)
    hf.update(
        model_type=model_type,
        architectures=[prefix + architecture],
        num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=cfg.output_router_logits,
    )
    if model_type == "qwen3_moe":
        hf.update(
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.resolved_moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
        )
    else:
        hf.update(num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
    hf.update(extra or {})
    _check_round_trip(model_type, got=_moe_arch(moe_config_from_hf(hf, cfg)), want=_moe_arch(cfg))
    return hf


def moe_tensor_maps(cfg: ModelConfig, *, reward: bool = False) -> list[TensorMap]:
    """`tensor_maps` with each MoE layer's MLP replaced by its router and per-expert tensors."""
    _, _, where = MOE_ARCHITECTURES[cfg.family]
    d, f = cfg.hidden_size, cfg.resolved_moe_intermediate_size
    names = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
    gate, up, down = names[cfg.family]
    maps = []
    for m in tensor_maps(cfg, reward=reward):
        parts = m.hf_name.split(".")
        if ".mlp." not in m.hf_name or not cfg.is_moe_layer(int(parts[2])):
            maps.append(m)
            continue
        if not m.hf_name.endswith("mlp.gate_proj.weight"):
            continue  # one MoE layer's maps are added once, in place of its gate_proj
        pre = ".".join(parts[:3]) + f".{where}."
        blk = m.path[: m.path.index("mlp")]
        maps.append(
            TensorMap(
                pre + "gate.weight",
                (*blk, "mlp", "router"),
                (cfg.num_experts, d),
                _transpose,
                _transpose,
            )
        )
        for e in range(cfg.num_experts):
            for hf_proj, param_name, shape in (
                (gate, "w_gate", (f, d)),
                (up, "w_up", (f, d)),
                (down, "w_down", (d, f)),
            ):
                maps.append(
                    TensorMap(
                        f"{pre}experts.{e}.{hf_proj}.weight",
                        (*blk, "mlp", param_name, e),
                        shape,
                        _transpose,
                        _transpose,
                    )
                )
    return maps


def resolve_moe_from_hf(model: ModelConfig, explicit: dict, where: str = "config") -> ModelConfig:
    """`resolve_from_hf` for the MoE families: architecture and MoE fields from config.json;
    explicit fields must agree."""
    resolved = moe_config_from_hf(model.from_hf, model)
    want, got = _moe_arch(model), _moe_arch(resolved)
    for key in want:
        if key in explicit and want[key] != got[key]:
            raise ConfigError(
                f"{where}: model.{key}={want[key]!r} conflicts with "
                f"{model.from_hf}/config.json ({got[key]!r}); remove it"
            )
    return resolved


QWEN3_MOE_CONVERTER = MIXTRAL_CONVERTER = HFConverter(
    resolve_config=resolve_moe_from_hf,
    config_from_hf=moe_config_from_hf,
    config_to_hf=moe_config_to_hf,
    tensor_maps=moe_tensor_maps,
)
# --- end mixture of experts -------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Gemma 2 / Gemma 3 (text): HF model_type gemma2 / gemma3_text <-> jaxalign family gemma2 / gemma3

GEMMA_MODEL_TYPES = {v: k for k, v in GEMMA_FAMILIES.items()}  # family -> HF model_type

# Hugging Face class defaults (Gemma2Config, Gemma3TextConfig) for keys a config.json omits.
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window_pattern": 2,
        "rope_theta": 10000.0,
    },
    "gemma3_text": {
        "num_key_value_heads": 4,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
}
# Keys of these configs that never change the function (KV-cache and tooling settings).
_GEMMA_METADATA = {"cache_implementation", "_sliding_window_pattern", "rope_local_base_freq"}


def gemma_arch_fields(hf: dict, where: str = "config.json") -> dict[str, Any]:
    """ModelConfig architecture fields (with `family`) of a gemma2 / gemma3_text config dict.

    A key present with null keeps null (Gemma 2's soft-caps can be switched off that way); a
    missing key takes the transformers class default.
    """
    model_type = hf_family(hf, where)
    defaults = _GEMMA_DEFAULTS[model_type]
    used: set[str] = set()

    def get(key: str, *, required: bool = False) -> Any:
        used.add(key)
        if key in hf:
            return hf[key]
        if required:
            raise ConfigError(f"{where}: missing required field '{key}'")
        return defaults.get(key)

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{where}: field '{key}' = {hf.get(key)!r}: {why}")

    num_layers = get("num_hidden_layers", required=True)
    num_heads = get("num_attention_heads", required=True)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or defaults["hidden_activation"]
    used |= {"hidden_activation", "hidden_act"}
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        fail("hidden_activation", "activation not supported (supported: gelu_pytorch_tanh)")
    if get("use_bidirectional_attention"):
        fail("use_bidirectional_attention", "bidirectional attention is not supported")
    if get("attention_dropout"):
        fail("attention_dropout", "dropout is not supported (must be 0)")
    bias = bool(get("attention_bias"))
    pattern = get("sliding_window_pattern")
    layer_types = get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    ]
    if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        fail("layer_types", f"expected {num_layers} of sliding_attention / full_attention")
    window = get("sliding_window")
    theta, local_theta, linear = _gemma_rope(hf, model_type, get, where)

    def cap(key: str) -> float | None:
        value = get(key)
        return None if value is None else float(value)

    out: dict[str, Any] = {
        "family": GEMMA_FAMILIES[model_type],
        "vocab_size": get("vocab_size", required=True),
        "hidden_size": get("hidden_size", required=True),
        "intermediate_size": get("intermediate_size", required=True),
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": get("num_key_value_heads") or num_heads,
        "head_dim": get("head_dim"),
        "rope_theta": theta,
        "rope_scaling": None,
        "rms_norm_eps": float(get("rms_norm_eps")),
        "tie_embeddings": bool(get("tie_word_embeddings")),
        "qk_norm": model_type == "gemma3_text",
        "attention_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": False,
        "mlp_activation": "gelu_tanh",
        "norm_plus_one": True,
        "scale_embeddings": True,
        "sliding_window": None if window is None else int(window),
        "layer_types": list(layer_types),
        "rope_local_theta": local_theta,
        "rope_linear_factor": linear,
        "attn_logit_softcap": cap("attn_logit_softcapping"),
        "final_logit_softcap": cap("final_logit_softcapping"),
        "query_pre_attn_scalar": float(get("query_pre_attn_scalar")),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }
    for key, value in hf.items():
        if key in used or key in _GEMMA_METADATA or value is None or is_metadata_key(key, value):
            continue
        raise ConfigError(
            f"{where}: field '{key}' = {value!r} is not supported by jaxalign's {model_type} import"
        )
    return out


def _gemma_rope(hf: dict, model_type: str, get, where: str):
    """(rope_theta, rope_local_theta, rope_linear_factor) of a Gemma config: transformers >= 5
    writes `rope_parameters` (Gemma 3: one mapping per layer type), older configs `rope_theta`,
    `rope_local_base_freq` and `rope_scaling` (Gemma 3's global layers)."""
    params = get("rope_parameters") or {}
    legacy_scaling = get("rope_scaling")
    if model_type == "gemma2":
        full, local = params, None
    else:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        full.setdefault("rope_theta", get("rope_theta"))
        local.setdefault("rope_theta", get("rope_local_base_freq"))
        _gemma_rope_type(local, "rope_parameters.sliding_attention", where, linear_ok=False)
    if legacy_scaling:
        full = {**full, **legacy_scaling}
    theta = float(full.get("rope_theta") or get("rope_theta"))
    key = "rope_parameters.full_attention" if model_type != "gemma2" else "rope_parameters"
    linear = _gemma_rope_type(full, key, where, linear_ok=model_type != "gemma2")
    return theta, None if local is None else float(local["rope_theta"]), linear


def _gemma_rope_type(params: dict, key: str, where: str, *, linear_ok: bool) -> float | None:
    """The linear factor of one RoPE mapping (None: default RoPE); ConfigError for other types."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    supported = ("default", "linear") if linear_ok else ("default",)
    if rope_type not in supported:
        raise ConfigError(
            f"{where}: field '{key}.rope_type' = {rope_type!r} is not supported "
            f"(supported: {', '.join(supported)})"
        )
    known = {"rope_theta", "rope_type", "type"} | ({"factor"} if rope_type == "linear" else set())
    for name, value in params.items():
        if name not in known and value is not None:
            if name == "partial_rotary_factor" and value == 1.0:
                continue
            raise ConfigError(f"{where}: field '{key}.{name}' = {value!r} is not supported")
    return float(params["factor"]) if rope_type == "linear" else None


def gemma_config_to_hf(
    cfg: ModelConfig,
    family: str | None = None,
    *,
    architecture: str = "ForCausalLM",
    extra: dict | None = None,
) -> dict:
    """The gemma2 / gemma3_text config.json dict of a gemma2 / gemma3 ModelConfig; ConfigError
    naming the fields the family cannot express."""
    model_type = GEMMA_MODEL_TYPES[cfg.family]
    if family is not None and family != model_type:
        raise ConfigError(
            f"cannot export model.family '{cfg.family}' as Hugging Face {family} "
            f"(it exports as {model_type})"
        )
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type] + architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.resolved_head_dim),
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
        "attn_logit_softcapping": cfg.attn_logit_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "max_position_embeddings": 8192 if model_type == "gemma2" else 131072,
        "dtype": cfg.param_dtype,
    }
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_linear_factor is not None:
        full = {
            "rope_type": "linear",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_linear_factor,
        }
    if model_type == "gemma2":
        hf["rope_parameters"] = full
    else:
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        local_rope = {"rope_type": "default", "rope_theta": local}
        hf["rope_parameters"] = {"full_attention": full, "sliding_attention": local_rope}
    hf.update(extra or {})
    got = _arch(gemma_arch_fields(hf, f"export as {model_type}"))
    _check_round_trip(model_type, got=got, want=_arch(_gemma_explicit(cfg)))
    return hf


def _int_if_whole(x: float) -> float | int:
    """transformers' Gemma configs type query_pre_attn_scalar as int."""
    return int(x) if float(x).is_integer() else x


def _gemma_explicit(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the defaults a config.json spells out written out: the score scalar (head_dim),
    every layer's type, and Gemma 3's local RoPE base (rope_theta, when nothing scales it)."""
    local = cfg.rope_local_theta
    if cfg.family == "gemma3" and local is None and cfg.rope_linear_factor is None:
        local = cfg.rope_theta
    return dataclasses.replace(
        cfg,
        query_pre_attn_scalar=float(cfg.query_pre_attn_scalar or cfg.resolved_head_dim),
        layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
        rope_local_theta=local,
    )


def gemma_tensor_maps(cfg: ModelConfig, *, reward: bool = False) -> list[TensorMap]:
    """Llama's tensor maps with Gemma's four norms per layer: `post_attention_layernorm`
    normalizes the attention output (`post_attn_norm`), `pre_feedforward_layernorm` and
    `post_feedforward_layernorm` surround the MLP (`mlp_norm`, `post_mlp_norm`)."""
    maps = []
    for m in tensor_maps(cfg, reward=reward):
        if not m.hf_name.endswith("post_attention_layernorm.weight"):
            maps.append(m)
            continue
        pre, path = m.hf_name[: -len("post_attention_layernorm.weight")], m.path[:-1]
        for name, leaf in (
            ("post_attention_layernorm", "post_attn_norm"),
            ("pre_feedforward_layernorm", "mlp_norm"),
            ("post_feedforward_layernorm", "post_mlp_norm"),
        ):
            maps.append(dataclasses.replace(m, hf_name=f"{pre}{name}.weight", path=(*path, leaf)))
    return maps


GEMMA2_CONVERTER = HFConverter(
    resolve_config=resolve_from_hf,
    config_from_hf=model_config_from_hf,
    config_to_hf=gemma_config_to_hf,
    tensor_maps=gemma_tensor_maps,
)
GEMMA3_CONVERTER = GEMMA2_CONVERTER  # one converter: the config's family picks the model_type
# --- end Gemma 2 / Gemma 3 ---------------------------------------------------------------------
