"""The store: SQLite under the data directory, the only code that writes SQL.

`sessions` keeps every session ever started until it is deleted. `port_leases` holds one row
per host port a live session owns; its primary key is the rule that two live sessions never
share a port, whatever the code above it does. A session reaching `stopped` or `failed` gives
its lease back in the same transaction that records the final status.

`users`, `tokens` and `logins` are the accounts (`identity.py`): a token belongs to a user, a
login to a token (and a session host's login to the login it came from); deleting a token
deletes its logins with it, by the foreign keys.
"""

from __future__ import annotations

import builtins
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from datetime import datetime
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import SecretStr

from codestation.identity import Login, Token, User
from codestation.sessions import Session, Status

log = logging.getLogger("codestation")

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
        "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, created_at TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS tokens ("
        " id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name), digest TEXT NOT NULL,"
        " admin INTEGER NOT NULL, created_at TEXT NOT NULL, expires_at TEXT,"
        " last_used_at TEXT, note TEXT NOT NULL DEFAULT '')",
        "CREATE TABLE IF NOT EXISTS logins ("
        " id TEXT PRIMARY KEY, digest TEXT NOT NULL,"
        " token_id TEXT NOT NULL REFERENCES tokens(id) ON DELETE CASCADE,"
        " scope TEXT NOT NULL, csrf TEXT NOT NULL, created_at TEXT NOT NULL,"
        " expires_at TEXT NOT NULL, parent TEXT REFERENCES logins(id) ON DELETE CASCADE)",
        "CREATE TABLE IF NOT EXISTS login_codes ("
        " id TEXT PRIMARY KEY, digest TEXT NOT NULL,"
        " token_id TEXT NOT NULL REFERENCES tokens(id) ON DELETE CASCADE,"
        " expires_at TEXT NOT NULL)",
    ]


class PortTaken(Exception):
    """The port is leased to another live session (raised by `Store.create`)."""


class LimitReached(Exception):
    """The session's owner has as many live sessions as they may (raised by `Store.create`)."""


class Full(Exception):
    """The service has as many live sessions, or as much memory reserved, as it may (raised by
    `Store.create`): `what` is "sessions" or "memory", with what is used and the most."""

    def __init__(self, what: str, used: int, most: int) -> None:
        super().__init__(what, used, most)
        self.what, self.used, self.most = what, used, most


@dataclass(frozen=True)
class Quota:
    """What a new live session must fit in, counted in the transaction that records it, so
    concurrent starts cannot overshoot. None: no limit."""

    per_owner: int | None = None  # live sessions of one owner
    sessions: int | None = None  # live sessions of everyone
    memory: int | None = None  # bytes of memory that live sessions reserve, together


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The database, its WAL and the sandboxes' records hold every session's password.
        path.parent.chmod(0o700)
        self.path = path
        self._lock = threading.Lock()
        self._unreadable: set[str] = set()
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

    def create(self, session: Session, quota: Quota | None = None) -> None:
        """Record a new live session and lease its port (unless it has none: port 0), or raise
        PortTaken; or LimitReached or Full if it does not fit in `quota`."""
        row = _to_row(session)
        quota = quota or Quota()
        with self._transaction() as db:
            if quota.per_owner is not None:
                (live,) = db.execute(
                    f"SELECT COUNT(*) FROM sessions WHERE owner = ? AND {_LIVE}", (session.owner,)
                ).fetchone()
                if live >= quota.per_owner:
                    raise LimitReached(live)
            count, reserved = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(memory), 0) FROM sessions WHERE {_LIVE}"
            ).fetchone()
            if quota.sessions is not None and count >= quota.sessions:
                raise Full("sessions", count, quota.sessions)
            if quota.memory is not None and reserved + session.memory > quota.memory:
                raise Full("memory", reserved, quota.memory)
            db.execute(
                f"INSERT INTO sessions ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                row,
            )
            if not session.port:  # a session running elsewhere holds no port of this host
                return
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
        found = self._decoded([row]) if row else []
        return found[0] if found else None

    def list(self, *, live_only: bool = False) -> list[Session]:
        where = f"WHERE {_LIVE}" if live_only else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM sessions {where} ORDER BY created_at"
            ).fetchall()
        return self._decoded(rows)

    def _decoded(self, rows: builtins.list[tuple[Any, ...]]) -> builtins.list[Session]:
        """The sessions these rows hold. A row this version cannot read (edited by hand, or
        written by another version) is left out, and said once, rather than making every
        session unreadable."""
        sessions = []
        for row in rows:
            try:
                sessions.append(_from_row(row))
            except (TypeError, ValueError, KeyError) as exc:
                if row[0] not in self._unreadable:
                    self._unreadable.add(row[0])
                    log.warning("session %s in the store cannot be read, left out: %s", row[0], exc)
        return sessions

    def usage(self) -> tuple[int, int]:
        """How many sessions are live, and the bytes of memory they reserve."""
        with self._lock:
            count, memory = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(memory), 0) FROM sessions WHERE {_LIVE}"
            ).fetchone()
        return int(count), int(memory)

    def census(self) -> dict[tuple[str, str], int]:
        """How many sessions there are of each (status, runtime), counted by SQLite: the
        metrics ask at every scrape, and stopped sessions accumulate."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, runtime, COUNT(*) FROM sessions GROUP BY status, runtime"
            ).fetchall()
        return {(str(status), str(runtime)): int(count) for status, runtime, count in rows}

    def leased_ports(self) -> dict[int, str]:
        with self._lock:
            rows = self._db.execute("SELECT port, session_id FROM port_leases").fetchall()
        return {port: sid for port, sid in rows}

    def delete(self, session_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM port_leases WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    # -- accounts -------------------------------------------------------------------------

    def add_token(self, token: Token) -> None:
        """Record a token, and its user if this is their first."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO users (name, created_at) VALUES (?, ?)",
                (token.user, _encode(token.created_at)),
            )
            db.execute(
                "INSERT INTO tokens (id, user, digest, admin, created_at, expires_at, note) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token.id, token.user, token.digest, int(token.admin),
                 _encode(token.created_at), _encode(token.expires_at), token.note),
            )  # fmt: skip

    def token(self, token_id: str) -> Token | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_TOKEN} FROM tokens WHERE id = ?", (token_id,))
            found = row.fetchone()
        return _token(found) if found else None

    def tokens(self) -> builtins.list[Token]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_TOKEN} FROM tokens ORDER BY created_at").fetchall()
        return [_token(r) for r in rows]

    def token_used(self, token_id: str, at: datetime) -> None:
        with self._transaction() as db:
            db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (_encode(at), token_id))

    def delete_token(self, token_id: str) -> bool:
        """Delete a token and every login made with it; whether there was one."""
        with self._transaction() as db:
            return db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount > 0

    def users(self) -> builtins.list[User]:
        with self._lock:
            rows = self._db.execute(
                "SELECT u.name, u.created_at, COUNT(t.id), COALESCE(MAX(t.admin), 0) "
                "FROM users u LEFT JOIN tokens t ON t.user = u.name "
                "GROUP BY u.name ORDER BY u.created_at"
            ).fetchall()
        return [User(n, datetime.fromisoformat(c), k, bool(a)) for n, c, k, a in rows]

    def add_login(self, login: Login) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO logins (id, digest, token_id, scope, csrf, created_at, expires_at,"
                " parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (login.id, login.digest, login.token_id, login.scope,
                 login.csrf.get_secret_value(), _encode(login.created_at),
                 _encode(login.expires_at), login.parent),
            )  # fmt: skip

    def login(self, login_id: str) -> Login | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, digest, token_id, scope, csrf, created_at, expires_at, parent "
                "FROM logins WHERE id = ?",
                (login_id,),
            ).fetchone()
        if row is None:
            return None
        i, d, t, scope, csrf, created, expires, parent = row
        return Login(i, d, t, scope, SecretStr(csrf), datetime.fromisoformat(created),
                     datetime.fromisoformat(expires), parent)  # fmt: skip

    def delete_login(self, login_id: str) -> None:
        """Delete a login and the session-host logins made from it."""
        with self._transaction() as db:
            db.execute("DELETE FROM logins WHERE id = ?", (login_id,))

    def add_login_code(self, code_id: str, digest: str, token_id: str, expires: datetime) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO login_codes (id, digest, token_id, expires_at) VALUES (?, ?, ?, ?)",
                (code_id, digest, token_id, _encode(expires)),
            )

    def take_login_code(self, code_id: str) -> tuple[str, str, datetime] | None:
        """A login code's digest, token and expiry, deleting it in the same transaction: a
        code is used once, even by two requests at the same instant."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT digest, token_id, expires_at FROM login_codes WHERE id = ?", (code_id,)
            ).fetchone()
            db.execute("DELETE FROM login_codes WHERE id = ?", (code_id,))
        return (row[0], row[1], datetime.fromisoformat(row[2])) if row else None

    def delete_expired_logins(self, at: datetime) -> int:
        with self._transaction() as db:
            db.execute("DELETE FROM login_codes WHERE expires_at <= ?", (_encode(at),))
            return db.execute("DELETE FROM logins WHERE expires_at <= ?", (_encode(at),)).rowcount


_LIVE = f"status IN ({', '.join(repr(s.value) for s in Status if s.live)})"
_TOKEN = "id, user, digest, admin, created_at, expires_at, last_used_at, note"


def _token(row: tuple[Any, ...]) -> Token:
    i, user, d, admin, created, expires, used, note = row
    return Token(
        i, user, d, bool(admin), datetime.fromisoformat(created),
        datetime.fromisoformat(expires) if expires else None,
        datetime.fromisoformat(used) if used else None, note or "",
    )  # fmt: skip


def _encode(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
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
    if base in (Status, Path, SecretStr):
        return base(raw)
    return raw


def _to_row(s: Session) -> tuple[Any, ...]:
    return tuple(_encode(getattr(s, name)) for name in _COLUMNS)


def _from_row(row: tuple[Any, ...]) -> Session:
    return Session(**{name: _decode(name, raw) for name, raw in zip(_COLUMNS, row, strict=True)})
