"""Idle and old sessions are stopped on time, saying why; a session at work never is."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import httpx

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, ServiceFactory


def status_from_list(service: Service, session_id: str) -> SessionInfo:
    """The session as the list shows it: reading the list is not activity on a session."""
    return next(s for s in service.client.sessions() if s.id == session_id)


def wait_stopped(service: Service, session_id: str, seconds: float) -> SessionInfo:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        session = status_from_list(service, session_id)
        if not session.status.live:
            return session
        time.sleep(0.2)
    return status_from_list(service, session_id)


def running(
    service: Service,
    workspace: Path,
    idle_timeout: float | None = None,
    max_age: float | None = None,
) -> SessionInfo:
    started = service.client.start(
        str(workspace), idle_timeout=idle_timeout, max_age=max_age, wait=False
    )
    session = service.client.wait(started.id)
    assert session.status is Status.RUNNING, session.error
    return session


def test_an_idle_session_is_stopped_saying_why(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="0.5")
    session = running(service, workspace, idle_timeout=2)
    assert session.idle_timeout == 2
    stopped = wait_stopped(service, session.id, 30)
    assert stopped.status is Status.STOPPED
    assert stopped.reason == "idle"
    assert service.leftovers() == []
    assert (workspace / "README.md").exists()


def test_api_calls_about_a_session_keep_it(start_service: ServiceFactory, workspace: Path) -> None:
    service = start_service(cull_interval="0.5")
    session = running(service, workspace, idle_timeout=3)
    for _ in range(16):  # 8 s of a client looking at it
        assert service.client.session(session.id).status is Status.RUNNING
        time.sleep(0.5)
    assert wait_stopped(service, session.id, 30).reason == "idle"


def test_a_session_whose_shell_is_working_is_not_culled(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="0.5")
    session = running(service, workspace, idle_timeout=2)
    auth = (session.auth.username, session.auth.password)
    work = httpx.post(
        f"{session.url}/pty", auth=auth, json={"command": "sh", "args": ["-c", "sleep 8"]}
    )
    assert work.status_code == 200
    began = time.monotonic()
    while time.monotonic() - began < 7:
        assert status_from_list(service, session.id).status is Status.RUNNING
        time.sleep(0.5)
    stopped = wait_stopped(service, session.id, 30)
    assert stopped.reason == "idle"
    assert stopped.last_activity is not None
    assert stopped.last_activity > session.started_at  # type: ignore[operator]


def test_an_old_session_is_stopped_however_busy(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="0.5")
    session = running(service, workspace, idle_timeout=2, max_age=6)
    auth = (session.auth.username, session.auth.password)
    # Its shell works for far longer than max_age (and is never idle for idle_timeout).
    work = httpx.post(
        f"{session.url}/pty", auth=auth, json={"command": "sh", "args": ["-c", "sleep 120"]}
    )
    assert work.status_code == 200, work.text
    shell = work.json()["id"]
    shells = httpx.get(f"{session.url}/pty", auth=auth).json()
    assert [p["status"] for p in shells if p["id"] == shell] == ["running"]
    stopped = wait_stopped(service, session.id, 30)
    assert stopped.status is Status.STOPPED
    assert stopped.reason == "max_age"
    # The culler saw it busy up to the end: its shell running, when max_age had nearly passed.
    assert stopped.last_activity is not None
    assert stopped.last_activity >= session.created_at + timedelta(seconds=5)


def test_a_session_cannot_ask_for_more_than_its_environment_allows(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(idle_timeout="600", max_age="3600")
    with service.http() as http:
        for field, value in (("idle_timeout", 601), ("max_age", 7200), ("idle_timeout", -1)):
            answer = http.post(
                "/api/v1/code/start", json={"workspace": str(workspace), field: value}
            )
            assert answer.status_code in (400, 422), answer.text
            assert field in answer.json()["error"]
        assert http.get("/api/v1/code/sessions").json() == {"sessions": []}
    session = service.client.start(str(workspace), idle_timeout=60, wait=False)
    assert (session.idle_timeout, session.max_age) == (60, 3600)
    service.client.stop(session.id)


def test_traffic_through_the_proxy_keeps_it(start_service: ServiceFactory, workspace: Path) -> None:
    service = start_service(cull_interval="0.5")
    session = running(service, workspace, idle_timeout=3)
    port = service.url.rsplit(":", 1)[1]
    host = {"Host": f"{session.id}.localhost:{port}", **service.auth_headers()}
    with httpx.Client(base_url=service.url, headers=host, timeout=10) as http:
        for _ in range(16):  # 8 s of a person using OpenCode's UI
            assert http.get("/global/health").status_code == 200
            time.sleep(0.5)
    assert status_from_list(service, session.id).status is Status.RUNNING
    assert wait_stopped(service, session.id, 30).reason == "idle"
