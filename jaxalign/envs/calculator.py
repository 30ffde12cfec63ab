"""The bundled `calculator` environment: an arithmetic question (the quickstart's `arithmetic`
records, or any record with an integer `answer`), one tool `calculate(expression)`, reward 1 when
the answer's last integer is the record's.

The tool never evaluates model text as Python: `safe_eval` walks the expression's syntax tree
and allows numbers, + - * / // % ** and parentheses only, with bounded exponents, operand sizes
and expression length.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from jaxalign.envs.base import ToolEnvironment
from jaxalign.envs.tools import Tool

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_INTEGER = re.compile(r"-?\d+")


class CalculatorError(ValueError):
    """An expression the calculator does not accept."""


def safe_eval(expression: str) -> int | float:
    """The value of an arithmetic expression (CalculatorError for anything else)."""
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def _bounded(x: int | float) -> int | float:
    if isinstance(x, complex) or (isinstance(x, float) and not math.isfinite(x)):
        raise CalculatorError("result is not a real number")
    if abs(x) > MAX_MAGNITUDE:
        raise CalculatorError("result too large")
    return x


def calculate(expression: str) -> str:
    """The calculator tool: the expression's value as text (integers without a decimal point)."""
    value = safe_eval(expression)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


CALCULATOR = Tool(
    name="calculate",
    fn=calculate,
    description="evaluates arithmetic, e.g. 12 * (3 + 4)",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
        "required": ["expression"],
    },
)


class CalculatorEnvironment(ToolEnvironment):
    """An arithmetic question with a calculator; reward 1 when the answer's last integer equals
    the last integer of the record's `answer`."""

    tools = (CALCULATOR,)

    def reset(self, record: dict) -> list[dict]:
        """The record's prompt; ValueError unless its `answer` holds an integer."""
        if not _INTEGER.findall(str(record.get("answer", ""))):
            raise ValueError("field 'answer' must hold an integer")
        return super().reset(record)

    def score(self, answer: str) -> float:
        want = _INTEGER.findall(str(self.record.get("answer", "")))
        got = _INTEGER.findall(answer)
        return float(bool(want and got) and int(got[-1]) == int(want[-1]))


class GuidedCalculatorEnvironment(CalculatorEnvironment):
    """The calculator with a shaped reward for RL: `call_reward` more, once per episode, for a
    tool call whose result is the record's answer (the right expression), on top of the
    answer's 1. Evals use `CalculatorEnvironment` (success: the answer's reward)."""

    call_reward = 0.5

    def reset(self, record: dict) -> list[dict]:
        self.call_rewarded = False
        return super().reset(record)

    def step(self, assistant_text: str) -> tuple[list[dict] | None, float, bool, dict]:
        observation, reward, done, info = super().step(assistant_text)
        want = _INTEGER.findall(str(self.record.get("answer", "")))[-1]
        if observation and not self.call_rewarded:
            if any(m["content"].strip() == str(int(want)) for m in observation):
                self.call_rewarded = True
                reward += self.call_reward
        return observation, reward, done, info
