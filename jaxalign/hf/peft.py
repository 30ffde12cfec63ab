"""LoRA adapters in the Hugging Face PEFT format, both ways, and merging them into the base.

    write_peft_adapter("out/", params, model_cfg, lora_cfg)   # adapter_config.json + safetensors
    adapters, lora_cfg = read_peft_adapter("out/", model_cfg)  # our layout, as numpy
    merged = merge_lora(params, lora_cfg)                      # W + scale * A @ B, no adapters

`peft.PeftModel.from_pretrained(transformers_model, "out/")` loads what `write_peft_adapter`
writes. Module names and layouts come from the family's Hugging Face converter
(`models.ModelFamily.hf.tensor_maps`): an adapted weight's tensor `model.layers.3.self_attn.
q_proj.weight` gives the keys `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
([r, in]) and `...lora_B.weight` ([out, r]), and the order in which the converter lays out the
weight's input and output features is the order of A's columns and B's rows. Our adapters are
`<weight>_lora_a` (in_shape + (r,)) and `<weight>_lora_b` ((r,) + out_shape) beside the weight,
with a leading layers axis under `scan_layers` (docs/lora.md). An embedding's adapter (A
[vocab, r] looked up, B [r, D]) is PEFT's `lora_embedding_A` [r, vocab] / `lora_embedding_B`
[D, r]. A reward model's score head (it trains with the adapters) goes in `modules_to_save`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding as shd
from jaxalign.config import ModelConfig
from jaxalign.errors import ConfigError
from jaxalign.hf.convert import TensorMap
from jaxalign.models.lora_config import LoraConfig
from jaxalign.models.registry import get_family

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_A, LORA_B = "_lora_a", "_lora_b"
# Parameters that are looked up rather than multiplied (the Transformer's `embed`).
EMBEDDINGS = ("embed",)
# Reward-model parameters outside the backbone that train with the adapters: PEFT's
# `modules_to_save`, stored under their Hugging Face module name.
RM_HEADS = ("score",)


@dataclass(frozen=True)
class _Adapted:
    """One adapted weight of one layer: where its adapter is, and its PEFT names."""

    map: TensorMap
    stacked_path: tuple  # path of the base weight in the params (no layer index when stacked)
    layer: int | None  # index into the leading layers axis when stacked
    module: str  # Hugging Face module path, e.g. model.layers.0.self_attn.q_proj
    embedding: bool

    def keys(self) -> tuple[str, str]:
        if self.embedding:
            return (
                f"{PREFIX}{self.module}.lora_embedding_A",
                f"{PREFIX}{self.module}.lora_embedding_B",
            )
        return f"{PREFIX}{self.module}.lora_A.weight", f"{PREFIX}{self.module}.lora_B.weight"


def _tensor_maps(model_cfg: ModelConfig, reward: bool) -> list[TensorMap]:
    family = get_family(model_cfg.family)
    if family.hf is None:
        raise ConfigError(f"model.family '{family.name}' has no Hugging Face conversion")
    return family.hf.tensor_maps(model_cfg, reward=reward)


def _stacked(path: tuple, stacked: bool) -> tuple[tuple, int | None]:
    """('blocks', 3, 'attn', 'wq') -> (('blocks', 'attn', 'wq'), 3) when stacked."""
    if not stacked or "blocks" not in path:
        return path, None
    at = path.index("blocks") + 1
    return (*path[:at], *path[at + 1 :]), path[at]


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _adapted(maps: list[TensorMap], has_adapter, stacked: bool) -> list[_Adapted]:
    out = []
    for m in maps:
        if not m.hf_name.endswith(".weight"):
            continue
        path, layer = _stacked(m.path, stacked)
        if has_adapter(path):
            module = m.hf_name[: -len(".weight")]
            out.append(_Adapted(m, path, layer, module, m.path[-1] in EMBEDDINGS))
    return out


def _sibling(path: tuple, suffix: str) -> tuple:
    return (*path[:-1], path[-1] + suffix)


def hf_feature_orders(m: TensorMap, shape: tuple[int, ...], n_in: int) -> tuple:
    """How the converter lays out a weight of our `shape` (first `n_in` dims contract) as
    Hugging Face's [out, in]: (our flattened input index of each HF column, our flattened output
    index of each HF row). Read by passing index grids through `m.to_hf`."""
    n_out = len(shape) - n_in
    in_size, out_size = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    inputs = np.arange(in_size, dtype=np.int32).reshape(*shape[:n_in], *(1,) * n_out)
    outputs = np.arange(out_size, dtype=np.int32).reshape(*(1,) * n_in, *shape[n_in:])
    hf_in = m.to_hf(np.broadcast_to(inputs, shape))
    hf_out = m.to_hf(np.broadcast_to(outputs, shape))
    if hf_in.shape != (out_size, in_size):
        raise ConfigError(f"{m.hf_name}: not an [out, in] projection; LoRA cannot target it")
    return np.asarray(hf_in[0]), np.asarray(hf_out[:, 0])


def _scale(lora_cfg) -> float:
    return lora_cfg.alpha / (math.sqrt(lora_cfg.rank) if lora_cfg.rslora else lora_cfg.rank)


def _target_modules(adapted: list[_Adapted], maps: list[TensorMap]) -> list[str] | str:
    """PEFT's target_modules: module-name suffixes when every module with that suffix is
    adapted (the usual case), else a regex naming exactly the adapted modules."""
    names = {a.module for a in adapted}
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    every = {m.hf_name[: -len(".weight")] for m in maps if m.hf_name.endswith(".weight")}
    if all(n in names for n in every if n.rsplit(".", 1)[-1] in suffixes):
        return suffixes
    return "|".join(re.escape(n) for n in sorted(names))


def write_peft_adapter(
    out_dir: str | os.PathLike,
    params_with_adapters: dict,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (float32) for the adapters in
    `params_with_adapters` (a language model's params, or a reward model's {backbone, score}:
    then task_type SEQ_CLS with the score head in `modules_to_save`). Returns the directory."""
    from safetensors.numpy import save_file

    reward = "backbone" in params_with_adapters
    maps = _tensor_maps(model_cfg, reward)
    stacked = model_cfg.scan_layers

    def has_adapter(path):
        return _get(params_with_adapters, _sibling(path, LORA_A)) is not None

    adapted = _adapted(maps, has_adapter, stacked)
    if not adapted:
        raise ConfigError("write_peft_adapter: the parameters hold no LoRA adapters")
    host: dict[tuple, np.ndarray] = {}

    def fetch(path):
        if path not in host:
            host[path] = np.asarray(shd.host_array(_get(params_with_adapters, path)), np.float32)
        return host[path]

    tensors: dict[str, np.ndarray] = {}
    orders: dict[tuple, tuple] = {}
    for a in adapted:
        lora_a, lora_b = (fetch(_sibling(a.stacked_path, s)) for s in (LORA_A, LORA_B))
        if a.layer is not None:
            lora_a, lora_b = lora_a[a.layer], lora_b[a.layer]
        key_a, key_b = a.keys()
        rank = lora_a.shape[-1]
        if a.embedding:  # ours: A [V, r], B [r, D]; PEFT: A [r, V], B [D, r]
            tensors[key_a], tensors[key_b] = lora_a.T, lora_b.T
            continue
        n_in = lora_a.ndim - 1
        shape = (*lora_a.shape[:-1], *lora_b.shape[1:])
        cache_key = (re.sub(r"\.\d+\.", ".#.", a.map.hf_name), shape)
        if cache_key not in orders:
            orders[cache_key] = hf_feature_orders(a.map, shape, n_in)
        in_order, out_order = orders[cache_key]
        tensors[key_a] = lora_a.reshape(-1, rank)[in_order].T
        tensors[key_b] = lora_b.reshape(rank, -1)[:, out_order].T
    modules_to_save = None
    if reward:
        modules_to_save = []
        for m in maps:
            if m.path[-1] in RM_HEADS:
                tensors[PREFIX + m.hf_name] = np.asarray(
                    m.to_hf(np.asarray(shd.host_array(_get(params_with_adapters, m.path)))),
                    np.float32,
                )
                modules_to_save.append(m.hf_name.rsplit(".", 1)[0])
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "r": int(lora_cfg.rank),
        "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "use_rslora": bool(lora_cfg.rslora),
        "target_modules": _target_modules(adapted, maps),
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    out = Path(out_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(contiguous, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


# Settings whose non-default values PEFT's LoRA supports but our adapters cannot express.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
}


def read_peft_adapter(directory: str | os.PathLike, model_cfg: ModelConfig) -> tuple:
    """(adapters, lora_cfg): the PEFT LoRA adapter in `directory` for a model of `model_cfg`,
    as a nested dict of float32 NumPy arrays at our parameter paths (`<weight>_lora_a` and
    `_lora_b`; stacked under `model_cfg.scan_layers`; under 'backbone' plus the score head for a
    SEQ_CLS adapter), and the `LoraConfig` it implies (`targets` names the adapted weights).
    A directory that does not fit is a ConfigError naming the file and key."""
    from safetensors import safe_open

    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ConfigError(f"{file}: not found (a PEFT adapter directory holds {file.name})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{config_file}: 'peft_type' is {config.get('peft_type')!r}, not 'LORA'")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None):
            raise ConfigError(
                f"{config_file}: '{key}' = {config[key]!r} is not supported (only {default!r})"
            )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise ConfigError(f"{config_file}: '{key}' must be a positive number")
    rank = int(config["r"])
    reward = config.get("task_type") == "SEQ_CLS"
    maps = _tensor_maps(model_cfg, reward)
    stacked = model_cfg.scan_layers
    with safe_open(str(weights_file), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)

    candidates = _adapted(maps, lambda path: True, False)  # every weight that could have one
    used: set[str] = set()
    per_path: dict[tuple, dict[int | None, tuple]] = {}
    for a in candidates:
        key_a, key_b = a.keys()
        if key_a not in tensors and key_b not in tensors:
            continue
        for key in (key_a, key_b):
            if key not in tensors:
                raise ConfigError(f"{weights_file}: tensor '{key}' is missing")
        lora_a, lora_b = tensors[key_a].astype(np.float32), tensors[key_b].astype(np.float32)
        used.update((key_a, key_b))
        hf_out, hf_in = a.map.hf_shape
        if a.embedding:  # hf_shape [V, D]
            want_a, want_b = (rank, hf_out), (hf_in, rank)
        else:
            want_a, want_b = (rank, hf_in), (hf_out, rank)
        for key, array, want in ((key_a, lora_a, want_a), (key_b, lora_b, want_b)):
            if array.shape != want:
                raise ConfigError(
                    f"{weights_file}: tensor '{key}' has shape {array.shape}, expected {want} "
                    "from the model config and r"
                )
        path, layer = _stacked(a.map.path, stacked)
        if a.embedding:
            ours = (lora_a.T, lora_b.T)
        else:
            shape = a.map.to_jax(np.broadcast_to(np.int8(0), a.map.hf_shape)).shape
            n_in = _n_in(a.map, shape)
            in_order, out_order = hf_feature_orders(a.map, shape, n_in)
            flat_a = np.empty((len(in_order), rank), np.float32)
            flat_a[in_order] = lora_a.T
            flat_b = np.empty((rank, len(out_order)), np.float32)
            flat_b[:, out_order] = lora_b.T
            ours = (flat_a.reshape(*shape[:n_in], rank), flat_b.reshape(rank, *shape[n_in:]))
        per_path.setdefault(path, {})[layer] = ours
    adapters: dict = {}
    for m in maps:
        if m.path[-1] in RM_HEADS and reward:
            key = PREFIX + m.hf_name
            if key not in tensors:
                raise ConfigError(f"{weights_file}: tensor '{key}' (the score head) is missing")
            if tensors[key].shape != m.hf_shape:
                raise ConfigError(
                    f"{weights_file}: tensor '{key}' has shape {tensors[key].shape}, "
                    f"expected {m.hf_shape}"
                )
            _put(adapters, m.path, m.to_jax(tensors[key].astype(np.float32)))
            used.add(key)
    unexpected = sorted(k for k in tensors if k not in used and ".base_layer." not in k)
    if unexpected:
        raise ConfigError(
            f"{weights_file}: unexpected tensor '{unexpected[0]}' (no weight of this model "
            "config has that name)"
        )
    if not per_path:
        raise ConfigError(f"{weights_file}: holds no LoRA tensors for this model config")
    targets = []
    for path, layers in per_path.items():
        if stacked and None not in layers:
            missing = [i for i in range(model_cfg.num_layers) if i not in layers]
            if missing:
                module = _sibling(path, "")
                raise ConfigError(
                    f"{weights_file}: {'/'.join(map(str, module))} has adapters for some layers "
                    f"only (none for layer {missing[0]}); with model.scan_layers every layer needs "
                    "one"
                )
            pairs = [layers[i] for i in range(model_cfg.num_layers)]
            ours = tuple(np.stack([p[j] for p in pairs]) for j in (0, 1))
        else:
            (ours,) = layers.values()
        _put(adapters, _sibling(path, LORA_A), ours[0])
        _put(adapters, _sibling(path, LORA_B), ours[1])
        targets.append(_target_pattern(path, reward))
    lora_cfg = LoraConfig(
        rank=rank,
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora", False)),
        targets="|".join(sorted(set(targets))),
    )
    return adapters, lora_cfg


def _n_in(m: TensorMap, shape: tuple[int, ...]) -> int:
    """How many leading dims of our weight `shape` are its input, from the HF [out, in] shape."""
    hf_in = m.hf_shape[1]
    for n_in in range(1, len(shape)):
        if math.prod(shape[:n_in]) == hf_in and math.prod(shape[n_in:]) == m.hf_shape[0]:
            return n_in
    raise ConfigError(f"{m.hf_name}: not an [out, in] projection; LoRA cannot target it")


def _target_pattern(path: tuple, reward: bool) -> str:
    """The `model.lora.targets` alternative naming `path` (relative to the language model)."""
    parts = [str(p) for p in path if not (reward and p == "backbone")]
    return "/".join(re.escape(p) for p in parts)


def _put(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def merge_lora(params: dict, lora_cfg: LoraConfig) -> dict:
    """`params` with every adapter merged into its weight, W + scale * A @ B (float32 math, cast
    back to W's dtype; a quantized W is dequantized), and the adapter leaves dropped."""
    from jaxalign.models import quant

    scale = _scale(lora_cfg)

    def merge(tree):
        if not isinstance(tree, dict) or "codes" in tree:
            return tree
        out = {}
        for key, value in tree.items():
            if isinstance(key, str) and key.endswith((LORA_A, LORA_B)):
                continue
            a, b = tree.get(f"{key}{LORA_A}"), tree.get(f"{key}{LORA_B}")
            if a is None:
                out[key] = merge(value)
                continue
            quantized = isinstance(value, dict)
            w = quant.dequantize(value) if quantized else value
            lead = (a.ndim - 1) + (b.ndim - 1) - w.ndim  # the stacked layers axis, if any
            rank = a.shape[-1]
            a2 = a.astype(jnp.float32).reshape(*a.shape[:lead], -1, rank)
            b2 = b.astype(jnp.float32).reshape(*b.shape[:lead], rank, -1)
            delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * scale
            merged = w.astype(jnp.float32) + delta.reshape(w.shape)
            out[key] = merged if quantized else merged.astype(w.dtype)
        return out

    return merge(params)
