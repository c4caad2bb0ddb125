"""How the proxy closes a browser's WebSocket, from how the agent's side ended (a real
WebSocket server stands in for whatever listens on a session's port)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from pydantic import SecretStr
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from codestation.agent import websocket
from codestation.api.proxy import _close_for_browser


def told_after(agent: Callable[[ServerConnection], Awaitable[None]]) -> tuple[int, str]:
    """How the proxy would close a browser's WebSocket once `agent`, answering on the
    session's port, has ended its side."""

    async def scenario() -> tuple[int, str]:
        async with serve(agent, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with websocket(f"ws://127.0.0.1:{port}/", SecretStr("pw"), {}) as opencode:
                with pytest.raises(ConnectionClosed):
                    await opencode.recv()
                return _close_for_browser(opencode)

    return asyncio.run(scenario())


def closed_by_agent(code: int, reason: str) -> tuple[int, str]:
    async def agent(connection: ServerConnection) -> None:
        await connection.close(code, reason)

    return told_after(agent)


@pytest.mark.parametrize(
    ("code", "reason", "told"),
    [
        (1000, "", (1000, "")),
        (1001, "going away", (1001, "OpenCode: going away")),
        (4000, "bye\x07\x1b[2J", (4000, "OpenCode: bye[2J")),
        (1008, "forbidden", (1011, "OpenCode: forbidden")),  # codestation's own to say
        (1013, "try later", (1011, "OpenCode: try later")),
        (1000, "é" * 61, (1000, "OpenCode: " + "é" * 55)),  # 120 bytes, whole characters
    ],
)
def test_the_browser_is_told_how_the_agent_closed(
    code: int, reason: str, told: tuple[int, str]
) -> None:
    assert closed_by_agent(code, reason) == told


def test_a_frame_too_big_is_told_as_codestation_s_refusal() -> None:
    async def agent(connection: ServerConnection) -> None:
        await connection.send("x" * (2 << 20))
        await connection.wait_closed()

    assert told_after(agent) == (
        1011,
        "OpenCode sent what codestation does not pass on (1009)",
    )
