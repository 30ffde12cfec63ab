"""Chat templates: messages -> token ids and a loss mask, built span by span.

Built-in templates (`plain`, `chatml`, `llama3`, `gemma`) write each message as header + content +
end marker (+ separator). Every piece is encoded on its own and the ids concatenated, so the loss
mask comes from the spans themselves: it is true on assistant content, the assistant's end marker,
and the final EOS.

A Hugging Face Jinja `chat_template` (a `tokenizer_config.json` or a `.jinja` file given as the
template name) is rendered in a sandboxed Jinja environment. Its assistant spans come from
rendering the conversation prefix by prefix: assistant turn i covers the characters between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`. Nothing searches
the token stream for a response marker.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import DataError

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool call's result (RL episodes)


@dataclass(frozen=True)
class Template:
    """How one message is written: `{header}{content}{end}{separator}`."""

    header: str  # may contain `{role}`
    end: str  # trained on for assistant messages; generation stops here
    separator: str = ""  # after the end marker; never trained on
    role_names: dict[str, str] = field(default_factory=dict)  # e.g. Gemma's assistant -> model
    # No system role (Gemma): the system prompt opens the first user message, then a blank line.
    system_in_first_user: bool = False

    def header_for(self, role: str) -> str:
        return self.header.format(role=self.role_names.get(role, role))


TEMPLATES: dict[str, Template] = {
    "plain": Template(header="<|{role}|>", end="<|end|>"),
    "chatml": Template(header="<|im_start|>{role}\n", end="<|im_end|>", separator="\n"),
    # The tokenizer's BOS (<|begin_of_text|> for Llama 3 tokenizers) comes first, once.
    "llama3": Template(
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        end="<|eot_id|>",
        role_names={"tool": "ipython"},  # Llama 3.1's role for tool results
    ),
    "gemma": Template(
        header="<start_of_turn>{role}\n",
        end="<end_of_turn>",
        separator="\n",
        role_names={"assistant": "model"},
        system_in_first_user=True,
    ),
}


# --- Hugging Face Jinja templates -----------------------------------------------------------------


def _special(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": str}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class JinjaTemplate:
    """A Hugging Face `chat_template`, rendered in `ImmutableSandboxedEnvironment`."""

    def __init__(
        self, source: str, where: str, bos_token: str | None = None, eos_token: str | None = None
    ):
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationTag(Extension):
            """`{% generation %}...{% endgeneration %}` (HF's assistant marker): render the body."""

            tags = {"generation"}

            def parse(self, parser):
                next(parser.stream)
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.Scope(body)

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        self.where = where
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise DataError(
                f"invalid chat template ({type(e).__name__}: {e})", where=where
            ) from None

    def render_text(
        self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None
    ) -> str:
        """The template's text for `messages` (and the `tools` schemas offered, if any);
        DataError naming the template if it fails."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **({"tools": tools} if tools else {}),
            )
        except (jinja2.TemplateError, jinja2.sandbox.SecurityError, TypeError) as e:
            kind = (
                "blocked by the sandbox"
                if isinstance(e, jinja2.sandbox.SecurityError)
                else ("failed")
            )
            message = f"chat template {kind} ({type(e).__name__}: {e})".splitlines()[0]
            raise DataError(message, where=self.where) from None

    def spans(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, trained-on) pieces of the rendered conversation, from prefix renders."""
        full = self.render_text(messages, add_generation_prompt=False)
        trained = np.zeros(len(full), bool)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render_text(messages[:i], add_generation_prompt=True)
            through = self.render_text(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"chat template is not prefix-stable at messages[{i}] (rendering more "
                    "messages changed earlier text), so assistant spans cannot be found",
                    where=self.where,
                )
            # Whitespace after the end marker separates turns; it is not trained on.
            trained[len(before) : len(through.rstrip())] = True
        pieces: list[tuple[str, bool]] = []
        start = 0
        for end in range(1, len(full) + 1):
            if end == len(full) or trained[end] != trained[start]:
                pieces.append((full[start:end], bool(trained[start])))
                start = end
        return pieces

    def end_marker(self) -> str:
        """The text that closes an assistant turn (what follows its content), without spaces."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        text = self.render_text(probe, add_generation_prompt=False)
        return text[text.rindex("y") + 1 :].strip()


def _load_jinja(path: str) -> JinjaTemplate:
    if not os.path.isfile(path):
        raise DataError("chat template file not found", where=path)
    text = open(path, encoding="utf-8").read()
    if path.endswith(".jinja"):
        return JinjaTemplate(text, path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at line {e.lineno})", where=path) from None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        raise DataError("field 'chat_template' must be a template string", where=path)
    return JinjaTemplate(
        source, path, _special(config.get("bos_token")), _special(config.get("eos_token"))
    )


@functools.lru_cache(maxsize=16)
def _cached_jinja(path: str, mtime: float) -> JinjaTemplate:
    return _load_jinja(path)


def get_template(name: str) -> Template | JinjaTemplate:
    """A built-in template by name, or a Jinja template from a `.json` / `.jinja` path."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if isinstance(name, str) and name.endswith((".json", ".jinja")):
        mtime = os.path.getmtime(name) if os.path.isfile(name) else -1.0
        return _cached_jinja(name, mtime)
    known = ", ".join(sorted(TEMPLATES))
    raise DataError(
        f"unknown chat template {name!r} (known: {known}, or a tokenizer_config.json path)"
    )


# --- rendering ------------------------------------------------------------------------------------


def _check_message(message: dict, index: int) -> tuple[str, str]:
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise DataError(f"messages[{index}]: unknown role {role!r} (expected one of {ROLES})")
    if not isinstance(content, str):
        raise DataError(f"messages[{index}]: content must be a string")
    return role, content


def _checked(messages: list[dict]) -> list[dict]:
    checked = [_check_message(m, i) for i, m in enumerate(messages)]
    # A tool message keeps its tool's name (HF templates may write it).
    return [
        {"role": role, "content": content, **({"name": m["name"]} if "name" in m else {})}
        for (role, content), m in zip(checked, messages, strict=True)
    ]


def _builtin_spans(messages: list[dict], template: Template) -> list[tuple[str, bool]]:
    """(text, trained-on) pieces for `messages`, without BOS/EOS."""
    messages = _checked(messages)
    if template.system_in_first_user and messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        rest = messages[1:]
        if rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        else:
            rest.insert(0, {"role": "user", "content": system})
        messages = rest
    spans: list[tuple[str, bool]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        is_assistant = role == "assistant"
        spans.append((template.header_for(role), False))
        spans.append((content, is_assistant))
        spans.append((template.end, is_assistant))
        if template.separator:
            spans.append((template.separator, False))
    return spans


def _has(token_id: int | None) -> bool:
    return token_id is not None and token_id >= 0


def _encode_text(text: str, tokenizer: Tokenizer, specials: dict[str, int]) -> list[int]:
    """Ids of `text`, with the special-token strings in `specials` mapped to their ids."""
    for special, token_id in specials.items():
        if special in text:
            ids: list[int] = []
            for i, part in enumerate(text.split(special)):
                if i:
                    ids.append(token_id)
                ids.extend(_encode_text(part, tokenizer, specials))
            return ids
    return tokenizer.encode(text) if text else []


def _encode_spans(
    spans: list[tuple[str, bool]],
    tokenizer: Tokenizer,
    template: Template | JinjaTemplate,
    bos: bool = True,
) -> tuple[list[int], list[bool]]:
    specials: dict[str, int] = {}
    if isinstance(template, JinjaTemplate):
        # A template writes BOS/EOS as text; map it to the ids, and drop a leading BOS when the
        # tokenizer adds one below, so it can never come twice. (A tokenizer that adds no BOS
        # keeps the template's: its text encodes to the token, as in transformers.)
        bos_added = bos and _has(tokenizer.bos_id)
        if (
            bos_added
            and template.bos_token
            and spans
            and spans[0][0].startswith(template.bos_token)
        ):
            spans = [(spans[0][0][len(template.bos_token) :], spans[0][1]), *spans[1:]]
        for text, token_id in (
            (template.bos_token, tokenizer.bos_id),
            (template.eos_token, tokenizer.eos_id),
        ):
            if text and _has(token_id):
                specials[text] = token_id
    ids: list[int] = [tokenizer.bos_id] if bos and _has(tokenizer.bos_id) else []
    mask: list[bool] = [False] * len(ids)
    for text, trained in spans:
        piece_ids = _encode_text(text, tokenizer, specials)
        ids.extend(piece_ids)
        mask.extend([trained] * len(piece_ids))
    return ids, mask


def _spans(messages: list[dict], template: Template | JinjaTemplate) -> list[tuple[str, bool]]:
    if isinstance(template, JinjaTemplate):
        return template.spans(_checked(messages))
    return _builtin_spans(messages, template)


def render(
    messages: list[dict], tokenizer: Tokenizer, template: str = "plain"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [N] and loss mask bool [N] of a conversation.

    BOS comes once, first; EOS comes last (unless the template already ended with it). The mask
    is true on assistant content tokens, the assistant end markers, and the EOS when the
    conversation ends with an assistant message.
    """
    if not messages:
        raise DataError("a conversation needs at least one message")
    tmpl = get_template(template)
    ids, mask = _encode_spans(_spans(messages, tmpl), tokenizer, tmpl)
    if _has(tokenizer.eos_id) and (not ids or ids[-1] != tokenizer.eos_id):
        ids.append(tokenizer.eos_id)
        mask.append(messages[-1].get("role") == "assistant")
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def render_prompt(
    messages: list[dict],
    tokenizer: Tokenizer,
    template: str = "plain",
    tools: list[dict] | None = None,
) -> np.ndarray:
    """Token ids int32 [N] of `messages` followed by the assistant header, ready for generation.
    `tools`: the tool schemas a Jinja template gets as its `tools` argument (built-in templates
    have none: describe tools in a system message, `jaxalign.envs.tools_prompt`)."""
    tmpl = get_template(template)
    if isinstance(tmpl, JinjaTemplate):
        text = tmpl.render_text(_checked(messages), add_generation_prompt=True, tools=tools)
        spans = [(text, False)]
    else:
        spans = _builtin_spans(messages, tmpl)
        spans.append((tmpl.header_for("assistant"), False))
    ids, _ = _encode_spans(spans, tokenizer, tmpl)
    return np.asarray(ids, dtype=np.int32)


def stop_token_ids(tokenizer: Tokenizer, template: str = "plain") -> list[int]:
    """Ids that end an assistant turn in generation: the template's end marker, then EOS."""
    tmpl = get_template(template)
    end = tmpl.end_marker() if isinstance(tmpl, JinjaTemplate) else tmpl.end
    end_ids = tokenizer.encode(end) if end else []
    stops = [end_ids[0]] if len(end_ids) == 1 and end_ids[0] != tokenizer.eos_id else []
    return [*stops, tokenizer.eos_id]


def render_observation(
    conversation: list[dict],
    observation: list[dict],
    tokenizer: Tokenizer,
    template: str = "plain",
    tools: list[dict] | None = None,
    closed: bool = True,
) -> np.ndarray:
    """Token ids int32 [K] that follow an assistant turn's end marker in a multi-turn episode:
    the turn's separator, the `observation` messages (e.g. `tool` results), and the next
    assistant header. `conversation`: the messages so far, ending with that assistant turn
    (Jinja templates render the conversation with and without the observation and take the
    difference; DataError if the template is not prefix-stable there). `closed=False`: the turn
    ended without its end marker (at a `sampling.stop` string), so the ids start with it."""
    tmpl = get_template(template)
    end = (
        []
        if closed
        else [(tmpl.end_marker() if isinstance(tmpl, JinjaTemplate) else tmpl.end, False)]
    )
    if isinstance(tmpl, JinjaTemplate):
        before = tmpl.render_text(_checked(conversation), False, tools).rstrip()
        after = tmpl.render_text(_checked([*conversation, *observation]), True, tools)
        if not after.startswith(before):
            raise DataError(
                "chat template is not prefix-stable after an assistant turn, so an "
                "observation cannot be appended to the episode",
                where=tmpl.where,
            )
        spans = [*end, (after[len(before) :], False)]
    else:
        spans = [*end, *([(tmpl.separator, False)] if tmpl.separator else [])]
        spans += _builtin_spans(observation, tmpl)
        spans.append((tmpl.header_for("assistant"), False))
    ids, _ = _encode_spans(spans, tokenizer, tmpl, bos=False)
    return np.asarray(ids, dtype=np.int32)
