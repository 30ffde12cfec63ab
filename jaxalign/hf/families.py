"""Which jaxalign model family a Hugging Face directory is, read from its config.json alone.

Imports nothing of jaxalign but its errors, so `jaxalign.config` can name a `model.from_hf`
directory's family while it validates a config (the converters in `hf/convert.py` import the
config, not the other way round).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxalign.errors import ConfigError

GEMMA_FAMILIES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}  # HF model_type -> family
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")  # HF model_type = jaxalign family


def read_hf_config(path: str | os.PathLike) -> dict:
    """The config.json of a Hugging Face model directory (or the file itself) as a dict."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{file}: Hugging Face config.json not found")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return raw


def hf_model_family(source: str | os.PathLike | dict) -> str:
    """The jaxalign model family for a Hugging Face directory or config dict: `qwen3_moe` or
    `mixtral` for those model types, `gemma2` / `gemma3` for Gemma 2 / 3 (text), `llama` for the
    other dense ones (checked when imported)."""
    hf = source if isinstance(source, dict) else read_hf_config(source)
    model_type = hf.get("model_type")
    if model_type in MOE_MODEL_TYPES:
        return model_type
    return GEMMA_FAMILIES.get(model_type, "llama")
