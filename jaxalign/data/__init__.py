"""Data: JSONL sources, SentencePiece tokenizers, chat templates, packed SFT batches."""

from jaxalign.data.pipeline import SFTBatchIterator, sft_iterator_from_config, tokenize_records
from jaxalign.data.preference import (
    PreferenceBatchIterator,
    preference_iterator_from_config,
    read_preference_jsonl,
    to_preference,
    tokenize_pair,
    tokenize_preferences,
)
from jaxalign.data.prompts import PromptBatchIterator, prompt_iterator_from_config, to_prompt
from jaxalign.data.shards import merge_states
from jaxalign.data.sources import read_jsonl, read_records, record_dataset, to_messages
from jaxalign.data.templates import TEMPLATES, render, render_prompt, stop_token_ids
from jaxalign.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "PreferenceBatchIterator",
    "preference_iterator_from_config",
    "read_preference_jsonl",
    "to_preference",
    "tokenize_pair",
    "tokenize_preferences",
    "TEMPLATES",
    "PromptBatchIterator",
    "merge_states",
    "prompt_iterator_from_config",
    "read_records",
    "record_dataset",
    "to_prompt",
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
