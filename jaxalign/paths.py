"""Paths that may be local or in object storage: run directories, checkpoints, metrics, configs,
exports and data files.

A local path stays a `pathlib.Path`. A `gs://bucket/key` URL becomes an `etils.epath.Path`, the
path type Orbax itself uses: small files (config.yaml, metrics.jsonl, exports, JSONL data) go
through gcsfs, and Orbax writes checkpoint arrays through TensorStore's own `gcs` driver. Any
other URL scheme is one UserError naming the config key, never a local directory named `s3:`.

Emulators and test set-ups (docs/launch.md#gs-run-directories): `STORAGE_EMULATOR_HOST` points
gcsfs at an emulator, `TENSORSTORE_GCS_HTTP_URL` points TensorStore (Orbax's array writes) at it,
and `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives TensorStore a fixed token instead of looking up Google
credentials; tests/test_gcs.py sets them for a fake-gcs-server it starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from jaxalign.errors import UserError

REMOTE_SCHEMES = ("gs",)  # end-to-end tested against a GCS emulator (tests/test_gcs.py)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(value: str | os.PathLike) -> str | None:
    """'gs' for 'gs://b/x', None for a local path."""
    match = _URL.match(os.fspath(value))
    return match.group(1).lower() if match else None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage rather than the local file system."""
    return url_scheme(path) not in (None, "file")


def unsupported_scheme(value: str | os.PathLike | None, key: str) -> str | None:
    """One line naming `key` when `value` is a URL whose scheme is not supported, else None."""
    scheme = url_scheme(value) if value is not None else None
    if scheme is None or scheme == "file" or scheme in REMOTE_SCHEMES:
        return None
    supported = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
    return (
        f"{key}={os.fspath(value)}: the {scheme}:// scheme is not supported "
        f"(use a local path or {supported})"
    )


def run_path(value: str | os.PathLike, *, key: str = "run_dir") -> Any:
    """A local `Path`, or an `epath.Path` for a supported remote URL (`gs://`). UserError naming
    `key` for any other scheme. Accepts an `epath.Path` (its str() is the URL) unchanged."""
    text = os.fspath(value)
    scheme = url_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return Path(text[len("file://") :])
    if problem := unsupported_scheme(text, key):
        raise UserError(problem)
    if not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
        raise UserError(f"{key}={text}: gs:// needs gcsfs (pip install 'jaxalign[gcs]')")
    _configure_gcsfs()
    from etils import epath

    return epath.Path(text)


def absolute(path: Any) -> Any:
    """`path.absolute()` for a local path; a URL is absolute already."""
    return path if is_remote(path) else path.absolute()


def copy_file(source: str | os.PathLike, destination: Any) -> None:
    """Copy one (small) file; either side may be a URL."""
    run_path(destination, key="output").write_bytes(run_path(source, key="source").read_bytes())


def _configure_gcsfs() -> None:
    """TensorStore writes checkpoint objects behind gcsfs's back, so gcsfs must not answer
    listings (Orbax's `latest_step`, a resume) from its cache. Set before the first filesystem
    is made; a user's own fsspec config for gcs still wins."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


class _RemoteAppend:
    """Append-only text file in object storage, where objects cannot be appended to: keeps the
    whole text and uploads it again at most every `upload_every_s` seconds and on close."""

    def __init__(self, path: Any, upload_every_s: float):
        self.path = path
        self.upload_every_s = upload_every_s
        self._text = path.read_text() if path.exists() else ""
        self._uploaded = time.monotonic()
        self._dirty = False

    def write(self, text: str) -> int:
        self._text += text
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if self._dirty and time.monotonic() - self._uploaded >= self.upload_every_s:
            self._upload()

    def _upload(self) -> None:
        self.path.write_text(self._text)
        self._uploaded = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        if self._dirty:
            self._upload()


def open_append(path: Any, *, upload_every_s: float = 30.0) -> IO[str]:
    """A text file opened for appending: a local file, or for a URL an object rewritten whole
    at most every `upload_every_s` seconds and on close (object storage has no append)."""
    if is_remote(path):
        return _RemoteAppend(path, upload_every_s)  # type: ignore[return-value]
    return Path(path).open("a")


class LocalMirror:
    """A local scratch directory for writers that need a file system (TensorBoard's event
    files), copied to `remote` at most every `every_s` seconds (`sync`) and on `close`."""

    def __init__(self, remote: Any, every_s: float = 30.0):
        self.remote = remote
        self.every_s = every_s
        self.local = Path(tempfile.mkdtemp(prefix="jaxalign-mirror-"))
        self._synced = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._synced >= self.every_s

    def sync(self) -> None:
        for file in sorted(self.local.rglob("*")):
            if file.is_file():
                (self.remote / str(file.relative_to(self.local))).write_bytes(file.read_bytes())
        self._synced = time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
