"""Reading records from JSONL (optionally gzipped), Parquet, ArrayRecord, TFDS or an in-memory
list, with one-line errors naming the file, the line or record index, and the field.

An SFT record is `{"prompt": str, "completion": str}` (optionally `"system": str`) or
`{"messages": [{"role": ..., "content": ...}, ...]}`, or raw text `{"text": str}` for base
pretraining (one assistant turn: every token is a target). Other record kinds (preference pairs,
prompts) pass their own `validate` function to `read_records` / `record_dataset`.

A source spec is a path whose extension picks the format (`.jsonl`, `.jsonl.gz`, `.parquet`,
`.arrayrecord` / `.array_record`), `tfds:NAME[/CONFIG]:SPLIT` (read with `tfds.data_source`, never
downloaded), or a Python list of records.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from jaxalign.data.templates import ROLES
from jaxalign.errors import DataError
from jaxalign.paths import run_path

ON_ERROR_CHOICES = ("raise", "skip")
ARRAY_RECORD_SUFFIXES = (".arrayrecord", ".array_record")
Validate = Callable[[Any, str], Any]  # (record, where) -> anything; raises DataError if bad


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
    if "text" in record and "prompt" not in record and "completion" not in record:
        # Raw text (base pretraining): one assistant turn, so every token of it is a target.
        if not isinstance(record["text"], str) or not record["text"]:
            raise _fail(where, "field 'text' must be a non-empty string")
        return [{"role": "assistant", "content": record["text"]}]
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


def _validate_sft(record: Any, where: str) -> None:
    to_messages(record, where=where)


def _parse_json_bytes(raw: bytes, where: str) -> Any:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _fail(where, f"invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(where, f"malformed JSON ({e.msg} at column {e.colno})") from None


def _to_python(value: Any, where: str, field: str = "") -> Any:
    """TFDS/NumPy values as plain Python: bytes -> str (UTF-8), arrays -> lists."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(where, f"field '{field}' has invalid UTF-8 at byte {e.start}") from None
    if isinstance(value, dict):
        return {k: _to_python(v, where, f"{field}.{k}" if field else k) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind == "S":
            return [_to_python(v, where, f"{field}[{i}]") for i, v in enumerate(value.tolist())]
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_python(v, where, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def source_name(spec: Any) -> str:
    """How errors and stats name a source: its path or spec, or `<memory>` for a list."""
    return "<memory>" if isinstance(spec, (list, tuple)) else str(spec)


def source_format(spec: Any) -> str:
    """`memory`, `jsonl`, `parquet`, `arrayrecord` or `tfds`; DataError for anything else."""
    if isinstance(spec, (list, tuple)):
        return "memory"
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data source must be a path, a 'tfds:' spec or a list, got {spec!r}")
    if spec.startswith("tfds:"):
        return "tfds"
    if spec.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if spec.endswith(".parquet"):
        return "parquet"
    if spec.endswith(ARRAY_RECORD_SUFFIXES):
        return "arrayrecord"
    raise DataError(
        "unknown data format (expected .jsonl, .jsonl.gz, .parquet, .arrayrecord, "
        ".array_record or tfds:NAME[/CONFIG]:SPLIT)",
        where=spec,
    )


def _raw_jsonl(path: str):
    """(where, record-or-DataError) for each non-blank line."""
    try:
        with run_path(path, key="data").open("rb") as stored:  # a gs:// URL too
            f = gzip.open(stored) if path.endswith(".gz") else stored
            for line_number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    yield where, _parse_json_bytes(raw, where)
                except DataError as e:
                    yield where, e
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip `.gz` file
        raise DataError(f"cannot read file ({e})", where=path) from None


def _raw_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow (pip install pyarrow)", where=path) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(
            f"cannot read Parquet file ({type(e).__name__}: {e})".splitlines()[0], where=path
        ) from None
    for i, row in enumerate(rows):
        # Parquet has no per-record absent fields: a null column value means "absent".
        yield f"{path}:record {i}", {k: v for k, v in row.items() if v is not None}


def _raw_arrayrecord(path: str):
    try:
        source = grain.sources.ArrayRecordDataSource([path])
        raw_records = source.__getitems__(list(range(len(source)))) if len(source) else []
    except Exception as e:  # array_record raises RuntimeError/ValueError for bad files
        raise DataError(
            f"cannot read ArrayRecord file ({type(e).__name__}: {e})".splitlines()[0], where=path
        ) from None
    for i, raw in enumerate(raw_records):
        where = f"{path}:record {i}"
        try:
            yield where, _parse_json_bytes(raw, where)
        except DataError as e:
            yield where, e


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG]:SPLIT` -> (NAME[/CONFIG], SPLIT)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise DataError("expected tfds:NAME[/CONFIG]:SPLIT", where=spec)
    return parts[1], parts[2]


def _raw_tfds(spec: str, data_dir: str | None):
    name, split = parse_tfds_spec(spec)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "reading TFDS needs tensorflow-datasets (pip install 'jaxalign[tfds]')", where=spec
        ) from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        length = len(source)
        items = [source[i] for i in range(length)]
    except Exception as e:  # unknown dataset, missing files, bad split...
        message = f"cannot open TFDS dataset ({type(e).__name__}: {e})".splitlines()[0]
        raise DataError(message, where=spec) from None
    for i, item in enumerate(items):
        where = f"{spec}:record {i}"
        try:
            yield where, _to_python(item, where)
        except DataError as e:
            yield where, e


def read_records(
    spec: Any,
    *,
    validate: Validate | None = None,
    on_error: str = "raise",
    data_dir: str | None = None,
) -> tuple[list[Any], int]:
    """Valid records of a source and how many bad ones were skipped.

    `validate(record, where)` raises DataError for a bad record (default: an SFT record). With
    on_error="raise" the first bad record raises DataError `SOURCE:LINE: ...` (JSONL) or
    `SOURCE:record N: ...`; with "skip" bad records are dropped and counted. No valid records is
    an error.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    validate = validate or _validate_sft
    fmt = source_format(spec)
    name = source_name(spec)
    if fmt == "memory":
        raw = ((f"<memory>[{i}]", record) for i, record in enumerate(spec))
    elif fmt == "tfds":
        raw = _raw_tfds(spec, data_dir)
    else:
        if not run_path(spec, key="data").is_file():
            raise DataError("data file not found", where=spec)
        raw = {"jsonl": _raw_jsonl, "parquet": _raw_parquet, "arrayrecord": _raw_arrayrecord}[fmt](
            spec
        )
    records: list[Any] = []
    skipped = 0
    for where, record in raw:
        try:
            if isinstance(record, DataError):
                raise record
            validate(record, where)
            records.append(record)
        except DataError:
            if on_error == "raise":
                raise
            skipped += 1
    if not records:
        detail = f" ({skipped} bad records skipped)" if skipped else ""
        raise DataError(f"no valid records{detail}", where=name)
    return records, skipped


def read_records_with_ids(
    spec: Any,
    *,
    validate: Validate,
    on_error: str = "raise",
    data_dir: str | None = None,
) -> tuple[list[Any], int, list[str]]:
    """`read_records` plus each valid record's id (`path:LINE` for JSONL, `path:record N`,
    `<memory>[N]`), aligned with the records, for naming the records of a batch in errors."""
    ids: list[str] = []

    def check_and_keep_id(record: Any, where: str) -> None:
        validate(record, where)  # raises DataError for a bad record: no id kept
        ids.append(where)

    records, skipped = read_records(
        spec, validate=check_and_keep_id, on_error=on_error, data_dir=data_dir
    )
    return records, skipped, ids


def record_dataset(
    spec: Any,
    *,
    validate: Validate | None = None,
    on_error: str = "raise",
    data_dir: str | None = None,
) -> tuple[grain.MapDataset, int]:
    """A Grain MapDataset of a source's valid raw records, and the number skipped."""
    records, skipped = read_records(spec, validate=validate, on_error=on_error, data_dir=data_dir)
    return grain.MapDataset.source(records), skipped


def read_jsonl(path: str, *, on_error: str = "raise") -> tuple[list[dict], int]:
    """Valid SFT records of a `.jsonl` / `.jsonl.gz` file and how many bad ones were skipped.

    With on_error="raise" the first bad record raises DataError `path:line: ...`; with "skip" bad
    records are dropped and counted. Blank lines are ignored. No valid records is an error.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if not run_path(path, key="data").is_file():
        raise DataError("data file not found", where=str(path))
    records: list[dict] = []
    skipped = 0
    for where, record in _raw_jsonl(str(path)):
        try:
            if isinstance(record, DataError):
                raise record
            to_messages(record, where=where)
            records.append(record)
        except DataError:
            if on_error == "raise":
                raise
            skipped += 1
    if not records:
        detail = f" ({skipped} bad records skipped)" if skipped else ""
        raise DataError(f"no valid records{detail}", where=str(path))
    return records, skipped
