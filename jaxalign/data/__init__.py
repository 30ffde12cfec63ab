"""Data: JSONL sources, SentencePiece tokenizers, chat templates, packed SFT batches."""

from jaxalign.data.pipeline import SFTBatchIterator, sft_iterator_from_config, tokenize_records
from jaxalign.data.sources import read_jsonl, to_messages
from jaxalign.data.templates import TEMPLATES, render, render_prompt, stop_token_ids
from jaxalign.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "TEMPLATES",
    "SFTBatchIterator",
    "Tokenizer",
    "load_tokenizer",
    "read_jsonl",
    "render",
    "render_prompt",
    "sft_iterator_from_config",
    "stop_token_ids",
    "to_messages",
    "tokenize_records",
    "train_tokenizer",
]
