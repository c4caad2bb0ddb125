"""The session store: SQLite under the data directory, the only code that writes SQL.

Two tables. `sessions` keeps every session ever started until it is deleted. `port_leases`
holds one row per host port a live session owns; its primary key is the rule that two live
sessions never share a port, whatever the code above it does. A session reaching `stopped` or
`failed` gives its lease back in the same transaction that records the final status.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from datetime import datetime
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from codestation.sessions import Session, Status

# SQLite column types of the Session fields; `_to_row`/`_from_row` convert by the field's type.
_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}
_FIELDS = {f.name: f for f in fields(Session)}
_HINTS = get_type_hints(Session)
_COLUMNS = list(_FIELDS)


def _base_type(name: str) -> Any:
    """The field's type without `| None`."""
    kind = _HINTS[name]
    if isinstance(kind, UnionType):
        return next(t for t in get_args(kind) if t is not type(None))
    return kind


def _schema() -> list[str]:
    columns = []
    for name in _COLUMNS:
        sql = _SQL_TYPES.get(_base_type(name), "TEXT")
        columns.append(f"{name} {sql}" + (" PRIMARY KEY" if name == "id" else ""))
    return [
        f"CREATE TABLE IF NOT EXISTS sessions ({', '.join(columns)})",
        "CREATE TABLE IF NOT EXISTS port_leases ("
        " port INTEGER PRIMARY KEY,"
        " session_id TEXT NOT NULL UNIQUE REFERENCES sessions(id) ON DELETE CASCADE)",
    ]


class PortTaken(Exception):
    """The port is leased to another live session (raised by `Store.create`)."""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The database, its WAL and the sandboxes' records hold every session's password.
        path.parent.chmod(0o700)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        path.chmod(0o600)  # it holds every session's password
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._transaction() as db:
            for statement in _schema():
                db.execute(statement)
            # A store made by an older version gains the columns it lacks (all may be NULL).
            have = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            for name in _COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE sessions ADD COLUMN {name}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def create(self, session: Session) -> None:
        """Record a new live session and lease its port, or raise PortTaken."""
        row = _to_row(session)
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO sessions ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                row,
            )
            try:
                db.execute(
                    "INSERT INTO port_leases (port, session_id) VALUES (?, ?)",
                    (session.port, session.id),
                )
            except sqlite3.IntegrityError as exc:
                raise PortTaken(session.port) from exc  # rolls the session back too

    def save(self, session: Session) -> None:
        """Write the session's current fields; a final status gives its port back."""
        row = _to_row(session)
        with self._transaction() as db:
            db.execute(
                f"UPDATE sessions SET {', '.join(f'{c} = ?' for c in _COLUMNS[1:])} WHERE id = ?",
                (*row[1:], row[0]),
            )
            if not session.status.live:
                db.execute("DELETE FROM port_leases WHERE session_id = ?", (session.id,))

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        return _from_row(row) if row else None

    def list(self, *, live_only: bool = False) -> list[Session]:
        where = (
            f"WHERE status IN ({', '.join(repr(s.value) for s in Status if s.live)})"
            if live_only
            else ""
        )
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM sessions {where} ORDER BY created_at"
            ).fetchall()
        return [_from_row(r) for r in rows]

    def leased_ports(self) -> dict[int, str]:
        with self._lock:
            rows = self._db.execute("SELECT port, session_id FROM port_leases").fetchall()
        return {port: sid for port, sid in rows}

    def delete(self, session_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM port_leases WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


def _encode(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _decode(name: str, raw: Any) -> Any:
    if raw is None:
        default = _FIELDS[name].default_factory  # e.g. a column added by a later version
        return default() if default is not MISSING else _FIELDS[name].default
    base = _base_type(name)
    if base is datetime:
        return datetime.fromisoformat(raw)
    if get_origin(base) is dict:
        return json.loads(raw)
    if base in (Status, Path):
        return base(raw)
    return raw


def _to_row(s: Session) -> tuple[Any, ...]:
    return tuple(_encode(getattr(s, name)) for name in _COLUMNS)


def _from_row(row: tuple[Any, ...]) -> Session:
    return Session(**{name: _decode(name, raw) for name, raw in zip(_COLUMNS, row, strict=True)})
