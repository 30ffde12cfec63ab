"""Chat templates: messages -> token ids and a loss mask, built span by span.

Each message is rendered as header + content + end marker (+ separator). Every piece is encoded
on its own and the ids concatenated, so the loss mask comes from the spans themselves: it is true
on assistant content, the assistant's end marker, and the final EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Template:
    """How one message is written: `{header}{content}{end}{separator}`."""

    header: str  # may contain `{role}`
    end: str  # trained on for assistant messages; generation stops here
    separator: str = ""  # after the end marker; never trained on

    def header_for(self, role: str) -> str:
        return self.header.format(role=role)


TEMPLATES: dict[str, Template] = {
    "plain": Template(header="<|{role}|>", end="<|end|>"),
    "chatml": Template(header="<|im_start|>{role}\n", end="<|im_end|>", separator="\n"),
}


def get_template(name: str) -> Template:
    """The template called `name`; DataError listing the known ones otherwise."""
    if name not in TEMPLATES:
        known = ", ".join(sorted(TEMPLATES))
        raise DataError(f"unknown chat template {name!r} (known: {known})")
    return TEMPLATES[name]


def _check_message(message: dict, index: int) -> tuple[str, str]:
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise DataError(f"messages[{index}]: unknown role {role!r} (expected one of {ROLES})")
    if not isinstance(content, str):
        raise DataError(f"messages[{index}]: content must be a string")
    return role, content


def _spans(messages: list[dict], template: Template) -> list[tuple[str, bool]]:
    """(text, trained-on) pieces for `messages`, without BOS/EOS."""
    spans: list[tuple[str, bool]] = []
    for index, message in enumerate(messages):
        role, content = _check_message(message, index)
        is_assistant = role == "assistant"
        spans.append((template.header_for(role), False))
        spans.append((content, is_assistant))
        spans.append((template.end, is_assistant))
        if template.separator:
            spans.append((template.separator, False))
    return spans


def _encode_spans(
    spans: list[tuple[str, bool]], tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
    # A SentencePiece model trained without BOS reports -1: then there is nothing to add.
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    mask: list[bool] = [False] * len(ids)
    for text, trained in spans:
        piece_ids = tokenizer.encode(text) if text else []
        ids.extend(piece_ids)
        mask.extend([trained] * len(piece_ids))
    return ids, mask


def render(
    messages: list[dict], tokenizer: Tokenizer, template: str = "plain"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [N] and loss mask bool [N] of a conversation.

    BOS comes once, first; EOS comes last. The mask is true on assistant content tokens, the
    assistant end markers, and the EOS when the conversation ends with an assistant message.
    """
    if not messages:
        raise DataError("a conversation needs at least one message")
    spans = _spans(messages, get_template(template))
    ids, mask = _encode_spans(spans, tokenizer)
    if tokenizer.eos_id >= 0:
        ids.append(tokenizer.eos_id)
        mask.append(messages[-1].get("role") == "assistant")
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def render_prompt(
    messages: list[dict], tokenizer: Tokenizer, template: str = "plain"
) -> np.ndarray:
    """Token ids int32 [N] of `messages` followed by the assistant header, ready for generation."""
    tmpl = get_template(template)
    spans = _spans(messages, tmpl)
    spans.append((tmpl.header_for("assistant"), False))
    ids, _ = _encode_spans(spans, tokenizer)
    return np.asarray(ids, dtype=np.int32)


def stop_token_ids(tokenizer: Tokenizer, template: str = "plain") -> list[int]:
    """Ids that end an assistant turn in generation: the template's end marker, then EOS."""
    end_ids = tokenizer.encode(get_template(template).end)
    stops = [end_ids[0]] if len(end_ids) == 1 else []
    return [*stops, tokenizer.eos_id]
