"""SentencePiece tokenizers: load a `.model` file, or train one (deterministically) from data."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from jaxalign.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Chat markers of every template in `templates.py`; each becomes a single token when training.
CHAT_MARKERS = (
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
)


class Tokenizer:
    """A SentencePiece model. `encode` adds no BOS/EOS; templates add them."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str = ""):
        self._sp = processor
        self.path = path
        self.vocab_size: int = processor.get_piece_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        # A model trained without a pad piece reports -1; fall back to EOS so padding stays valid.
        pad = processor.pad_id()
        self.pad_id: int = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` (special tokens such as BOS/EOS/pad decode to nothing)."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def token_id(self, piece: str) -> int:
        """The id of a single piece, e.g. a chat marker; DataError if it is not in the vocab."""
        token = self._sp.piece_to_id(piece)
        if token == self._sp.unk_id() and piece != self._sp.id_to_piece(token):
            raise DataError(f"piece {piece!r} is not in the vocabulary", where=self.path or None)
        return token

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece `.model` file; DataError naming the path if it is missing or bad.

    A Hugging Face `tokenizer.json` (or a directory holding one) loads as `jaxalign.hf`'s
    HFTokenizer, which has the same interface."""
    if str(path).endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json")):
        from jaxalign.hf.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path)  # type: ignore[return-value]
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise DataError("tokenizer file not found", where=str(path))
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"not a valid SentencePiece model ({detail})", where=str(path)) from None
    return Tokenizer(processor, str(path))


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _record_texts(record: object) -> Iterator[str]:
    if not isinstance(record, dict):
        return
    for key in ("system", "prompt", "completion"):
        if isinstance(record.get(key), str):
            yield record[key]
    for message in record.get("messages") or ():
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message["content"]


def iter_training_texts(input_files: Iterable[str]) -> Iterator[str]:
    """Texts of JSONL records (prompt/completion/system or message contents), or of plain lines."""
    for path in input_files:
        is_jsonl = path.endswith((".jsonl", ".jsonl.gz"))
        try:
            with _open_text(path) as f:
                for line in f:
                    line = line.rstrip("\n")
                    if not line.strip():
                        continue
                    if not is_jsonl:
                        yield line
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # training text is best-effort; `read_jsonl` reports bad lines
                    for text in _record_texts(record):
                        if text:
                            yield text
        except FileNotFoundError:
            raise DataError("tokenizer training file not found", where=path) from None
        except UnicodeDecodeError:
            raise DataError("tokenizer training file is not valid UTF-8", where=path) from None


def train_tokenizer(
    input_files: list[str], output_prefix: str, vocab_size: int, *, seed: int = 0
) -> str:
    """Train a byte-fallback BPE SentencePiece model; returns the path of the `.model` file.

    Ids: pad 0, unk 1, bos 2, eos 3; every template's chat markers are single tokens. Text is kept
    verbatim (identity normalization, no dummy prefix), so encoding pieces one by one and
    concatenating the ids decodes back to the concatenated text. The output is byte-identical
    across runs for the same inputs and seed.
    """
    texts = list(iter_training_texts(input_files))
    if not texts:
        raise DataError("no text to train a tokenizer on", where=",".join(input_files))
    spm.set_random_generator_seed(seed)
    # The model comes back in memory so that no output path is recorded inside it.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(CHAT_MARKERS),
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            num_threads=1,
            input_sentence_size=0,  # use every sentence: no sampling
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else "training failed"
        raise DataError(f"tokenizer training failed: {detail}", where=output_prefix) from None
    path = Path(f"{output_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return str(path)
