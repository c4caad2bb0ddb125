"""Sessions for unit tests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from codestation.sessions import Session, Status, new_session_id


def make_session(port: int = 30000, **fields: Any) -> Session:
    values: dict[str, Any] = {
        "id": new_session_id(),
        "status": Status.STARTING,
        "runtime": "docker",
        "workspace": Path("/tmp/w"),
        "environment": "default",
        "port": port,
        "username": "opencode",
        "password": SecretStr("secret"),
        "created_at": datetime.now(UTC),
        **fields,
    }
    return Session(**values)
