"""Tools an environment offers the model: plain Python functions with a JSON schema, the tool
calls parsed from the model's text, and running them with a time limit.

Two call formats (`rl.tool_call_format`):

- `hermes` (Hermes, Qwen 2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  any number per assistant turn.
- `llama3` (Llama 3.1+ JSON tool calls): the whole assistant message is one JSON object
  `{"name": ..., "parameters": {...}}` (`"arguments"` accepted too), optionally after
  `<|python_tag|>`.

Nothing here evaluates model text: a call names a registered function and passes it JSON
arguments. Each call runs on its own daemon thread and is waited on until `timeout` seconds from
the start of the turn's calls; a call still running then is abandoned (Python cannot kill a
thread) and reported as timed out, so a hung tool never blocks the batch or the process exit
(`concurrent.futures` pools join their workers at exit, which a hung tool would block).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

TOOL_CALL_FORMATS = ("hermes", "llama3")
_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the model may call: `fn(**arguments) -> result` (str, or anything
    JSON-serializable), `parameters` its arguments' JSON schema (an object schema)."""

    name: str
    fn: Callable[..., Any]
    description: str
    parameters: dict

    def schema(self) -> dict:
        """The OpenAI / Hugging Face `tools` entry (what HF chat templates' `tools` take)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and arguments, or `error` (a malformed call)."""

    name: str | None
    arguments: dict
    error: str | None = None


def parse_tool_calls(text: str, fmt: str) -> list[ToolCall]:
    """The tool calls in an assistant message `text` (empty: a final answer). A call that does
    not parse is a `ToolCall` with `error` set, so the model sees what was wrong."""
    if fmt == "hermes":
        return [
            _call_from_json(m.group(1), closed=bool(m.group(2))) for m in _HERMES.finditer(text)
        ]
    if fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return []
        return [_call_from_json(body, closed=True, arguments_key="parameters")]
    raise ValueError(f"unknown tool call format {fmt!r} (known: {', '.join(TOOL_CALL_FORMATS)})")


def _call_from_json(body: str, closed: bool, arguments_key: str = "arguments") -> ToolCall:
    if not closed:
        return ToolCall(None, {}, "malformed tool call: no closing </tool_call>")
    try:
        value = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return ToolCall(None, {}, f"malformed tool call: invalid JSON ({e.msg})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(None, {}, 'malformed tool call: expected {"name": ..., "arguments": {...}}')
    arguments = value.get(arguments_key, value.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], {}, "malformed tool call: arguments must be an object")
    return ToolCall(value["name"], arguments)


def format_tool_call(name: str, arguments: dict, fmt: str) -> str:
    """The assistant text that calls `name` with `arguments` in format `fmt` (demonstrations,
    tests)."""
    if fmt == "hermes":
        return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"
    return json.dumps({"name": name, "parameters": arguments})


def tools_prompt(tools: Sequence[Tool], fmt: str) -> str:
    """A short system-prompt text naming `tools`, their arguments and how to call one, for
    built-in templates (HF Jinja templates get the full schemas through their `tools` argument).
    Short on purpose: small models and their prompt budgets."""
    lines = ["Tools:"]
    for tool in tools:
        arguments = ", ".join(tool.parameters.get("properties", {}))
        lines.append(f"{tool.name}({arguments}): {tool.description}")
    first = tools[0]
    example = format_tool_call(
        first.name, {a: "..." for a in first.parameters.get("properties", {})}, fmt
    )
    lines.append(f"Call one as {example}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call returned, as the text of its `tool` message; `error`: whether it failed
    (malformed, unknown tool, raised, timed out)."""

    name: str | None
    content: str
    error: bool


def run_tool_calls(
    calls: Sequence[ToolCall], tools: dict[str, Tool], timeout: float, max_chars: int
) -> list[ToolResult]:
    """Run `calls` concurrently, each on a daemon thread; every call gets until `timeout`
    seconds after the first started. Results longer than `max_chars` are cut with a note."""
    slots: list[dict] = [{} for _ in calls]
    threads: list[threading.Thread | None] = []
    for call, slot in zip(calls, slots, strict=True):
        if call.error is not None:
            slot["result"] = ToolResult(call.name, f"Error: {call.error}", True)
            threads.append(None)
            continue
        tool = tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(tools)) or "none"
            slot["result"] = ToolResult(
                call.name, f"Error: unknown tool {call.name!r} (tools: {known})", True
            )
            threads.append(None)
            continue
        thread = threading.Thread(target=_call, args=(tool, call.arguments, slot), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout
    results = []
    for call, slot, thread in zip(calls, slots, threads, strict=True):
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if "result" not in slot:  # still running: abandoned
            slot["result"] = ToolResult(
                call.name, f"Error: tool {call.name!r} timed out after {timeout:g} s", True
            )
        results.append(_truncated(slot["result"], max_chars))
    return results


def _call(tool: Tool, arguments: dict, slot: dict) -> None:
    try:
        out = tool.fn(**arguments)
        text = out if isinstance(out, str) else json.dumps(out)
        slot["result"] = ToolResult(tool.name, text, False)
    except Exception as e:  # a tool's failure is the model's observation, never the run's
        message = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        slot["result"] = ToolResult(tool.name, f"Error: {message}", True)


def _truncated(result: ToolResult, max_chars: int) -> ToolResult:
    if len(result.content) <= max_chars:
        return result
    note = f"\n[truncated: {len(result.content)} characters, showing the first {max_chars}]"
    return dataclasses.replace(result, content=result.content[:max_chars] + note)
