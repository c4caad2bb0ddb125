"""The per-session proxy under abuse: abandoned streams, and one session hogging connections."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, ServiceFactory, agent_pid


def running(service: Service, workspace: Path) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    return session


def upstream_connections(port: int) -> int:
    """Established TCP connections to `port` on this machine (the proxy's, to a session)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def abandon_event_streams(service: Service, session: SessionInfo, count: int) -> None:
    """Open OpenCode's event stream through the proxy `count` times, read its first event,
    and hang up, as a browser tab reloaded over and over does."""
    request = (
        f"GET /event HTTP/1.1\r\nHost: {session.id}.localhost:{service.port}\r\n"
        f"Authorization: Bearer {service.token}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)  # server.connected
        writer.transport.abort()  # gone, without a goodbye

    for _ in range(0, count, 10):  # ten tabs at a time, well within proxy_max_requests
        await asyncio.gather(*(one() for _ in range(10)))


def proxied(service: Service, session: SessionInfo, path: str, timeout: float = 10) -> int:
    headers = {"Host": f"{session.id}.localhost:{service.port}", **service.auth_headers()}
    return httpx.get(f"{service.url}{path}", headers=headers, timeout=timeout).status_code


def test_a_thousand_abandoned_streams_leave_the_proxy_working(
    service: Service, workspace: Path, tmp_path: Path
) -> None:
    other_workspace = tmp_path / "other"
    other_workspace.mkdir()
    hammered, other = running(service, workspace), running(service, other_workspace)

    asyncio.run(abandon_event_streams(service, hammered, 1000))

    # Each upstream stream ended with its client: none is left open to OpenCode.
    deadline = time.monotonic() + 10
    while (left := upstream_connections(hammered.port)) > 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left <= 5, f"{left} upstream connections still open after their clients left"
    assert proxied(service, other, "/global/health") == 200
    assert proxied(service, hammered, "/global/health") == 200


def test_one_session_cannot_take_every_upstream_connection(
    start_service: ServiceFactory, workspace: Path, tmp_path: Path
) -> None:
    service = start_service(proxy_max_requests="8")
    other_workspace = tmp_path / "other"
    other_workspace.mkdir()
    greedy, other = running(service, workspace), running(service, other_workspace)
    held: list[socket.socket] = []
    try:
        for _ in range(8):  # streams that stay open, each holding one upstream request
            sock = socket.create_connection(("127.0.0.1", service.port))
            sock.sendall(
                f"GET /event HTTP/1.1\r\nHost: {greedy.id}.localhost:{service.port}\r\n"
                f"Authorization: Bearer {service.token}\r\n\r\n".encode()
            )
            assert sock.recv(12) == b"HTTP/1.1 200"
            held.append(sock)
        headers = {"Host": f"{greedy.id}.localhost:{service.port}", **service.auth_headers()}
        refused = httpx.get(f"{service.url}/global/health", headers=headers, timeout=10)
        assert refused.status_code == 503
        assert "proxy_max_requests" in refused.text
        assert proxied(service, other, "/global/health") == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while proxied(service, greedy, "/global/health") != 200:
        assert time.monotonic() < deadline, "the session's slots did not come back"
        time.sleep(0.1)


def test_abandoned_websockets_end_upstream(service: Service, workspace: Path) -> None:
    session = running(service, workspace)
    auth = (session.auth.username, session.auth.password)
    pty = httpx.post(f"{session.url}/pty", auth=auth, json={"command": "sh"}, timeout=10).json()
    before = upstream_connections(session.port)
    request = (
        f"GET /pty/{pty['id']}/connect?cursor=0 HTTP/1.1\r\n"
        f"Host: {session.id}.localhost:{service.port}\r\n"
        f"Authorization: Bearer {service.token}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    held = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", service.port))
        sock.sendall(request)
        assert sock.recv(12) == b"HTTP/1.1 101"
        held.append(sock)
    assert upstream_connections(session.port) >= before + 20
    for sock in held:  # gone, without a closing handshake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    deadline = time.monotonic() + 10
    while (left := upstream_connections(session.port)) > before + 1:
        assert time.monotonic() < deadline, f"{left - before} upstream WebSockets left open"
        time.sleep(0.1)
    assert proxied(service, session, "/global/health") == 200


def peak_memory(pid: int) -> int:
    """The process's resident high-water mark (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def terminal_through_the_proxy(
    service: Service, session: SessionInfo, script: str
) -> ClientConnection:
    """A WebSocket through codestation to a new PTY of the session's running `script`."""
    auth = (session.auth.username, session.auth.password)
    pty = httpx.post(f"{session.url}/pty", auth=auth, timeout=10,
                     json={"command": "sh", "args": ["-c", script]}).json()  # fmt: skip
    return ws_connect(
        f"ws://{session.id}.localhost:{service.port}/pty/{pty['id']}/connect?cursor=0",
        additional_headers=service.auth_headers(),
        sock=socket.create_connection(("127.0.0.1", service.port)),  # no resolver for the name
        max_size=None,
        ping_interval=None,
    )


def test_a_terminal_printing_30_mb_streams_through_whole_in_bounded_memory(
    service: Service, workspace: Path
) -> None:
    # OpenCode sends a terminal's output in bursts as fast as the socket takes it: the proxy
    # must pass it on as it comes, not gather it.
    line = b"x" * 99 + b"\n"
    (workspace / "big.txt").write_bytes(line * 300_000)
    session = running(service, workspace)
    pid = service.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from here
    before = peak_memory(pid)
    received, tail = 0, b""
    script = "sleep 1; cat /workspace/big.txt; echo; echo THE-END"
    with terminal_through_the_proxy(service, session, script) as terminal:
        while b"THE-END" not in tail:
            frame = terminal.recv(timeout=60)
            data = frame.encode() if isinstance(frame, str) else frame
            if not data.startswith(b"\x00"):  # OpenCode's cursor bookkeeping
                received += len(data)
                tail = (tail + data)[-64:]
    assert received >= len(line) * 300_000
    grew = peak_memory(pid) - before
    assert grew < 16 * 2**20, f"the service's peak memory rose {grew / 2**20:.0f} MiB"


def test_a_terminal_whose_agent_dies_is_not_closed_as_if_all_were_well(
    service: Service, workspace: Path
) -> None:
    session = running(service, workspace)
    with terminal_through_the_proxy(service, session, "sleep 600") as terminal:
        terminal.recv(timeout=10)  # connected: OpenCode's first frame
        os.kill(agent_pid(session), signal.SIGKILL)
        ended = None
        deadline = time.monotonic() + 30
        while ended is None and time.monotonic() < deadline:
            try:
                terminal.recv(timeout=30)
            except ConnectionClosed as exc:
                ended = exc
    assert ended is not None, "the terminal stayed open after its agent died"
    received = ended.rcvd
    assert received is not None
    assert received.code == 1011, received
    assert "without a closing handshake" in received.reason
