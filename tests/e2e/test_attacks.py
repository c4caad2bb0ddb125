"""The attacks issue 8 opened with, tried against the real service exactly as they were by hand.

Each of these succeeded against main before accounts existed; each must fail now.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service

pytestmark = pytest.mark.runtimes("bwrap")  # the API's answers do not depend on the runtime


def running(service: Service, workspace: Path) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    return session


def test_a_local_process_without_credentials_gets_nothing(
    service: Service, workspace: Path
) -> None:
    running(service, workspace)
    with httpx.Client(base_url=service.url, timeout=30) as anyone:
        start = anyone.post("/api/v1/code/start", json={"workspace": "/tmp"})
        assert start.status_code == 401, start.text
        listed = anyone.get("/api/v1/code/sessions")
        assert listed.status_code == 401, listed.text
        assert "password" not in listed.text
    assert [s.workspace for s in service.client.sessions()] == [str(workspace)]


def test_dns_rebinding_gets_a_400_before_any_handler(service: Service, workspace: Path) -> None:
    running(service, workspace)
    port = service.url.rsplit(":", 1)[1]
    with service.http() as http:
        answer = http.get("/api/v1/code/sessions", headers={"Host": f"evil.example:{port}"})
    assert answer.status_code == 400, answer.text
    assert "password" not in answer.text


def test_a_cross_site_bodyless_post_stops_nothing(service: Service, workspace: Path) -> None:
    session = running(service, workspace)
    with httpx.Client(base_url=service.url, timeout=30) as page:
        answer = page.post("/api/v1/code/stop", headers={"Origin": "https://evil.example"})
    assert answer.status_code in (401, 403), answer.text
    assert service.client.session(session.id).status is Status.RUNNING


def test_the_session_id_alone_opens_nothing_through_the_proxy(
    service: Service, workspace: Path
) -> None:
    session = running(service, workspace)
    port = service.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=service.url, timeout=30) as anyone:
        answer = anyone.get("/session", headers={"Host": f"{session.id}.localhost:{port}"})
        assert answer.status_code == 401, answer.text
        # A page on another local port asking OpenCode's CORS for leave to read.
        cors = anyone.get(
            "/session",
            headers={"Host": f"{session.id}.localhost:{port}", "Origin": "http://localhost:9999"},
        )
        assert "access-control-allow-origin" not in cors.headers


def test_codestation_s_own_directories_are_not_workspaces(service: Service) -> None:
    cache = Path("~/.cache/codestation").expanduser()
    with service.http() as http:
        for own in (cache, service.data_dir, cache / "opencode"):
            answer = http.post("/api/v1/code/start", json={"workspace": str(own)})
            assert answer.status_code == 400, (own, answer.text)
            assert answer.json()["code"] == "workspace_rejected"
    assert service.client.sessions() == []


def test_no_password_in_any_command_line(service: Service, workspace: Path) -> None:
    import json

    from websockets.sync.client import connect
    from websockets.typing import Origin

    session = running(service, workspace)
    port = service.url.rsplit(":", 1)[1]
    with connect(
        f"ws://127.0.0.1:{port}/api/v1/code/session/{session.id}/terminal?mode=agent",
        origin=Origin(f"http://127.0.0.1:{port}"),
        additional_headers=service.auth_headers(),
    ) as ws:
        ws.send(json.dumps({"rows": 30, "cols": 100}))
        ws.recv(timeout=30)
        lines = []
        for proc in Path("/proc").iterdir():
            try:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" "))
            except OSError:
                continue
    secret = session.auth.password.encode()
    assert not [line for line in lines if secret in line]
    assert os.getpid()  # the scan ran in this process, with root's view of every process


def test_the_api_docs_load_nothing_from_a_cdn(service: Service) -> None:
    with service.http() as http:
        page = http.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assert "https://" not in page.text
