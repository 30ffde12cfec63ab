"""Hugging Face interop: import model directories (config + safetensors + tokenizer) and export
them so `transformers` loads the result. See docs/hf.md."""

from jaxalign.hf.convert import (
    hf_config_from_model,
    infer_family,
    model_config_from_hf,
    read_hf_config,
    resolve_from_hf,
    tensor_maps,
)
from jaxalign.hf.model import PretrainedModel, from_pretrained, load_params, save_pretrained
from jaxalign.hf.tokenizer import HFTokenizer, load_hf_tokenizer

__all__ = [
    "HFTokenizer",
    "PretrainedModel",
    "from_pretrained",
    "hf_config_from_model",
    "infer_family",
    "load_hf_tokenizer",
    "load_params",
    "model_config_from_hf",
    "read_hf_config",
    "resolve_from_hf",
    "save_pretrained",
    "tensor_maps",
]
