"""The environment protocol of multi-turn RL episodes, a base class for tool-use environments,
and loading `rl.environment`.

An episode: `reset(record)` gives the first observation (the messages the model answers), then
each model turn goes to `step(assistant_text)`, which returns the next observation (messages the
model sees before its next turn, e.g. `tool` messages) or None, the turn's reward, whether the
episode is done, and an info dict (`tool_calls`, `tool_errors` are counted in the metrics). The
episode's score is the sum of its step rewards. The rollout engine renders every message through
the chat template (`jaxalign/trainers/episodes.py`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from jaxalign.envs.tools import Tool, ToolResult, parse_tool_calls, run_tool_calls
from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ToolSettings:
    """How tool calls are read and run (from the `rl` config: `from_rl`)."""

    call_format: str = "hermes"  # rl.tool_call_format
    timeout: float = 5.0  # rl.tool_timeout, seconds per turn's calls
    max_chars: int = 4096  # rl.tool_max_chars: longer results are truncated with a note

    @classmethod
    def from_rl(cls, rl) -> ToolSettings:
        return cls(rl.tool_call_format, rl.tool_timeout, rl.tool_max_chars)


class Environment(Protocol):
    """What the rollout engine asks of an environment (one instance per episode)."""

    tools: Sequence[Tool]  # offered to the model (HF templates' `tools`; a system prompt else)

    def reset(self, record: dict) -> list[dict]:
        """The first observation: chat messages. `record`: the prompt record's fields, with its
        prompt as `messages`."""

    def step(self, assistant_text: str) -> tuple[list[dict] | None, float, bool, dict]:
        """(next observation messages or None, reward, done, info) after a model turn."""


class ToolEnvironment:
    """An environment where the model may call `tools` and its first message without a tool
    call is its answer, scored by `score`. Subclasses set `tools` and define `score` (and may
    override `reset` to build the first observation from the record)."""

    tools: Sequence[Tool] = ()

    def __init__(self, settings: ToolSettings | None = None):
        self.settings = settings or ToolSettings()
        self.record: dict = {}

    def reset(self, record: dict) -> list[dict]:
        """The record's prompt messages."""
        self.record = record
        return list(record["messages"])

    def score(self, answer: str) -> float:
        """The reward of the final answer (`self.record` holds the episode's record)."""
        raise NotImplementedError

    def step(self, assistant_text: str) -> tuple[list[dict] | None, float, bool, dict]:
        """Tool calls in `assistant_text` run (their results the next observation); no call:
        the answer, scored, and the episode is done."""
        calls = parse_tool_calls(assistant_text, self.settings.call_format)
        if not calls:
            return (
                None,
                float(self.score(assistant_text)),
                True,
                {"tool_calls": 0, "tool_errors": 0},
            )
        results = run_tool_calls(
            calls, {t.name: t for t in self.tools}, self.settings.timeout, self.settings.max_chars
        )
        info = {"tool_calls": len(calls), "tool_errors": sum(r.error for r in results)}
        return [tool_message(r) for r in results], 0.0, False, info


def tool_message(result: ToolResult) -> dict:
    """The `tool` role message of a call's result."""
    return {"role": "tool", "name": result.name or "", "content": result.content}


BUNDLED = {
    "calculator": "jaxalign.envs.calculator:CalculatorEnvironment",
    "format_checker": "jaxalign.envs.format_checker:FormatCheckerEnvironment",
}


def load_environment(spec: str, settings: ToolSettings) -> Callable[[], Any]:
    """A factory of fresh environments (one per episode) for `rl.environment`: a bundled name
    (`calculator`, `format_checker`), `module:Class` or `path/to/file.py:Class`. The class is
    called with the `ToolSettings` if it takes an argument, else with none."""
    from jaxalign.rewards.functions import load_reward_function

    cls = load_reward_function(BUNDLED.get(spec, spec), "rl.environment", what="CLASS")
    try:
        takes_settings = bool(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        takes_settings = False

    def factory():
        return cls(settings) if takes_settings else cls()

    try:
        factory()
    except Exception as e:
        raise ConfigError(f"rl.environment: {spec!r} could not be built ({e})") from None
    return factory
