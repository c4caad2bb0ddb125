"""A session's record and the state machine it moves through.

    starting ──> running ──> stopping ──> stopped
        │           │            │
        └───────────┴────────────┴──────> failed      (with a reason)
        └──────────────────────> stopping             (a stop during start cancels it)

`stopped` and `failed` are final. Only `SessionManager` moves a session, through `advance`.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from codestation.errors import CodestationError


class Status(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def live(self) -> bool:
        """Whether the session holds (or may still hold) a port and a sandbox."""
        return self in (Status.STARTING, Status.RUNNING, Status.STOPPING)


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.STARTING: frozenset({Status.RUNNING, Status.STOPPING, Status.FAILED}),
    Status.RUNNING: frozenset({Status.STOPPING, Status.FAILED}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.FAILED}),
    Status.STOPPED: frozenset(),
    Status.FAILED: frozenset(),
}


class InvalidTransition(CodestationError):
    """A bug: some code tried to move a session along an edge the machine does not have."""

    code = "invalid_transition"


def now() -> datetime:
    return datetime.now(UTC)


def new_session_id() -> str:
    """80 random bits as a DNS label: `cs-` and 16 characters of lowercase base32.

    A later feature serves each session on `<id>.<domain>`, so ids must be valid host-name
    labels (lowercase letters, digits, hyphens, at most 63 characters, starting with a letter).
    """
    token = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
    return f"cs-{token}"


@dataclass(frozen=True)
class Session:
    id: str
    status: Status
    runtime: str
    workspace: Path
    environment: str
    port: int
    username: str
    password: SecretStr  # never printed: unwrapped only where it leaves for the sandbox
    created_at: datetime
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    error: str | None = None
    step: str | None = None
    runtime_state: dict[str, Any] = field(default_factory=dict)
    log_tail: str | None = None
    reason: str | None = None  # why it stopped: requested, idle, max_age, shutdown
    idle_timeout: float = 0  # seconds without activity before it is stopped; 0: never
    max_age: float = 0  # seconds after its creation it is stopped; 0: never
    last_activity: datetime | None = None
    limits: dict[str, Any] = field(default_factory=dict)  # what its runtime enforces
    owner: str = ""  # the user who started it; "" for sessions older than accounts: admins'
    memory: int = 0  # bytes of the service's memory budget it reserves (its memory limit)
    started_from: str = "cold"  # cold: a sandbox made for it
    phases: dict[str, float] = field(default_factory=dict)  # seconds each step of its start took

    def due(self, at: datetime) -> str | None:
        """Why a running session should be culled at `at` (`max_age`, `idle`), or None."""
        if self.status is not Status.RUNNING:
            return None
        if self.max_age and (at - self.created_at).total_seconds() >= self.max_age:
            return "max_age"
        active = self.last_activity or self.started_at or self.created_at
        if self.idle_timeout and (at - active).total_seconds() >= self.idle_timeout:
            return "idle"
        return None

    def advance(self, status: Status, **changes: Any) -> Session:
        """A copy moved to `status`, stamped with the time it started or ended."""
        if status not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"session {self.id} cannot go from {self.status} to {status}")
        stamps: dict[str, Any] = {}
        if status is Status.RUNNING:
            stamps["started_at"] = now()
        elif not status.live:
            stamps["stopped_at"] = now()
        return replace(self, status=status, **{**stamps, **changes})

    def with_changes(self, **changes: Any) -> Session:
        """A copy with fields changed that do not move it (its step, its runtime state)."""
        if "status" in changes:
            raise InvalidTransition("use advance() to change a session's status")
        return replace(self, **changes)
