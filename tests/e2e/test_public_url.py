"""The service where browsers reach it: through an SSH-style tunnel on another port, or behind a
TLS reverse proxy. `public_url` says where; links, Origin checks and session hosts follow."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from codestation import Status
from tests.e2e.conftest import ServiceFactory, free_port


@contextlib.contextmanager
def tunnel(port: int, to_port: int) -> Iterator[None]:
    """What `ssh -L PORT:127.0.0.1:TO_PORT` does on one machine: a port that forwards every
    connection, byte for byte, to the service."""
    listener = socket.create_server(("127.0.0.1", port))

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", to_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        listener.close()


@pytest.mark.runtimes("bwrap")
def test_through_a_tunnel_on_another_port(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    port = free_port()
    service = start_service(public_url=f"http://localhost:{port}")
    with tunnel(port, service.port):
        session = service.client.wait(service.client.start(str(workspace), wait=False).id)
        assert session.status is Status.RUNNING, session.error
        assert session.web_url == f"http://{session.id}.localhost:{port}/"
        # The session's own host name through the tunnel, as the browser sends it.
        health = httpx.get(
            f"http://127.0.0.1:{port}/global/health",
            headers={"Host": f"{session.id}.localhost:{port}", **service.auth_headers()},
            timeout=10,
        )
        assert health.status_code == 200, health.text
        # The terminal from a page the tunnel served.
        url = f"ws://localhost:{port}/api/v1/code/session/{session.id}/terminal?mode=shell"
        with connect(
            url,
            origin=Origin(f"http://localhost:{port}"),
            additional_headers=service.auth_headers(),
        ) as ws:
            ws.send(json.dumps({"data": "echo tunnelled-$((6*7))\r"}))
            seen = ""
            while "tunnelled-42" not in seen:
                frame = ws.recv(timeout=20)
                seen += frame if isinstance(frame, str) else frame.decode(errors="replace")
        with pytest.raises(InvalidStatus):  # and still not from another site's page
            connect(
                url,
                origin=Origin("http://evil.example"),
                additional_headers=service.auth_headers(),
            )
    service.client.stop(session.id)


@pytest.mark.runtimes("bwrap")
def test_behind_a_tls_reverse_proxy(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(
        public_url="https://codes.example.com", proxy_domain="codes.example.com"
    )
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    assert session.web_url == f"https://{session.id}.codes.example.com/"
    # What the proxy passes on: the name people used (in Host), and that they used https.
    forwarded = {"X-Forwarded-Proto": "https", **service.auth_headers()}
    url = f"ws://codes.example.com/api/v1/code/session/{session.id}/terminal?mode=shell"

    def to_service() -> socket.socket:
        return socket.create_connection(("127.0.0.1", service.port))

    with connect(
        url,
        sock=to_service(),
        origin=Origin("https://codes.example.com"),
        additional_headers=forwarded,
    ) as ws:
        ws.send(json.dumps({"data": "echo proxied-$((6*7))\r"}))
        seen = ""
        while "proxied-42" not in seen:
            frame = ws.recv(timeout=20)
            seen += frame if isinstance(frame, str) else frame.decode(errors="replace")
    for origin in ("http://codes.example.com", "https://evil.example"):
        with pytest.raises(InvalidStatus):
            connect(url, sock=to_service(), origin=Origin(origin), additional_headers=forwarded)
    health = httpx.get(
        f"{service.url}/global/health",
        headers={
            "Host": f"{session.id}.codes.example.com",
            "X-Forwarded-Proto": "https",
            **service.auth_headers(),
        },
        timeout=10,
    )
    assert health.status_code == 200, health.text
    service.client.stop(session.id)
