"""Output files that a crash cannot lose: written chunk by chunk, resumable.

    outputs = PartialOutputs([out_path, other_path], fingerprint, resume=args.resume)
    for start in range(outputs.done, len(records), chunk):
        ...  # write the chunk's lines to outputs.files (None on processes other than 0)
        outputs.commit(end, totals)
    outputs.finish()

Each OUTPUT is written as OUTPUT.partial; after every chunk the files are flushed to disk and
OUTPUT.partial.state (beside the first file) records how many input records they cover, each
file's length and any running totals, replaced atomically. `finish` renames the files to their
final names, so an existing OUTPUT is only ever replaced by a complete one. A resumed run cuts
each file back to the length the state recorded (dropping what a crash left of a chunk in
flight) and continues after the records it covers; the state's fingerprint (of the input and
the settings that shape the output) refuses a resume with another input or other settings.
With several processes, process 0 writes and its resume point is broadcast to the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxalign.errors import UserError


def fingerprint(records: Iterable[Any], settings: Any) -> str:
    """A hash of the input records (in order) and of `settings` (JSON-serializable)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for record in records:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


class PartialOutputs:
    """Files written as PATH.partial with a resume state; see the module docstring."""

    def __init__(self, paths: Sequence[str | Path], fingerprint: str, *, resume: bool):
        self.paths = [Path(p) for p in paths]
        self.partials = [partial_path(p) for p in self.paths]
        self.state_path = self.partials[0].with_name(self.partials[0].name + ".state")
        self.fingerprint = fingerprint
        self.main = jax.process_index() == 0
        self.done, self.totals = 0, {}
        if self.main and self.state_path.exists():
            if not resume:
                raise UserError(
                    f"{self.state_path}: an unfinished run wrote part of this output: pass "
                    "--resume to continue it, or delete it and the .partial files"
                )
            self._load()
        if jax.process_count() > 1:  # the same chunks on every process
            self.done = int(multihost_utils.broadcast_one_to_all(np.int32(self.done)))
        self.files: list[IO[str] | None] = [None] * len(self.paths)
        if self.main:
            for p in self.partials:
                p.parent.mkdir(parents=True, exist_ok=True)
            mode = "a" if self.done else "w"
            self.files = [p.open(mode, encoding="utf-8") for p in self.partials]

    def _load(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.state_path}: not JSON ({e.msg})") from None
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"{self.state_path}: written for another input or other settings; delete it "
                "and the .partial files to start over"
            )
        for p, size in zip(self.partials, state["bytes"], strict=True):
            if not p.exists() or p.stat().st_size < size:
                raise UserError(f"{p}: shorter than its resume state says ({size} bytes)")
            with p.open("r+b") as f:
                f.truncate(size)  # what a crash left of the chunk in flight
        self.done, self.totals = int(state["done"]), dict(state["totals"])

    def commit(self, done: int, totals: dict[str, float] | None = None) -> None:
        """The first `done` input records are in the files: flush them to disk and record it."""
        self.done = done
        self.totals = dict(totals or {})
        if not self.main:
            return
        sizes = []
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            sizes.append(os.fstat(f.fileno()).st_size)
        state = {
            "fingerprint": self.fingerprint,
            "done": done,
            "bytes": sizes,
            "totals": self.totals,
        }
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        for f in self.files:
            if f is not None:
                f.close()

    def finish(self) -> None:
        """Every record is in: the files take their final names."""
        self.close()
        if self.main:
            for partial, path in zip(self.partials, self.paths, strict=True):
                os.replace(partial, path)
            self.state_path.unlink(missing_ok=True)

    def __enter__(self) -> PartialOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
