"""What the agent says about its own activity: believed when it makes sense, ignored when not."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedError

from codestation import agent
from codestation.agent import MAX_FRAME, last_activity, websocket
from codestation.errors import StartTimeout


def answering(answers: dict[str, Any]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=json.dumps(answers[request.url.path]))

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def ask(answers: dict[str, Any]) -> datetime | None:
    async def run() -> datetime | None:
        async with answering(answers) as client:
            return await last_activity(client, "http://agent", SecretStr("pw"))

    return asyncio.run(run())


def test_the_latest_change_to_its_sessions() -> None:
    seen = ask(
        {
            "/session/status": {"a": {"type": "idle"}},
            "/pty": [{"status": "exited"}],
            "/session": [{"time": {"updated": 1_700_000_000_000}}, {"time": {}}],
        }
    )
    assert seen == datetime.fromtimestamp(1_700_000_000, UTC)


def test_a_working_session_or_a_running_shell_is_activity_now() -> None:
    busy = ask({"/session/status": {"a": {"type": "busy"}}, "/pty": [], "/session": []})
    assert busy is not None
    assert (datetime.now(UTC) - busy).total_seconds() < 5


@pytest.mark.parametrize(
    "answers",
    [
        {"/session/status": [], "/pty": [], "/session": []},
        {"/session/status": {"a": "idle"}, "/pty": [], "/session": []},
        {"/session/status": {}, "/pty": {"x": 1}, "/session": []},
        {"/session/status": {}, "/pty": [], "/session": [{"time": {"updated": "soon"}}]},
        {"/session/status": {}, "/pty": [], "/session": [{"time": {"updated": 1e300}}]},
        {"/session/status": {}, "/pty": [], "/session": [1, 2]},
        {"/session/status": None, "/pty": None, "/session": None},
    ],
)
def test_an_answer_of_another_shape_says_nothing(answers: dict[str, Any]) -> None:
    assert ask(answers) is None


def test_a_websocket_to_the_agent_carries_its_credentials_and_ends_on_a_giant_frame() -> None:
    """Whatever answers on a session's port may send a frame of any size; the service holds a
    frame whole before passing it on, so one over MAX_FRAME ends the connection (1009)."""
    seen: dict[str, str] = {}

    async def agent(connection: ServerConnection) -> None:
        assert connection.request is not None
        seen.update(connection.request.headers)
        await connection.send("x" * 65536)  # OpenCode's biggest terminal frame: passes
        await connection.send("x" * (MAX_FRAME + 1))
        await connection.wait_closed()

    async def scenario() -> tuple[int, int | None]:
        async with serve(agent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            password = SecretStr("pw")
            url = f"ws://127.0.0.1:{port}/pty/p/connect"
            async with websocket(url, password, {"x-opencode-directory": "/workspace"}) as pty:
                first = await pty.recv()
                with pytest.raises(ConnectionClosedError) as ended:
                    await pty.recv()
                sent = ended.value.sent
                return len(first), sent.code if sent else None

    size, code = asyncio.run(scenario())
    assert size == 65536
    assert code == 1009
    assert seen["authorization"] == "Basic b3BlbmNvZGU6cHc="  # opencode:pw
    assert seen["x-opencode-directory"] == "/workspace"


def test_readiness_is_not_held_up_by_a_probe_that_gets_no_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A probe that reaches a session's port just as OpenCode starts to listen can go
    unanswered (seen behind pasta on every bwrap start: that probe waited out its whole
    timeout while the next one was answered at once). Later probes must not wait for it."""
    monkeypatch.setattr(agent, "PROBE_TIMEOUT", 30.0)
    connections = 0

    async def opencode(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections == 1:
            await asyncio.sleep(60)  # the lost request
        body = b'{"healthy":true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        await writer.drain()
        writer.close()

    async def still_running() -> None:
        return None

    async def scenario() -> None:
        server = await asyncio.start_server(opencode, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient() as client:
            ready = agent.wait_ready(
                client, f"http://127.0.0.1:{port}", SecretStr("pw"), 20, still_running
            )
            await asyncio.wait_for(ready, 10)

    asyncio.run(scenario())
    assert connections >= 2


def trickled_probes(probe_timeout: float) -> tuple[int, int]:
    """Readiness probes against a listener that answers a byte at a time, for ever, over
    1.5 s: how many connections it saw, and how many at most at once."""
    opened, most, open_now = 0, 0, 0

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened, most, open_now
        opened += 1
        open_now += 1
        most = max(most, open_now)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
            while True:
                writer.write(b"a")
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            open_now -= 1

    async def still_running() -> None:
        return None

    async def scenario() -> None:
        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{port}"
            with pytest.raises(StartTimeout):
                await agent.wait_ready(client, url, SecretStr("pw"), 1.5, still_running)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agent, "PROBE_TIMEOUT", probe_timeout)
        asyncio.run(scenario())
    return opened, most


def test_probes_that_trickle_are_few_at_once_and_each_ends_in_time() -> None:
    """Whatever listens on a session's port may answer a byte at a time, for ever: no more
    than PROBES_AT_ONCE probes are open at once (they share the service's client with every
    other session's), and each ends within PROBE_TIMEOUT in all, so others take its place."""
    opened, most = trickled_probes(30.0)
    assert opened == most == agent.PROBES_AT_ONCE
    opened, _ = trickled_probes(0.3)
    assert opened > agent.PROBES_AT_ONCE
