"""User-facing errors: one clear line naming what is wrong and where."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by user input (config, data, paths).

    The CLI prints `str(error)` as a single line and exits with status 2; the traceback is shown
    only with `--debug`.
    """

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(UserError):
    """A config key, type or value is invalid."""


class DataError(UserError):
    """A data file or record is invalid."""
