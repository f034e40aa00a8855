"""The error hierarchy: the library raises these; the CLI prints each as one line.

Every error carries where the problem is (file, row, key or field) and what was
expected, so that a user can fix the input without reading a traceback.
"""

from __future__ import annotations


class PreftuneError(Exception):
    """Base of every error preftune raises on purpose."""


class ConfigError(PreftuneError, ValueError):
    """A configuration value or key is wrong (a ValueError too, as TRL's and transformers' argument errors are).

    Attributes:
        key: the offending key (dotted for nested values), or None.
        file: the YAML file it came from, or None for Python/CLI values.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.key = key
        self.file = file
        self.message = message
        where = ", ".join(part for part in (f"file {file}" if file else "", f"key '{key}'" if key else "") if part)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(PreftuneError, ValueError):
    """A dataset file or row is unusable (a ValueError too, as TRL's data errors are).

    Attributes:
        file: the data file (or dataset name) concerned.
        row: 0-based row index within that file, or None for whole-file problems.
        field: the column/field concerned, or None.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.file = file
        self.row = row
        self.field = field
        self.message = message
        parts = []
        if file:
            parts.append(f"file {file}")
        if row is not None:
            parts.append(f"row {row}")
        if field:
            parts.append(f"field '{field}'")
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)


class CheckpointError(PreftuneError):
    """A checkpoint cannot be written or read back."""


def is_valid_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8, i.e. holds no lone surrogate (JSON and YAML escapes such as "\\ud800"
    make them; files, Arrow and SQLite cannot store them), so that it can be written and named in an error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
