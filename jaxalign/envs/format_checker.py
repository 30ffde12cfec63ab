"""The bundled `format_checker` environment: a quickstart task record (a `family` with what its
checker needs, `jaxalign/rewards/checkers.py`), and a tool `check_answer(answer)` that says
whether a draft passes the record's checker before the model answers. Reward 1 when the final
answer passes."""

from __future__ import annotations

from jaxalign.envs.base import ToolEnvironment
from jaxalign.envs.tools import Tool
from jaxalign.rewards import checkers


class FormatCheckerEnvironment(ToolEnvironment):
    """The quickstart's constraint checkers as a "check my answer" tool."""

    def __init__(self, settings=None):
        super().__init__(settings)
        self.tools = (
            Tool(
                name="check_answer",
                fn=self.check_answer,
                description="says whether a draft answer meets the task's constraints",
                parameters={
                    "type": "object",
                    "properties": {"answer": {"type": "string", "description": "the draft"}},
                    "required": ["answer"],
                },
            ),
        )

    def reset(self, record: dict) -> list[dict]:
        """The record's prompt; ValueError unless its `family` has a checker."""
        families = checkers.TASK_FAMILIES + checkers.SAFETY_FAMILIES
        if record.get("family") not in families:
            raise ValueError(f"field 'family' must be one of {', '.join(families)}")
        return super().reset(record)

    def check_answer(self, answer: str) -> str:
        """'passes' or 'fails' under the record's checker."""
        if not isinstance(answer, str):
            raise TypeError("answer must be a string")
        return "passes" if checkers.check(self.record, answer) else "fails"

    def score(self, answer: str) -> float:
        return float(checkers.check(self.record, answer))
