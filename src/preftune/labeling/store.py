"""The labeling store: one SQLite file with prompts, their candidate responses, the pairs to judge and the judgments.

Every caller opens its own connection (`connect`, `opened`); every write is one `BEGIN IMMEDIATE` transaction
(WAL mode; concurrent writers queue), all SQL is parameterised, and `migrate` upgrades an older file. A choice is
stored in the pair's own order (`stored_choice`); the left/right order an annotator sees is a keyed hash
(`shown_left`). Candidates are imported as all pairs of a prompt's distinct non-empty responses.

The schema, the ordering rule, pairs and durability: docs/labeling-store.md.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.errors import DataError, PreftuneError, is_valid_unicode

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 60.0
STORED_CHOICES = ("a", "b", "tie", "both_bad", "skip")
SHOWN_CHOICES = ("left", "right", "tie", "both_bad", "skip")
MAX_ANNOTATOR_CHARS = 64
MAX_NOTE_CHARS = 5000
ROLES = ("system", "user", "assistant")


class LabelingError(PreftuneError):
    """A labeling request cannot be carried out (bad input, unknown pair, a second judgment of the same pair)."""


class InvalidInputError(LabelingError):
    """A field of a judgment (annotator, choice, note, pair id) is malformed."""


class UnknownPairError(LabelingError):
    """The pair id names no pair in the store."""


class AlreadyJudgedError(LabelingError):
    """The annotator already has an active judgment of this pair (undo it first)."""


# --------------------------------------------------------------------------------------------------------------
# Connections, transactions, migrations
# --------------------------------------------------------------------------------------------------------------


def connect(db_path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """A new connection to the store at `db_path`, migrated to `SCHEMA_VERSION`, in WAL mode.

    Autocommit mode (isolation_level=None): writes go through `transaction`. One connection per thread or request.

    Raises:
        DataError: the file is missing (unless `create`), is not a SQLite database, or was written by a newer schema.
    """
    path = Path(db_path)
    if not create and not path.is_file():
        raise DataError("no labeling store here; create one with `preftune label import --db DB candidates.jsonl`",
                        file=str(path))
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a crash of the process (not a power cut)
        migrate(conn, source=str(path))
    except sqlite3.DatabaseError as error:
        conn.close()
        raise DataError(f"cannot open as a labeling store: {error}", file=str(path)) from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def opened(db_path: str | Path, *, create: bool = False) -> Iterator[sqlite3.Connection]:
    """`connect`, closing the connection on exit."""
    conn = connect(db_path, create=create)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE: takes the write lock up front); rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create_v1(conn: sqlite3.Connection) -> None:
    """Version 0 (an empty file) -> 1: the tables of docs/labeling-store.md."""
    statements = (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE prompts (
            id INTEGER PRIMARY KEY, prompt_id TEXT NOT NULL UNIQUE, prompt_json TEXT NOT NULL,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE responses (
            id INTEGER PRIMARY KEY, prompt_ref INTEGER NOT NULL REFERENCES prompts(id), text TEXT NOT NULL,
            model TEXT, sampling_json TEXT, created_at TEXT NOT NULL, UNIQUE (prompt_ref, text))""",
        """CREATE TABLE pairs (
            id INTEGER PRIMARY KEY, prompt_ref INTEGER NOT NULL REFERENCES prompts(id),
            response_a INTEGER NOT NULL REFERENCES responses(id), response_b INTEGER NOT NULL REFERENCES responses(id),
            UNIQUE (response_a, response_b), CHECK (response_a < response_b))""",
        """CREATE TABLE judgments (
            id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator TEXT NOT NULL,
            shown_left TEXT NOT NULL CHECK (shown_left IN ('a', 'b')),
            choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad', 'skip')),
            note TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL, undone_at TEXT)""",
        "CREATE UNIQUE INDEX judgments_one_active ON judgments (pair_id, annotator) WHERE undone_at IS NULL",
        "CREATE INDEX judgments_by_annotator ON judgments (annotator, undone_at)",
    )
    for statement in statements:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('salt', ?)", (secrets.token_hex(16),))


Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: tuple[Migration, ...] = (_create_v1,)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The store's schema version; 0 for a file without the schema_version table (a new, empty store)."""
    table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if table is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS, *, source: str | None = None) -> int:
    """Bring the store to version len(migrations), applying migrations[v] for each version v from the current one.

    All steps run in one transaction: a failing step leaves the store at its old version, unchanged. Returns the
    new version.

    Raises:
        DataError: the store's version is newer than len(migrations) (written by a newer preftune).
    """
    target = len(migrations)
    if schema_version(conn) == target:
        return target
    with transaction(conn):
        current = schema_version(conn)  # again, under the write lock: another process may have migrated meanwhile
        if current > target:
            raise DataError(f"store schema version {current} is newer than this preftune's {target}; upgrade preftune",
                            file=source)
        for version in range(current, target):
            logger.info("migrating labeling store %s from schema version %d to %d", source or "", version, version + 1)
            migrations[version](conn)
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))
    return target


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------------------------
# Import of candidates
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ImportStats:
    """What one import added. Rows whose prompt and responses are all known already add nothing."""

    rows: int = 0
    new_prompts: int = 0
    new_responses: int = 0
    new_pairs: int = 0
    repeated_responses: int = 0  # identical to a response already stored for the prompt (or earlier in the row)
    empty_responses: int = 0  # empty or whitespace only: not stored


@dataclass(frozen=True)
class _Candidate:
    prompt_id: str
    prompt: Any
    responses: list[str]
    model: str | None
    sampling: dict | None


def read_candidates_file(path: str | Path) -> list[dict]:
    """The rows of a candidates JSON Lines file (blank lines skipped).

    Raises:
        DataError: the file is missing or unreadable, or a line is not a JSON object (naming its 0-based row).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read candidates: {error}", file=str(path)) from None
    rows = []
    for index, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            raise DataError(f"invalid JSON ({error}); expected one candidates object per line", file=str(path),
                            row=index) from None
        if not isinstance(row, dict):
            raise DataError(f"is {type(row).__name__}; expected a JSON object", file=str(path), row=index)
        rows.append(row)
    return rows


def import_candidates(db_path: str | Path, rows: Iterable[dict], *, source: str = "candidates") -> int:
    """Import candidate rows (the `preftune sample` format) into the store, creating it if needed.

    Each row: {"prompt_id": str, "prompt": str | [{"role", "content"}, ...], "responses": [str, ...],
    "model": str (optional), "sampling": {...} (optional)}. Returns the number of new pairs. Idempotent: importing
    the same rows again adds nothing; new responses for a known prompt_id are paired with its stored ones.

    Raises:
        DataError: a malformed row (naming `source`, the 0-based row and the field), or a known prompt_id with a
            different prompt. Nothing is imported then.
    """
    return import_candidate_rows(db_path, rows, source=source).new_pairs


def import_candidate_rows(db_path: str | Path, rows: Iterable[dict], *, source: str = "candidates") -> ImportStats:
    """`import_candidates`, returning the full `ImportStats`. All rows are checked first, then written in one
    transaction."""
    candidates = [_checked_candidate(row, index, source) for index, row in enumerate(rows)]
    stats = ImportStats(rows=len(candidates))
    with opened(db_path, create=True) as conn, transaction(conn):
        for index, candidate in enumerate(candidates):
            _insert_candidate(conn, candidate, stats, source, index)
    return stats


def _checked_candidate(row: Any, index: int, source: str) -> _Candidate:
    def bad(message: str, field_name: str | None = None) -> DataError:
        return DataError(message, file=source, row=index, field=field_name)

    if not isinstance(row, dict):
        raise bad(f"is {type(row).__name__}; expected an object with prompt_id, prompt and responses")
    prompt_id = row.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise bad(f"is {prompt_id!r:.60}; expected a non-empty string", "prompt_id")
    prompt = row.get("prompt")
    problem = _prompt_problem(prompt)
    if problem:
        raise bad(problem, "prompt")
    responses = row.get("responses")
    if not isinstance(responses, list) or not all(isinstance(text, str) for text in responses):
        raise bad(f"is {responses!r:.60}; expected a list of strings", "responses")
    if any(not is_valid_unicode(text) for text in responses):
        raise bad("holds a lone surrogate; expected valid Unicode text", "responses")
    model = row.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"is {model!r:.60}; expected a string", "model")
    sampling = row.get("sampling")
    if sampling is not None and not isinstance(sampling, dict):
        raise bad(f"is {sampling!r:.60}; expected an object", "sampling")
    return _Candidate(prompt_id, prompt, responses, model, sampling)


def _prompt_problem(prompt: Any) -> str | None:
    """Why `prompt` is not a non-empty string or a non-empty list of {role, content} messages; None when it is."""
    if isinstance(prompt, str):
        if not prompt.strip():
            return "is empty; expected prompt text"
        return None if is_valid_unicode(prompt) else "holds a lone surrogate; expected valid Unicode text"
    if not isinstance(prompt, list) or not prompt:
        return f"is {prompt!r:.60}; expected a string or a non-empty list of messages"
    for number, message in enumerate(prompt):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str) or not is_valid_unicode(message["content"])):
            return f"message {number} is {message!r:.60}; expected {{'role': one of {ROLES}, 'content': str}}"
    return None


def _insert_candidate(conn: sqlite3.Connection, candidate: _Candidate, stats: ImportStats, source: str,
                      index: int) -> None:
    prompt_ref = _prompt_ref(conn, candidate, stats, source, index)
    sampling_json = json.dumps(candidate.sampling, ensure_ascii=False) if candidate.sampling is not None else None
    for text in candidate.responses:
        if not text.strip():
            stats.empty_responses += 1
            continue
        cursor = conn.execute(
            "INSERT OR IGNORE INTO responses (prompt_ref, text, model, sampling_json, created_at) VALUES (?, ?, ?, ?, ?)",
            (prompt_ref, text, candidate.model, sampling_json, _now()))
        if cursor.rowcount == 1:
            stats.new_responses += 1
        else:
            stats.repeated_responses += 1
    response_ids = [row[0] for row in conn.execute("SELECT id FROM responses WHERE prompt_ref = ? ORDER BY id",
                                                   (prompt_ref,))]
    for first, second in itertools.combinations(response_ids, 2):
        cursor = conn.execute("INSERT OR IGNORE INTO pairs (prompt_ref, response_a, response_b) VALUES (?, ?, ?)",
                              (prompt_ref, first, second))
        stats.new_pairs += cursor.rowcount


def _prompt_ref(conn: sqlite3.Connection, candidate: _Candidate, stats: ImportStats, source: str, index: int) -> int:
    """The prompts.id of the candidate's prompt_id, inserting the prompt when new."""
    known = conn.execute("SELECT id, prompt_json FROM prompts WHERE prompt_id = ?", (candidate.prompt_id,)).fetchone()
    if known is not None:
        if json.loads(known[1]) != candidate.prompt:
            raise DataError(f"prompt_id {candidate.prompt_id!r} is already in the store with a different prompt",
                            file=source, row=index, field="prompt")
        return int(known[0])
    cursor = conn.execute("INSERT INTO prompts (prompt_id, prompt_json, created_at) VALUES (?, ?, ?)",
                          (candidate.prompt_id, json.dumps(candidate.prompt, ensure_ascii=False), _now()))
    stats.new_prompts += 1
    return int(cursor.lastrowid)


# --------------------------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairView:
    """One pair as one annotator sees it: `shown_left` ('a' or 'b') is the pair's response shown on the left."""

    pair_id: int
    prompt_id: str
    prompt: str | list[dict]
    shown_left: str
    left_text: str
    right_text: str


def check_annotator(name: Any) -> str:
    """The annotator name, stripped: 1 to MAX_ANNOTATOR_CHARS printable characters. Raises InvalidInputError."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("annotator: expected a non-empty name")
    name = name.strip()
    if len(name) > MAX_ANNOTATOR_CHARS or not name.isprintable() or not is_valid_unicode(name):
        raise InvalidInputError(f"annotator: expected at most {MAX_ANNOTATOR_CHARS} printable characters")
    return name


def check_note(note: Any) -> str:
    """The note (may be empty), at most MAX_NOTE_CHARS characters, stored verbatim. Raises InvalidInputError."""
    if note is None:
        return ""
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS or not is_valid_unicode(note):
        raise InvalidInputError(f"note: expected text of at most {MAX_NOTE_CHARS} characters")
    return note


def parse_pair_id(value: Any) -> int:
    """A pair id from a form field: decimal digits. Raises InvalidInputError."""
    text = value.strip() if isinstance(value, str) else ""
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise InvalidInputError(f"pair_id: {value!r:.40} is not a pair id; expected a positive integer")
    return int(text)


def stored_choice(shown_choice: str, shown_left: str) -> str:
    """A choice made on screen ('left' | 'right' | 'tie' | 'both_bad' | 'skip') in the pair's own a/b order."""
    if shown_choice not in SHOWN_CHOICES:
        raise InvalidInputError(f"choice: {shown_choice!r:.40}; expected one of {', '.join(SHOWN_CHOICES)}")
    if shown_choice == "left":
        return shown_left
    if shown_choice == "right":
        return "b" if shown_left == "a" else "a"
    return shown_choice


def shown_left(salt: str, annotator: str, pair_id: int) -> str:
    """Which response ('a' or 'b') this annotator sees on the left: one bit of HMAC-SHA256(salt, annotator, pair)."""
    digest = hmac.new(salt.encode(), f"{annotator}\x00{pair_id}".encode(), hashlib.sha256).digest()
    return "a" if digest[0] & 1 == 0 else "b"


def store_salt(conn: sqlite3.Connection) -> str:
    return conn.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()[0]


def pair_view(conn: sqlite3.Connection, pair_id: int, annotator: str) -> PairView:
    """The pair as `annotator` sees it. Raises UnknownPairError."""
    row = conn.execute(
        """SELECT pr.prompt_id, pr.prompt_json, ra.text, rb.text FROM pairs p
           JOIN prompts pr ON pr.id = p.prompt_ref JOIN responses ra ON ra.id = p.response_a
           JOIN responses rb ON rb.id = p.response_b WHERE p.id = ?""", (pair_id,)).fetchone()
    if row is None:
        raise UnknownPairError(f"pair_id: no pair {pair_id} in this store")
    prompt_id, prompt_json, text_a, text_b = row
    left = shown_left(store_salt(conn), annotator, pair_id)
    left_text, right_text = (text_a, text_b) if left == "a" else (text_b, text_a)
    return PairView(pair_id, prompt_id, json.loads(prompt_json), left, left_text, right_text)


def next_pair_id(conn: sqlite3.Connection, annotator: str) -> int | None:
    """The next pair for `annotator`: among the pairs they have no active judgment of, the one with the fewest
    active judgments by anyone (so several annotators first spread over the pairs), then the lowest id. None when
    they have judged every pair."""
    row = conn.execute(
        """SELECT p.id FROM pairs p
           WHERE NOT EXISTS (SELECT 1 FROM judgments j WHERE j.pair_id = p.id AND j.annotator = ?
                             AND j.undone_at IS NULL)
           ORDER BY (SELECT COUNT(*) FROM judgments j WHERE j.pair_id = p.id AND j.undone_at IS NULL), p.id
           LIMIT 1""", (annotator,)).fetchone()
    return None if row is None else int(row[0])


def has_judged(conn: sqlite3.Connection, annotator: str, pair_id: int) -> bool:
    row = conn.execute("SELECT 1 FROM judgments WHERE pair_id = ? AND annotator = ? AND undone_at IS NULL",
                       (pair_id, annotator)).fetchone()
    return row is not None


def record_judgment(conn: sqlite3.Connection, annotator: str, pair_id: int, shown_choice: str, note: str = "") -> int:
    """Store one judgment, committed at once; returns its id.

    `shown_choice` is what the annotator clicked ('left', 'right', 'tie', 'both_bad', 'skip'); it is stored in the
    pair's a/b order together with the order shown (`shown_left`).

    Raises:
        InvalidInputError: a malformed annotator, choice or note.
        UnknownPairError: no such pair.
        AlreadyJudgedError: the annotator has an active judgment of this pair.
    """
    annotator, note = check_annotator(annotator), check_note(note)
    if shown_choice not in SHOWN_CHOICES:
        raise InvalidInputError(f"choice: {shown_choice!r:.40}; expected one of {', '.join(SHOWN_CHOICES)}")
    with transaction(conn):
        if conn.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
            raise UnknownPairError(f"pair_id: no pair {pair_id} in this store")
        left = shown_left(store_salt(conn), annotator, pair_id)
        try:
            cursor = conn.execute(
                "INSERT INTO judgments (pair_id, annotator, shown_left, choice, note, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (pair_id, annotator, left, stored_choice(shown_choice, left), note, _now()))
        except sqlite3.IntegrityError:
            raise AlreadyJudgedError(f"pair_id: {annotator!r} has already judged pair {pair_id}; undo it first") from None
    return int(cursor.lastrowid)


def undo_last(conn: sqlite3.Connection, annotator: str) -> int | None:
    """Withdraw the annotator's most recent active judgment (kept, marked undone_at); returns its pair id, or None
    when they have none. Repeated undos walk further back."""
    annotator = check_annotator(annotator)
    with transaction(conn):
        row = conn.execute("SELECT id, pair_id FROM judgments WHERE annotator = ? AND undone_at IS NULL "
                           "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE judgments SET undone_at = ? WHERE id = ?", (_now(), row[0]))
    return int(row[1])


def progress(conn: sqlite3.Connection, annotator: str) -> tuple[int, int]:
    """(pairs this annotator has an active judgment of, including skips; pairs in the store)."""
    done = conn.execute("SELECT COUNT(*) FROM judgments WHERE annotator = ? AND undone_at IS NULL",
                        (annotator,)).fetchone()[0]
    total = conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
    return int(done), int(total)


# --------------------------------------------------------------------------------------------------------------
# Reading everything back (status, export)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgment:
    """One active judgment, choice in the pair's a/b order."""

    id: int
    pair_id: int
    annotator: str
    shown_left: str
    choice: str
    note: str
    created_at: str


@dataclass(frozen=True)
class Pair:
    """A pair with its texts: response_a and response_b in the pair's own order."""

    pair_id: int
    prompt_id: str
    prompt: str | list[dict]
    response_a: str
    response_b: str


@dataclass
class StoreStatus:
    """Counts of a store. `judgments_by_choice` counts active judgments; `annotators` maps name -> active count."""

    schema_version: int
    prompts: int
    responses: int
    pairs: int
    judgments_active: int
    judgments_undone: int
    judgments_by_choice: dict[str, int] = field(default_factory=dict)
    pairs_judged: int = 0
    pairs_judged_by_several: int = 0
    annotators: dict[str, int] = field(default_factory=dict)


def active_judgments(conn: sqlite3.Connection) -> list[Judgment]:
    """Every active (not undone) judgment, in the order they were made."""
    rows = conn.execute("SELECT id, pair_id, annotator, shown_left, choice, note, created_at FROM judgments "
                        "WHERE undone_at IS NULL ORDER BY id")
    return [Judgment(*row) for row in rows]


def all_pairs(conn: sqlite3.Connection) -> list[Pair]:
    """Every pair with its prompt and texts, by pair id."""
    rows = conn.execute(
        """SELECT p.id, pr.prompt_id, pr.prompt_json, ra.text, rb.text FROM pairs p
           JOIN prompts pr ON pr.id = p.prompt_ref JOIN responses ra ON ra.id = p.response_a
           JOIN responses rb ON rb.id = p.response_b ORDER BY p.id""")
    return [Pair(pair_id, prompt_id, json.loads(prompt_json), text_a, text_b)
            for pair_id, prompt_id, prompt_json, text_a, text_b in rows]


def store_status(conn: sqlite3.Connection) -> StoreStatus:
    def count(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    status = StoreStatus(
        schema_version=schema_version(conn),
        prompts=count("SELECT COUNT(*) FROM prompts"),
        responses=count("SELECT COUNT(*) FROM responses"),
        pairs=count("SELECT COUNT(*) FROM pairs"),
        judgments_active=count("SELECT COUNT(*) FROM judgments WHERE undone_at IS NULL"),
        judgments_undone=count("SELECT COUNT(*) FROM judgments WHERE undone_at IS NOT NULL"),
        pairs_judged=count("SELECT COUNT(DISTINCT pair_id) FROM judgments WHERE undone_at IS NULL"),
        pairs_judged_by_several=count("SELECT COUNT(*) FROM (SELECT pair_id FROM judgments WHERE undone_at IS NULL "
                                      "GROUP BY pair_id HAVING COUNT(*) >= 2)"),
    )
    by_choice = dict(conn.execute("SELECT choice, COUNT(*) FROM judgments WHERE undone_at IS NULL GROUP BY choice"))
    status.judgments_by_choice = {choice: int(by_choice.get(choice, 0)) for choice in STORED_CHOICES}
    status.annotators = {name: int(done) for name, done in conn.execute(
        "SELECT annotator, COUNT(*) FROM judgments WHERE undone_at IS NULL GROUP BY annotator ORDER BY annotator")}
    return status
