"""Reading SFT records from JSONL (optionally gzipped), with one-line errors naming file:line.

A record is `{"prompt": str, "completion": str}` (optionally `"system": str`) or
`{"messages": [{"role": ..., "content": ...}, ...]}`.
"""

from __future__ import annotations

import gzip
import json
import os

from jaxalign.data.templates import ROLES
from jaxalign.errors import DataError

ON_ERROR_CHOICES = ("raise", "skip")


def _fail(where: str, message: str) -> DataError:
    return DataError(message, where=where)


def _messages_from_list(raw: object, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "field 'messages' must be a non-empty list")
    messages = []
    for i, message in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(where, f"field '{field}' must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise _fail(where, f"field '{field}.role' must be a string")
        if role not in ROLES:
            expected = ", ".join(ROLES)
            raise _fail(
                where, f"field '{field}.role' has unknown role {role!r} (expected {expected})"
            )
        if not isinstance(content, str):
            raise _fail(where, f"field '{field}.content' must be a string")
        if role == "assistant" and not content:
            raise _fail(where, f"field '{field}.content' must be a non-empty string")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, "field 'messages' must contain an assistant message")
    return messages


def to_messages(record: dict, *, where: str) -> list[dict]:
    """The record as `{"role", "content"}` dicts; DataError naming `where` and the field."""
    if not isinstance(record, dict):
        raise _fail(where, "record must be a JSON object")
    if "messages" in record:
        return _messages_from_list(record["messages"], where)
    if "prompt" not in record and "completion" not in record:
        raise _fail(
            where, "record must have a 'messages' field or 'prompt' and 'completion' fields"
        )
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str):
        raise _fail(where, "field 'prompt' must be a string")
    if not isinstance(completion, str) or not completion:
        raise _fail(where, "field 'completion' must be a non-empty string")
    messages = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise _fail(where, "field 'system' must be a string")
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": completion})
    return messages


def _parse_line(raw: bytes, where: str) -> dict:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _fail(where, f"invalid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(where, f"malformed JSON ({e.msg} at column {e.colno})") from None
    to_messages(record, where=where)
    return record


def read_jsonl(path: str, *, on_error: str = "raise") -> tuple[list[dict], int]:
    """Valid records of a `.jsonl` / `.jsonl.gz` file and how many bad ones were skipped.

    With on_error="raise" the first bad record raises DataError `path:line: ...`; with "skip" bad
    records are dropped and counted. Blank lines are ignored. No valid records is an error.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if not os.path.isfile(path):
        raise DataError("data file not found", where=str(path))
    opener = gzip.open if str(path).endswith(".gz") else open
    records: list[dict] = []
    skipped = 0
    try:
        with opener(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    records.append(_parse_line(raw, f"{path}:{line_number}"))
                except DataError:
                    if on_error == "raise":
                        raise
                    skipped += 1
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip `.gz` file
        raise DataError(f"cannot read file ({e})", where=str(path)) from None
    if not records:
        detail = f" ({skipped} bad records skipped)" if skipped else ""
        raise DataError(f"no valid records{detail}", where=str(path))
    return records, skipped
