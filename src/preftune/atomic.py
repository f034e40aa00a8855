"""Atomic writes: after a crash or an error at any moment, a file or folder holds its old content or its new one,
never a torn mix.

Every writer here writes into a hidden sibling with a unique name (``.<name>.tmp-<random>``, a staging folder
``.<name>.staging-<random>``), fsyncs what it wrote, renames it into place and fsyncs the parent folder, so that the
rename itself survives a power cut. On failure the temporary is removed, the error propagates and the target is as
it was. Temporaries are created with the usual permissions (the umask's), never only for the owner.

- files: ``write_bytes``, ``write_text``, ``write_json``, ``write_jsonl``, and ``open_atomic`` for writers that
  want a file handle (csv, matplotlib);
- a folder replaced as a whole: ``write_folder`` (checkpoints);
- files moved into a folder that may hold others: ``update_folder`` (saved models and adapters).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's content to disk (a folder: its entries, i.e. renames into it). Filesystems that
    refuse fsync on a folder are tolerated."""
    path = Path(path)
    is_folder = path.is_dir()
    descriptor = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_folder else 0))
    try:
        os.fsync(descriptor)
    except OSError:
        if not is_folder:
            raise
    finally:
        os.close(descriptor)


def sibling_name(path: Path, tag: str) -> Path:
    """A hidden, unique sibling of ``path``: ``.<name>.<tag>-<12 random hex digits>``."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------------------- files
@contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO]:
    """A handle on a temporary sibling of ``path`` (``mode`` "w" or "wb"); when the block ends without an error the
    file is fsynced and renamed over ``path``; on an error it is removed and ``path`` is left as it was. Creates the
    parent folders."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes a whole file: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = sibling_name(path, "tmp")
    text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
    try:
        with open(temporary, mode.replace("w", "x"), **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with open_atomic(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with open_atomic(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, ensure_ascii: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
    """Write ``value`` as one JSON document (UTF-8; non-ASCII text written as itself by default) atomically."""
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, default=default))


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None (JSON has no
    NaN or Infinity; ``json.dumps`` would write them as bare words other readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write ``rows`` as JSON Lines (one compact object per line, UTF-8, non-ASCII as itself) atomically; returns
    how many rows were written."""
    count = 0
    with open_atomic(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


# ------------------------------------------------------------------------------------------------------ folders
def write_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace the folder ``target`` as a whole by what ``write(staging)`` puts into an empty staging folder.

    Every file and folder written is fsynced, then the staging folder is renamed to ``target`` (an existing
    ``target`` is first renamed aside, put back if the second rename fails, and removed afterwards), then the parent
    is fsynced. If anything fails, the staging folder is removed and ``target`` is as it was. Returns ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling_name(target, "staging")
    staging.mkdir()
    try:
        write(staging)
        _fsync_tree(staging)
        if target.exists():  # swap, never leaving a moment without a whole folder of either version
            old = sibling_name(target, "old")
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def update_folder(folder: str | os.PathLike, write: Callable[[Path], None], *,
                  replaced_patterns: Iterable[str] = ()) -> Path:
    """Write files into ``folder`` through ``write(staging)``: the files it puts into an empty staging folder (no
    subfolders) are fsynced, then each is renamed into ``folder`` (replacing a file of the same name), files of
    ``folder`` that match one of ``replaced_patterns`` (``fnmatch``) and were not written this time are removed
    (left-overs of an earlier save), and ``folder`` and its parent are fsynced. Other files of ``folder`` are kept.

    Each file is replaced atomically; the set of files is not (a crash between two renames can leave new weights
    beside an old config). If ``write`` fails, ``folder`` is not touched. Returns ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling_name(folder, "staging")
    staging.mkdir()
    patterns = tuple(replaced_patterns)
    try:
        write(staging)
        written = sorted(staging.iterdir())
        for item in written:
            if not item.is_file() or item.is_symlink():
                raise RuntimeError(f"unexpected {'link' if item.is_symlink() else 'folder'} {item.name} in a save "
                                   "into a folder (expected files only)")
            fsync_path(item)
        folder.mkdir(exist_ok=True)
        for item in written:
            os.replace(item, folder / item.name)
        names = {item.name for item in written}
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in names and any(fnmatch.fnmatch(stale.name, p) for p in patterns):
                stale.unlink()
        fsync_path(folder)
        fsync_path(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root``, then ``root`` itself."""
    for path in sorted(root.rglob("*")):
        if path.is_file() or path.is_dir():
            fsync_path(path)
    fsync_path(root)
