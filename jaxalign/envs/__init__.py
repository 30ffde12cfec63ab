"""Environments for multi-turn RL: the protocol and tool-use base (`base.py`), tools and tool
calls (`tools.py`), and the bundled `calculator` and `format_checker` environments. Configs name
one as `rl.environment` (a bundled name, `module:Class` or `file.py:Class`); docs/trainers/grpo.md,
"Environments and tools"."""

from jaxalign.envs.base import (
    Environment,
    ToolEnvironment,
    ToolSettings,
    load_environment,
    tool_message,
)
from jaxalign.envs.tools import (
    TOOL_CALL_FORMATS,
    Tool,
    ToolCall,
    ToolResult,
    format_tool_call,
    parse_tool_calls,
    run_tool_calls,
    tools_prompt,
)

__all__ = [
    "TOOL_CALL_FORMATS",
    "Environment",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "ToolResult",
    "ToolSettings",
    "format_tool_call",
    "load_environment",
    "parse_tool_calls",
    "run_tool_calls",
    "tool_message",
    "tools_prompt",
]
