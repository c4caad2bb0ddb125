"""Each session's OpenCode on its own host name, through codestation, without a password."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service


def running(service: Service, workspace: Path) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    return session


def test_http_sse_and_websocket_pass_through(service: Service, workspace: Path) -> None:
    session = running(service, workspace)
    port = service.url.rsplit(":", 1)[1]
    assert session.web_url == f"http://{session.id}.localhost:{port}/"
    host = {"Host": f"{session.id}.localhost:{port}", **service.auth_headers()}
    with httpx.Client(base_url=service.url, headers=host, timeout=30) as http:
        # No OpenCode password from the client (only codestation's token): the proxy adds it.
        health = http.get("/global/health")
        assert health.status_code == 200
        assert health.json()["healthy"] is True
        page = http.get("/")
        assert page.status_code == 200
        assert "<title>" in page.text.lower() or "<html" in page.text.lower()
        files = http.get("/file", params={"path": "."})
        assert "README.md" in {f["name"] for f in files.json()}
        # A POST with a body, and a server-sent event stream that arrives as it is sent.
        created = http.post("/session", json={"title": "through the proxy"})
        assert created.status_code == 200, created.text
        began = time.monotonic()
        with http.stream("GET", "/event") as events:
            first = next(events.iter_lines())
            assert "server.connected" in first or first.startswith("data:")
        assert time.monotonic() - began < 10
        # A WebSocket: OpenCode's own terminal, both ways.
        pty = http.post("/pty", json={"command": "sh", "args": []}).json()
    # The session's host name, on a socket to this machine (as a browser resolves *.localhost).
    sock = socket.create_connection(("127.0.0.1", int(port)))
    with connect(
        f"ws://{session.id}.localhost:{port}/pty/{pty['id']}/connect?cursor=0",
        sock=sock,
        additional_headers=service.auth_headers(),
    ) as ws:
        ws.send("echo proxied-$((6*7))\n")
        seen = ""
        deadline = time.monotonic() + 20
        while "proxied-42" not in seen and time.monotonic() < deadline:
            message = ws.recv(timeout=20)
            seen += message if isinstance(message, str) else message.decode(errors="replace")
        assert "proxied-42" in seen


def test_unknown_and_stopped_sessions_are_refused(service: Service, workspace: Path) -> None:
    port = service.url.rsplit(":", 1)[1]
    with service.http() as http:
        missing = http.get("/", headers={"Host": f"cs-nope.localhost:{port}"})
        assert missing.status_code == 404
        session = running(service, workspace)
        service.client.stop(session.id)
        stopped = http.get("/", headers={"Host": f"{session.id}.localhost:{port}"})
        assert stopped.status_code == 503
        assert "stopped" in stopped.text
        # The API itself is not behind a session's name.
        assert http.get("/healthz").status_code == 200


def test_a_websocket_from_a_foreign_page_is_refused(service: Service, workspace: Path) -> None:
    session = running(service, workspace)
    port = service.url.rsplit(":", 1)[1]
    host = {"Host": f"{session.id}.localhost:{port}", **service.auth_headers()}
    with httpx.Client(base_url=service.url, headers=host, timeout=30) as http:
        pty = http.post("/pty", json={"command": "sh", "args": []}).json()
    url = f"ws://{session.id}.localhost:{port}/pty/{pty['id']}/connect?cursor=0"

    def open_from(origin: str) -> ClientConnection:
        return connect(
            url,
            sock=socket.create_connection(("127.0.0.1", int(port))),
            origin=Origin(origin),
            additional_headers=service.auth_headers(),  # valid credentials, either way
        )

    with pytest.raises(InvalidStatus) as refused:
        open_from("http://evil.example")
    assert refused.value.response.status_code == 403
    # The same from the session's own page is accepted, and reaches its shell.
    with open_from(f"http://{session.id}.localhost:{port}") as ws:
        ws.send("echo same-origin-$((6*7))\n")
        seen = ""
        deadline = time.monotonic() + 20
        while "same-origin-42" not in seen and time.monotonic() < deadline:
            message = ws.recv(timeout=20)
            seen += message if isinstance(message, str) else message.decode(errors="replace")
        assert "same-origin-42" in seen
