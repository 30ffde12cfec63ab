"""Environments and tools (jaxalign/envs): tool-call parsing, running tools with time and size
limits, the safe calculator, the bundled environments, loading rl.environment, rendering tool
observations through chat templates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from jaxalign.data.templates import get_template, render, render_observation, render_prompt
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.envs import (
    Tool,
    ToolCall,
    ToolSettings,
    format_tool_call,
    load_environment,
    parse_tool_calls,
    run_tool_calls,
)
from jaxalign.envs.calculator import (
    CalculatorEnvironment,
    CalculatorError,
    GuidedCalculatorEnvironment,
    safe_eval,
)
from jaxalign.envs.format_checker import FormatCheckerEnvironment
from jaxalign.errors import UserError

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny"


def test_hermes_calls_are_parsed_and_malformed_ones_are_errors():
    text = (
        'Let me compute. <tool_call>{"name": "calculate", "arguments": {"expression": "2+3"}}'
        '</tool_call> and <tool_call>{"name": "calculate", "arguments": "{\\"expression\\": '
        '\\"4\\"}"}</tool_call>'
    )
    assert parse_tool_calls(text, "hermes") == [
        ToolCall("calculate", {"expression": "2+3"}),
        ToolCall("calculate", {"expression": "4"}),
    ]
    assert parse_tool_calls("The answer is 5.", "hermes") == []
    (bad_json,) = parse_tool_calls("<tool_call>{name: calculate}</tool_call>", "hermes")
    assert bad_json.error.startswith("malformed tool call: invalid JSON")
    (unclosed,) = parse_tool_calls('<tool_call>{"name": "calculate"', "hermes")
    assert unclosed.error == "malformed tool call: no closing </tool_call>"
    (no_name,) = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>', "hermes")
    assert no_name.error.startswith("malformed tool call: expected")
    (bad_args,) = parse_tool_calls('<tool_call>{"name": "f", "arguments": 3}</tool_call>', "hermes")
    assert bad_args == ToolCall("f", {}, "malformed tool call: arguments must be an object")


def test_llama3_json_calls_are_the_whole_message():
    call = '<|python_tag|>{"name": "calculate", "parameters": {"expression": "6*7"}}'
    assert parse_tool_calls(call, "llama3") == [ToolCall("calculate", {"expression": "6*7"})]
    assert parse_tool_calls("It is 42.", "llama3") == []
    assert parse_tool_calls("{oops", "llama3")[0].error.startswith("malformed")
    for fmt in ("hermes", "llama3"):
        text = format_tool_call("calculate", {"expression": "1+1"}, fmt)
        assert parse_tool_calls(text, fmt) == [ToolCall("calculate", {"expression": "1+1"})]


def _tool(name, fn):
    return Tool(name, fn, "test tool", {"type": "object", "properties": {}})


def test_tool_failures_become_error_observations_and_a_hung_tool_is_cut_off():
    def slow():
        time.sleep(3.0)
        return "late"

    def boom():
        raise RuntimeError("disk on fire")

    tools = {t.name: t for t in (_tool("slow", slow), _tool("boom", boom), _tool("ok", lambda: 7))}
    calls = [
        ToolCall("slow", {}),
        ToolCall("boom", {}),
        ToolCall("nope", {}),
        ToolCall(None, {}, "malformed tool call: invalid JSON (x)"),
        ToolCall("ok", {}),
        ToolCall("ok", {"unexpected": 1}),
    ]
    start = time.monotonic()
    results = run_tool_calls(calls, tools, timeout=0.3, max_chars=100)
    assert time.monotonic() - start < 1.5  # the hung tool did not hold the others up
    assert [r.error for r in results] == [True, True, True, True, False, True]
    assert results[0].content == "Error: tool 'slow' timed out after 0.3 s"
    assert results[1].content == "Error: RuntimeError: disk on fire"
    assert results[2].content == "Error: unknown tool 'nope' (tools: boom, ok, slow)"
    assert results[3].content == "Error: malformed tool call: invalid JSON (x)"
    assert results[4].content == "7"
    assert results[5].content.startswith("Error: TypeError:")


def test_a_huge_result_is_truncated_with_a_note():
    tools = {"big": _tool("big", lambda: "x" * 10_000_000)}
    (result,) = run_tool_calls([ToolCall("big", {})], tools, timeout=5.0, max_chars=4096)
    assert not result.error
    assert result.content == "x" * 4096 + (
        "\n[truncated: 10000000 characters, showing the first 4096]"
    )


@pytest.mark.parametrize(
    ("expression", "value"),
    [("2 + 3 * 4", 14), ("(7 - 10) ** 2", 9), ("-8 // 3", -3), ("7 / 2", 3.5), ("3 ^ 4", 81),
     ("6 × 7", 42), ("17 % 5", 5 - 3), ("2 ** -1", 0.5)],
)  # fmt: skip
def test_safe_eval_computes_arithmetic(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("__import__('os').system('true')", "unsupported syntax: Call"),
        ("(1).__class__", "unsupported syntax: Attribute"),
        ("x + 1", "unsupported syntax: Name"),
        ("'a' * 3", "unsupported syntax: Constant"),
        ("9 ** 9 ** 9", "exponent larger than 64"),
        ("10 ** 40", "result too large"),
        ("1 / 0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 201, "expression longer than 200 characters"),
        ("[1, 2]", "unsupported syntax: List"),
    ],
)
def test_safe_eval_rejects_everything_but_bounded_arithmetic(expression, error):
    with pytest.raises(CalculatorError, match=error.replace("(", r"\(").replace("*", r"\*")):
        safe_eval(expression)


def test_calculator_environment_episode():
    env = CalculatorEnvironment(ToolSettings(timeout=2.0))
    record = {"messages": [{"role": "user", "content": "Compute 70 + 27."}], "answer": "97"}
    assert env.reset(record) == record["messages"]
    obs, reward, done, info = env.step(
        format_tool_call("calculate", {"expression": "70+27"}, "hermes")
    )
    assert obs == [{"role": "tool", "name": "calculate", "content": "97"}]
    assert (reward, done, info) == (0.0, False, {"tool_calls": 1, "tool_errors": 0})
    obs, reward, done, info = env.step(
        '<tool_call>{"name": "calculate", "arguments": {"expression": "open(1)"}}</tool_call>'
    )
    assert obs[0]["content"] == "Error: CalculatorError: unsupported syntax: Call"
    assert info == {"tool_calls": 1, "tool_errors": 1} and not done
    assert env.step("The answer is 97.")[1:3] == (1.0, True)
    assert env.step("The answer is 96.")[1:3] == (0.0, True)
    with pytest.raises(ValueError, match="field 'answer' must hold an integer"):
        env.reset({"messages": record["messages"], "answer": "ninety"})


def test_guided_calculator_adds_the_call_reward_once_for_a_call_with_the_answer():
    env = GuidedCalculatorEnvironment(ToolSettings(timeout=2.0))
    record = {"messages": [{"role": "user", "content": "Compute 70 + 27."}], "answer": "97"}

    def call(expression):
        return env.step(format_tool_call("calculate", {"expression": expression}, "hermes"))

    env.reset(record)
    assert call("70 + 28")[1] == 0.0  # a call with another result: no reward
    assert call("70 + 27")[1] == 0.5
    assert call("27 + 70")[1] == 0.0  # once per episode
    assert env.step("The answer is 97.")[1:3] == (1.0, True)
    env.reset(record)  # a new episode earns it again
    assert call("97")[1] == 0.5 and env.step("The answer is 96.")[1:3] == (0.0, True)


def test_format_checker_environment_checks_drafts_with_the_records_checker():
    env = FormatCheckerEnvironment(ToolSettings())
    env.reset(
        {
            "messages": [{"role": "user", "content": "Say hi in 3 words."}],
            "family": "n_words",
            "n": 3,
        }
    )
    call = format_tool_call("check_answer", {"answer": "hello there friend"}, "hermes")
    assert env.step(call)[0][0]["content"] == "passes"
    call = format_tool_call("check_answer", {"answer": "hi"}, "hermes")
    assert env.step(call)[0][0]["content"] == "fails"
    assert env.step("hello there friend")[1:3] == (1.0, True)
    assert env.step("hello")[1:3] == (0.0, True)
    with pytest.raises(ValueError, match="field 'family' must be one of arithmetic"):
        env.reset({"messages": [{"role": "user", "content": "?"}], "family": "poetry"})


def test_environments_load_by_name_module_or_file(tmp_path):
    settings = ToolSettings(call_format="llama3")
    assert isinstance(load_environment("calculator", settings)(), CalculatorEnvironment)
    made = load_environment("jaxalign.envs.format_checker:FormatCheckerEnvironment", settings)()
    assert made.settings.call_format == "llama3"
    path = tmp_path / "my_env.py"
    path.write_text(
        "class Echo:\n"
        "    tools = ()\n"
        "    def reset(self, record):\n"
        "        return record['messages']\n"
        "    def step(self, text):\n"
        "        return None, float(len(text)), True, {}\n"
    )
    env = load_environment(f"{path}:Echo", settings)()
    assert env.step("abc") == (None, 3.0, True, {})
    with pytest.raises(
        UserError, match=r"^rl.environment: 'nope': expected MODULE:CLASS or FILE.py:CLASS$"
    ):
        load_environment("nope", settings)
    with pytest.raises(UserError, match=r"my_env.py:Missing'.*has no class 'Missing'$"):
        load_environment(f"{path}:Missing", settings)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(DATA / "tokenizer.model"))


@pytest.mark.parametrize("template", ["plain", "chatml", "llama3"])
def test_observation_tokens_continue_the_rendered_conversation(tokenizer, template):
    """prompt + assistant turn (with its end marker) + observation ids = the ids the template
    renders for the whole conversation up to the next assistant header."""
    call = format_tool_call("calculate", {"expression": "2+3"}, "hermes")
    conversation = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": call},
    ]
    observation = [{"role": "tool", "name": "calculate", "content": "5"}]
    whole, mask = render(conversation, tokenizer, template)
    # The model's turn ends at its end marker: the last trained token before the final EOS.
    trained = np.flatnonzero(mask)
    if whole[-1] == tokenizer.eos_id and mask[-1]:
        trained = trained[:-1]
    prefix = whole[: trained[-1] + 1]
    got = np.concatenate(
        [prefix, render_observation(conversation, observation, tokenizer, template)]
    )
    want = render_prompt([*conversation, *observation], tokenizer, template)
    np.testing.assert_array_equal(got, want)
    # Without its end marker (a turn cut at a sampling.stop string), the observation adds it.
    content_end = prefix[: -len(tokenizer.encode(get_template(template).end))]
    unclosed = render_observation(conversation, observation, tokenizer, template, closed=False)
    np.testing.assert_array_equal(np.concatenate([content_end, unclosed]), want)


def test_jinja_observations_render_tool_messages_and_tools(tmp_path, tokenizer):
    source = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
        "{% for m in messages %}[{{ m.role }}{% if m.name %}:{{ m.name }}{% endif %}]"
        "{{ m.content }}[/end]\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"chat_template": source}))
    tools = [{"type": "function", "function": {"name": "calculate"}}]
    conversation = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "call"}]
    observation = [{"role": "tool", "name": "calculate", "content": "5"}]
    ids = render_observation(conversation, observation, tokenizer, str(path), tools)
    assert tokenizer.decode(ids.tolist()) == "\n[tool:calculate]5[/end]\n[assistant]"
    # A turn cut at a stop string has no end marker yet: it comes first.
    ids = render_observation(conversation, observation, tokenizer, str(path), tools, closed=False)
    assert tokenizer.decode(ids.tolist()) == "[/end]\n[tool:calculate]5[/end]\n[assistant]"
    prompt = render_prompt(conversation[:1], tokenizer, str(path), tools)
    assert tokenizer.decode(prompt.tolist()).startswith('<tools>[{"type": "function"')
