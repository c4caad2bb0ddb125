"""How long a browser terminal lives once its tab is closed, and what it counts for."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect
from websockets.typing import Origin

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, ServiceFactory


def use_terminal(service: Service, session: SessionInfo, mode: str = "shell") -> None:
    """Open a terminal, type in it, see the answer, and close the tab."""
    url = f"ws://127.0.0.1:{service.port}/api/v1/code/session/{session.id}/terminal?mode={mode}"
    with connect(url, origin=Origin(service.url), additional_headers=service.auth_headers()) as ws:
        ws.send(json.dumps({"data": "echo typed-$((6*7))\r"}))
        seen = ""
        while "typed-42" not in seen:
            frame = ws.recv(timeout=20)
            seen += frame if isinstance(frame, str) else frame.decode(errors="replace")


def terminals_in(session: SessionInfo) -> list[str]:
    """Titles of the PTYs the session's OpenCode runs."""
    auth = (session.auth.username, session.auth.password)
    shells = httpx.get(f"{session.url}/pty", auth=auth, timeout=10).json()
    return [p.get("title", "") for p in shells if p.get("status") == "running"]


def listed(service: Service, session_id: str) -> SessionInfo:
    # From the list: reading one session would be activity on it.
    return next(s for s in service.client.sessions() if s.id == session_id)


def test_a_closed_terminal_is_not_activity(start_service: ServiceFactory, workspace: Path) -> None:
    service = start_service(cull_interval="1")
    session = service.client.wait(
        service.client.start(str(workspace), idle_timeout=6, wait=False).id
    )
    assert session.status is Status.RUNNING, session.error
    use_terminal(service, session)
    assert "codestation:shell" in terminals_in(session)  # kept for the tab to come back
    deadline = time.monotonic() + 30
    while (now := listed(service, session.id)).status.live:
        assert time.monotonic() < deadline, "an idle session with a closed terminal was kept"
        time.sleep(0.5)
    assert now.status is Status.STOPPED
    assert now.reason == "idle"


def test_a_closed_terminal_ends_after_terminal_keep_though_no_one_attaches(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="1", terminal_keep="2")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    use_terminal(service, session)
    assert "codestation:shell" in terminals_in(session)
    deadline = time.monotonic() + 20
    while "codestation:shell" in terminals_in(session):
        assert time.monotonic() < deadline, "the detached terminal was never ended"
        time.sleep(0.5)
    service.client.stop(session.id)


def test_terminals_from_before_a_restart_are_ended(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="1")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    use_terminal(service, session)
    # A shell of the agent's own (not one of codestation's terminals) is left alone.
    auth = (session.auth.username, session.auth.password)
    own = httpx.post(
        f"{session.url}/pty", auth=auth, timeout=10, json={"command": "sh", "title": "agent's"}
    )
    assert own.status_code == 200, own.text
    service.restart()
    deadline = time.monotonic() + 20
    while "codestation:shell" in (titles := terminals_in(session)):
        assert time.monotonic() < deadline, "a terminal from before the restart was kept"
        time.sleep(0.5)
    assert "agent's" in titles
    use_terminal(service, session)  # a new one opens as before
    service.client.stop(session.id)
