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
from datetime import datetime
from pathlib import Path
from typing import Any

from codestation.sessions import Session, Status

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    runtime       TEXT NOT NULL,
    workspace     TEXT NOT NULL,
    environment   TEXT NOT NULL,
    port          INTEGER NOT NULL,
    username      TEXT NOT NULL,
    password      TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    stopped_at    TEXT,
    error         TEXT,
    step          TEXT,
    runtime_state TEXT NOT NULL DEFAULT '{}',
    log_tail      TEXT
);
CREATE TABLE IF NOT EXISTS port_leases (
    port       INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL UNIQUE REFERENCES sessions(id) ON DELETE CASCADE
);
"""

_COLUMNS = [
    "id",
    "status",
    "runtime",
    "workspace",
    "environment",
    "port",
    "username",
    "password",
    "created_at",
    "started_at",
    "stopped_at",
    "error",
    "step",
    "runtime_state",
    "log_tail",
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
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

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


def _stamp(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _to_row(s: Session) -> tuple[Any, ...]:
    return (
        s.id,
        s.status.value,
        s.runtime,
        str(s.workspace),
        s.environment,
        s.port,
        s.username,
        s.password,
        s.created_at.isoformat(),
        _stamp(s.started_at),
        _stamp(s.stopped_at),
        s.error,
        s.step,
        json.dumps(s.runtime_state),
        s.log_tail,
    )


def _from_row(row: tuple[Any, ...]) -> Session:
    v = dict(zip(_COLUMNS, row, strict=True))
    return Session(
        id=v["id"],
        status=Status(v["status"]),
        runtime=v["runtime"],
        workspace=Path(v["workspace"]),
        environment=v["environment"],
        port=v["port"],
        username=v["username"],
        password=v["password"],
        created_at=datetime.fromisoformat(v["created_at"]),
        started_at=datetime.fromisoformat(v["started_at"]) if v["started_at"] else None,
        stopped_at=datetime.fromisoformat(v["stopped_at"]) if v["stopped_at"] else None,
        error=v["error"],
        step=v["step"],
        runtime_state=json.loads(v["runtime_state"]),
        log_tail=v["log_tail"],
    )
