"""Hugging Face tokenizers (`tokenizer.json`) behind jaxalign's Tokenizer interface, with the chat
template of `tokenizer_config.json` rendered in a sandboxed Jinja environment."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.errors import DataError
from jaxalign.paths import copy_file, run_path


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizers` tokenizer with jaxalign's Tokenizer interface (`encode` adds no special
    tokens) plus `apply_chat_template`."""

    def __init__(
        self, tokenizer: Any, config: dict, path: str = "", chat_template: str | None = None
    ):
        self._tok = tokenizer
        self.config = config
        self.path = path
        self.chat_template = chat_template
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            key: _token_text(config.get(f"{key}_token")) for key in ("bos", "eos", "pad", "unk")
        }
        # jaxalign's data pipeline starts every sequence with `bos_id` when it is set, so it is
        # the BOS this tokenizer adds (transformers' add_special_tokens=True), not merely the
        # token tokenizer_config.json names: SmolLM2 names <|im_start|> and adds nothing.
        bos = self._id_or_missing(self.special_tokens["bos"])
        self.bos_id: int = bos if bos >= 0 and self._adds_bos(bos) else -1
        self.eos_id: int = self._id_or_missing(self.special_tokens["eos"])
        pad = self._id_or_missing(self.special_tokens["pad"])
        self.pad_id: int = pad if pad >= 0 else self.eos_id
        self._template = None

    def _id_or_missing(self, token: str | None) -> int:
        if token is None:
            return -1
        token_id = self._tok.token_to_id(token)
        return -1 if token_id is None else int(token_id)

    def _adds_bos(self, bos_id: int) -> bool:
        """Whether transformers (5.x) starts an encoded sequence with `bos_id`: the tokenizer.json
        post-processor decides (none adds nothing; tokenizer_config.json's `add_bos_token` does
        not change it)."""
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._tok.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True
        )

    def token_id(self, piece: str) -> int:
        """The id of a single token; DataError if it is not in the vocabulary."""
        token_id = self._tok.token_to_id(piece)
        if token_id is None:
            raise DataError(f"piece {piece!r} is not in the vocabulary", where=self.path or None)
        return int(token_id)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template (as transformers does)."""
        if self.chat_template is None:
            raise DataError("the tokenizer has no chat_template", where=self.path or None)
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        context = {f"{k}_token": v for k, v in self.special_tokens.items() if v is not None}
        context.update(kwargs)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load `tokenizer.json` (a file, or a directory holding one) and, beside it,
    tokenizer_config.json (special tokens, chat template) and special_tokens_map.json."""
    from tokenizers import Tokenizer as BackendTokenizer

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError("tokenizer.json not found", where=str(file))
    try:
        backend = BackendTokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise DataError(
            f"not a valid tokenizer.json ({str(e).splitlines()[0][:200]})", where=str(file)
        ) from None
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        extra = file.parent / name
        if extra.is_file():
            try:
                config.update(json.loads(extra.read_text()))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg})", where=str(extra)) from None
    return HFTokenizer(backend, config, str(file), _chat_template(file.parent, config))


def write_sentencepiece_as_hf(model_file: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write a jaxalign SentencePiece model as Hugging Face tokenizer files (tokenizer.model +
    tokenizer_config.json) that transformers' LlamaTokenizer loads with the same ids: jaxalign
    models add no dummy-prefix space, hence `add_prefix_space: false`."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.load(str(model_file))
    out = run_path(out, key="output")
    copy_file(model_file, out / "tokenizer.model")

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()) or piece(sp.eos_id()),
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
