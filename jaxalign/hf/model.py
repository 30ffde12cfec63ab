"""`from_pretrained` / `save_pretrained`: Hugging Face model directories in and out.

model = jaxalign.hf.from_pretrained("path/to/Llama-3.2-1B", mesh=mesh)
logits = model(input_ids)                       # [batch, time, vocab]
jaxalign.hf.save_pretrained(model, "out/")      # transformers.AutoModelForCausalLM loads it
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.config import Config, MeshConfig, ModelConfig, ShardingConfig
from jaxalign.errors import ConfigError, UserError
from jaxalign.hf.convert import (
    _arch,
    hf_family,
    hf_model_family,
    read_hf_config,
)
from jaxalign.hf.io import SafetensorsCheckpoint, iter_hf_tensors, load_tensors, write_safetensors
from jaxalign.models.registry import HFConverter, build, get_family
from jaxalign.paths import copy_file, run_path

# Tokenizer (and generation) files copied from an imported model directory on export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class PretrainedModel:
    """A jaxalign model with its (sharded) params: `model(input_ids)` -> logits [B, T, V].

    A reward model (params with `backbone` and `score`) returns rewards [B] instead.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        mesh: Mesh,
        rules: shd.Rules | None = None,
        *,
        family: str | None = None,
        source: str | None = None,
    ):
        self.cfg = cfg
        self.params = params
        self.mesh = mesh
        self.rules = rules or shd.resolve_rules(ShardingConfig())
        self.family = family  # Hugging Face model_type it came from (export keeps it)
        self.source = source  # the directory it was imported from (tokenizer files)
        self.is_reward = "backbone" in params
        self._forward = None

    def _make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        if self.is_reward:
            from jaxalign.models.reward import RewardModel

            return RewardModel(self.cfg, rngs)
        return build(self.cfg, rngs)

    def __call__(self, input_ids: Any) -> jax.Array:
        """input_ids [B, T] int -> logits [B, T, V] (compute dtype); rewards [B] for a reward
        model."""
        if self._forward is None:
            graphdef = nnx.split(nnx.eval_shape(lambda: self._make_model(nnx.Rngs(0))))[0]
            mesh, rules, reward = self.mesh, self.rules, self.is_reward

            def forward(params, tokens):
                with shd.activation_sharding(mesh, rules):
                    model = nnx.merge(graphdef, params)
                    return model(tokens) if reward else model.logits(model(tokens))

            self._forward = jax.jit(forward)
        return self._forward(self.params, np.asarray(input_ids, np.int32))


def _converter(cfg: ModelConfig) -> HFConverter:
    """The Hugging Face hooks of `cfg.family` (ConfigError when it has none)."""
    family = get_family(cfg.family)
    if family.hf is None:
        raise ConfigError(f"model.family '{family.name}' has no Hugging Face conversion")
    return family.hf


def _hf_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: not a Hugging Face model directory")
    return p


def hf_model_dir(path: str | os.PathLike) -> Path | None:
    """`path` as a local Hugging Face model directory (config.json, no config.yaml), or None:
    then it is a jaxalign run directory or checkpoint. Every command that takes a model asks
    this."""
    if str(path).startswith(("gs://", "s3://")):  # imports are local (memory-mapped)
        return None
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return p
    return None


def is_sequence_classifier(path: str | os.PathLike) -> bool:
    """Whether the Hugging Face directory holds a `*ForSequenceClassification` checkpoint."""
    architectures = read_hf_config(path).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _num_labels(hf: dict) -> int:
    # transformers writes id2label rather than num_labels; its default is 2 labels.
    if isinstance(hf.get("id2label"), dict):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def chat_template_path(directory: str | os.PathLike) -> str:
    """`data.template` for a Hugging Face directory: its tokenizer_config.json when that holds a
    `chat_template` (it also names BOS/EOS), else its chat_template.jinja, else `plain`."""
    d = Path(directory)
    config = d / "tokenizer_config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get("chat_template"):
                return str(config)
        except (json.JSONDecodeError, AttributeError):
            pass  # the template loader reports a malformed file when it is named
    if (d / "chat_template.jinja").is_file():
        return str(d / "chat_template.jinja")
    return "plain"


def run_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    reward: bool = False,
    where: str | None = None,
) -> Config:
    """The run config that uses the Hugging Face directory `path` as a model: `model.from_hf`
    (architecture from config.json, parameter and compute dtype from its `torch_dtype` when
    that is float32 or bfloat16), `data.tokenizer` and `data.template` from the directory,
    then `overrides`. `reward`: the directory must be a one-label `*ForSequenceClassification`
    (`trainer: rm`); otherwise a causal LM. `where` (a flag or config key) starts errors."""
    from jaxalign.config import load_config

    directory = Path(path)
    name = f"{where}: {directory}" if where else str(directory)
    hf = read_hf_config(directory)
    classifier = is_sequence_classifier(directory)
    if reward and not classifier:
        archs = ", ".join(hf.get("architectures") or []) or "no architectures in config.json"
        raise UserError(
            f"{name}: not a reward model ({archs}); expected a *ForSequenceClassification "
            "with num_labels 1"
        )
    if reward and _num_labels(hf) != 1:
        raise UserError(
            f"{name}: a sequence classifier with {_num_labels(hf)} labels; a reward model "
            "has num_labels 1"
        )
    if classifier and not reward:
        raise UserError(
            f"{name}: a *ForSequenceClassification (a reward model), not a causal LM; "
            "use it with `jaxalign score` or as a reward model"
        )
    dtype = hf.get("torch_dtype", hf.get("dtype"))
    dtype = dtype if dtype in ("float32", "bfloat16") else "float32"
    base = {
        "trainer": "rm" if reward else "sft",
        "model": {"from_hf": str(directory), "param_dtype": dtype, "dtype": dtype},
        "data": {"tokenizer": str(directory), "template": chat_template_path(directory)},
    }
    return load_config(None, list(overrides or []), base=base)


def load_params(
    path: str | os.PathLike, cfg: ModelConfig, abstract_params: Any, shardings: Any
) -> dict:
    """Params of the Hugging Face model at `path`, streamed tensor by tensor straight into
    `shardings` (the layout of `abstract_params`: a Transformer's, scan-stacked or not, or a
    RewardModel's for a one-label `*ForSequenceClassification`).

    `cfg`'s architecture must match the directory's config.json (ConfigError naming the field).
    """
    directory = _hf_dir(path)
    expected = _converter(cfg).config_from_hf(directory, cfg)
    want, got = _arch(cfg), _arch(expected)
    diff = [k for k in want if want[k] != got[k]]
    if diff:
        raise ConfigError(
            f"{directory}: model.{diff[0]}={want[diff[0]]!r} differs from the "
            f"Hugging Face config ({got[diff[0]]!r})"
        )
    reward = "backbone" in abstract_params
    if reward and not is_sequence_classifier(directory):
        raise ConfigError(
            f"{directory}: not a *ForSequenceClassification; a reward model imports only those "
            "(start an RM run from a causal LM with init_from on a run that trained it)"
        )
    if not reward and is_sequence_classifier(directory):
        raise ConfigError(f"{directory}: a *ForSequenceClassification, not a causal LM")
    ckpt = SafetensorsCheckpoint(directory)
    maps = _converter(cfg).tensor_maps(cfg, reward=reward)
    if not (reward and "lm_head" in abstract_params["backbone"]):
        return load_tensors(ckpt, maps, abstract_params, shardings)
    # A sequence classifier has no LM head; the reward model never uses its backbone's: zeros.
    head = abstract_params["backbone"]["lm_head"]
    backbone = {k: v for k, v in abstract_params["backbone"].items() if k != "lm_head"}
    params = load_tensors(ckpt, maps, {**abstract_params, "backbone": backbone}, shardings)
    zeros = jax.jit(
        lambda: jnp.zeros(head.shape, head.dtype), out_shardings=shardings["backbone"]["lm_head"]
    )
    params["backbone"]["lm_head"] = zeros()
    return params


def from_pretrained(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    rules: shd.Rules | None = None,
    base: ModelConfig | None = None,
) -> PretrainedModel:
    """Import a local Hugging Face model directory (config.json + safetensors): a causal LM, or
    a one-label `*ForSequenceClassification` as a reward model.

    `mesh` (default: every device on the `fsdp` axis) and `rules` (default: the standard logical
    rules) decide each parameter's sharding; tensors are placed straight there. `dtype` sets both
    the parameter and the compute dtype; `base` supplies other run settings (e.g. scan_layers).
    """
    from jaxalign.models.params import build_model

    directory = _hf_dir(path)
    family = hf_family(read_hf_config(directory), str(directory / "config.json"))
    base = dataclasses.replace(
        base or ModelConfig(), param_dtype=dtype, dtype=dtype, family=hf_model_family(directory)
    )
    cfg = _converter(base).config_from_hf(directory, base)
    mesh = mesh if mesh is not None else shd.make_mesh(MeshConfig())
    rules = rules or shd.resolve_rules(ShardingConfig())
    make_model = None
    if is_sequence_classifier(directory):  # a reward model: PretrainedModel returns rewards
        from jaxalign.models.reward import RewardModel

        def make_model(rngs):
            return RewardModel(cfg, rngs)

    _, abstract, shardings = build_model(Config(model=cfg), mesh, rules, make_model)
    params = load_params(directory, cfg, abstract, shardings)
    return PretrainedModel(cfg, params, mesh, rules, family=family, source=str(directory))


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {}
    for key in ("bos", "eos", "pad"):
        value = getattr(tokenizer, f"{key}_id", None)
        if value is not None and value >= 0:
            ids[f"{key}_token_id"] = int(value)
    return ids


def save_pretrained(
    model: PretrainedModel | tuple[ModelConfig, dict],
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    family: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a Hugging Face model directory: config.json, safetensors (sharded above
    `max_shard_size`, with an index) and tokenizer files.

    `model`: a PretrainedModel or (ModelConfig, params). A reward model (params with `backbone`
    and `score`) is written as a one-label `*ForSequenceClassification`. `tokenizer`: a Hugging
    Face directory or tokenizer.json, or a SentencePiece .model (default: the files of the
    directory the model was imported from). `family` (default: the imported family, else the
    simplest one that expresses the config) picks model_type.
    """
    from jaxalign.data.tokenizer import load_tokenizer

    if isinstance(model, PretrainedModel):
        cfg, params = model.cfg, model.params
        family = family or model.family
        tokenizer = tokenizer if tokenizer is not None else model.source
    else:
        cfg, params = model
    reward = "backbone" in params
    out = run_path(path, key="output")
    main = jax.process_index() == 0
    tok = None
    if tokenizer is not None and not (
        Path(tokenizer).is_dir()
        and not any((Path(tokenizer) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    ):
        tok = load_tokenizer(str(tokenizer))
    extra: dict[str, Any] = {}
    source = Path(model.source) if isinstance(model, PretrainedModel) and model.source else None
    if source is not None and (source / "config.json").is_file():  # keep what inference reads
        original = read_hf_config(source)
        extra.update(
            {
                k: original[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
                if k in original
            }
        )
    extra.update(_special_token_ids(tok) if tok is not None else {})
    if reward:
        extra.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf = _converter(cfg).config_to_hf(
        cfg,
        family,
        architecture="ForSequenceClassification" if reward else "ForCausalLM",
        extra=extra,
    )
    maps = _converter(cfg).tensor_maps(cfg, reward=reward)
    dtype = np.dtype(jax.tree.leaves(params)[0].dtype)
    specs = [(m.hf_name, m.hf_shape, dtype) for m in maps]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    write_safetensors(
        out,
        iter_hf_tensors(params, maps, cfg.scan_layers),
        specs,
        max_shard_size=max_shard_size,
        write=main,
    )
    if main and tokenizer is not None:
        _write_tokenizer(Path(tokenizer), out, tok)
    return out


def _write_tokenizer(source: Path, out: Path, tok: Any) -> None:
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and source.resolve() != out.resolve():
                copy_file(source / name, out / name)
        return
    if source.name.endswith(".json"):
        copy_file(source, out / "tokenizer.json")
        for name in TOKENIZER_FILES:
            if name != "tokenizer.json" and (source.parent / name).is_file():
                copy_file(source.parent / name, out / name)
        return
    from jaxalign.hf.tokenizer import write_sentencepiece_as_hf

    write_sentencepiece_as_hf(source, out)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    family: str | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    merge_lora: bool = False,
    load_lora_run: Any = None,
) -> Path:
    """Export a training checkpoint (a RUN_DIR or its checkpoints/<step>) as a Hugging Face
    directory. The model config comes from RUN_DIR/config.yaml; `trainer: rm` runs export as
    sequence classifiers. Tokenizer default: `data.tokenizer`, else `model.from_hf`'s files.

    A LoRA run (`model.lora`) exports as a PEFT adapter directory (adapter_config.json and
    adapter_model.safetensors, float32; `jaxalign.hf.peft`) for its base, `model.from_hf`;
    with `merge_lora` as the full model with the adapters merged into their weights (a QLoRA
    base dequantized: float32 unless `dtype`). A LoRA run is read by `load_lora_run`
    (`jaxalign.trainers.lora_runs.load_lora_run`, which the CLI passes: this module does not
    import the trainers' modules, which import it).

    A Hugging Face directory as `checkpoint` is re-exported (e.g. in another `dtype`, sharded
    differently, or to gs://), with its own tokenizer files by default. `dtype` (float32 or
    bfloat16) casts the weights; default: as trained (a Hugging Face directory: its
    `torch_dtype` when that is float32 or bfloat16, else float32)."""
    if dtype not in (None, "float32", "bfloat16"):
        raise UserError(f"--dtype {dtype}: expected float32 or bfloat16")
    source = hf_model_dir(checkpoint)
    if source is not None:
        if os.path.realpath(output) == os.path.realpath(source):
            raise UserError(f"{output}: is the model directory being exported; pick another")
        if dtype is None:
            dtype = run_config(source, reward=is_sequence_classifier(source)).model.param_dtype
        model = from_pretrained(source, dtype=dtype)
        return save_pretrained(
            model, output, tokenizer=tokenizer, family=family, max_shard_size=max_shard_size
        )
    if merge_lora and source is not None:
        raise UserError(f"--merge-lora: {checkpoint} is a Hugging Face directory, not a LoRA run")
    return _export_run(
        checkpoint, output, tokenizer, family, max_shard_size, dtype, merge_lora, load_lora_run
    )


def _export_run(
    checkpoint, output, tokenizer, family, max_shard_size, dtype, merge, load_lora_run
) -> Path:
    import yaml

    from jaxalign.checkpoint import abstract_with_shardings, resolve_checkpoint
    from jaxalign.checkpoint import load_params as load_checkpoint_params
    from jaxalign.config import from_dict
    from jaxalign.models.params import build_model
    from jaxalign.trainers.registry import get_trainer

    step_dir = resolve_checkpoint(checkpoint)
    config_file = step_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{config_file}: not found (the run's config.yaml names the model)")
    try:
        cfg = from_dict(Config, yaml.safe_load(config_file.read_text()) or {})
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from None
    try:
        mesh = shd.make_mesh(cfg.mesh)
        rules = shd.resolve_rules(cfg.sharding)
    except ConfigError:  # exported on other devices than it trained on
        mesh, rules = shd.make_mesh(MeshConfig()), shd.resolve_rules(ShardingConfig())
    # The trainer's policy: the whole tree, or PPO's `policy` of {policy, value}.
    algorithm = get_trainer(cfg.trainer)
    _, abstract, shardings = build_model(
        cfg, mesh, rules, lambda rngs: algorithm.make_policy(cfg, rngs)
    )
    if cfg.model.lora is not None:
        if load_lora_run is None:
            raise UserError(
                f"{step_dir}: a LoRA run; export it with `jaxalign export` (or pass "
                "load_lora_run=jaxalign.trainers.lora_runs.load_lora_run)"
            )
        params = load_lora_run(step_dir, cfg, algorithm, mesh, rules)
    else:
        if merge:
            raise UserError(f"--merge-lora: {step_dir.parent.parent} is not a LoRA run")
        target = algorithm.policy_target(abstract_with_shardings(abstract, shardings))
        params = algorithm.policy_params(load_checkpoint_params(step_dir, target))
    hf_dir = cfg.model.from_hf
    if tokenizer is None:
        if cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
            tokenizer = cfg.data.tokenizer
        elif hf_dir and Path(hf_dir).is_dir():
            tokenizer = hf_dir
    if family is None and hf_dir and (Path(hf_dir) / "config.json").is_file():
        family = read_hf_config(hf_dir).get("model_type")
    model_cfg = cfg.model
    if model_cfg.lora is not None:
        from jaxalign.hf import peft

        if not merge:
            return peft.write_peft_adapter(
                output, params, model_cfg, model_cfg.lora, base_model_name_or_path=hf_dir
            )
        params = peft.merge_lora(params, model_cfg.lora)
        model_cfg = dataclasses.replace(model_cfg, lora=None)
        if model_cfg.param_dtype != "float32" and dtype is None:  # a merged QLoRA base
            dtype = "float32"
    if dtype is not None:
        model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype, dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return save_pretrained(
        (model_cfg, params),
        output,
        tokenizer=tokenizer,
        family=family,
        max_shard_size=max_shard_size,
    )
