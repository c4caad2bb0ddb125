"""The browser terminal's WebSocket: a PTY in the sandbox that resizes, reconnects, replays."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from codestation import SessionInfo, Status
from codestation.config import OPENCODE_VERSION
from tests.e2e.conftest import Service


def open_terminal(service: Service, session: SessionInfo, mode: str) -> ClientConnection:
    port = service.url.rsplit(":", 1)[1]
    return connect(
        f"ws://127.0.0.1:{port}/api/v1/code/session/{session.id}/terminal?mode={mode}",
        origin=Origin(f"http://127.0.0.1:{port}"),
        additional_headers=service.auth_headers(),
    )


def read_until(ws: ClientConnection, text: str, seconds: float = 20) -> str:
    seen = ""
    deadline = time.monotonic() + seconds
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {text!r}; saw {seen[-400:]!r}"
        frame = ws.recv(timeout=left)
        seen += frame if isinstance(frame, str) else frame.decode(errors="replace")
    return seen


def test_shell_types_resizes_and_replays_after_reconnecting(
    service: Service, workspace: Path
) -> None:
    (workspace / "made-on-host.txt").write_text("x")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    with open_terminal(service, session, "shell") as ws:
        ws.send(json.dumps({"rows": 31, "cols": 101}))
        ws.send(json.dumps({"data": "ls /workspace; stty size\r"}))
        seen = read_until(ws, "31 101")
        assert "made-on-host.txt" in seen
        ws.send(json.dumps({"rows": 40, "cols": 120}))
        ws.send(json.dumps({"data": "stty size\r"}))
        read_until(ws, "40 120")
    # The tab closed; the terminal waits. Reattaching replays what it showed.
    with open_terminal(service, session, "shell") as ws:
        replay = read_until(ws, "40 120")
        assert "made-on-host.txt" in replay
        ws.send(json.dumps({"data": "echo still-$((40+2))\r"}))
        read_until(ws, "still-42")


def test_agent_mode_shows_opencode_s_tui(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    with open_terminal(service, session, "agent") as ws:
        ws.send(json.dumps({"rows": 30, "cols": 100}))
        # OpenCode's TUI, attached to the session's server (its password from the environment,
        # not the command line): what only it draws (its prompt's placeholder, its key hints,
        # its version in the status bar beside the server's project directory), and its title.
        drawn = ("Ask anything", "ctrl+p commands", "tab agents", OPENCODE_VERSION, "/workspace")
        raw, text = "", ""
        deadline = time.monotonic() + 60
        while not all(part in text for part in drawn):
            left = deadline - time.monotonic()
            assert left > 0, f"the TUI never drew its screen: {text[-600:]!r}"
            try:
                frame = ws.recv(timeout=left)
            except TimeoutError:
                continue
            raw += frame if isinstance(frame, str) else frame.decode(errors="replace")
            text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", raw)
        assert "\x1b]0;OpenCode\x07" in raw  # it names the terminal's window


def test_a_foreign_origin_is_refused(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    port = service.url.rsplit(":", 1)[1]
    url = f"ws://127.0.0.1:{port}/api/v1/code/session/{session.id}/terminal?mode=shell"
    with pytest.raises(InvalidStatus):
        connect(
            url, origin=Origin("http://evil.example"), additional_headers=service.auth_headers()
        )
    with pytest.raises(InvalidStatus):  # nor a session's own OpenCode page
        connect(
            url,
            origin=Origin(f"http://{session.id}.localhost:{port}"),
            additional_headers=service.auth_headers(),
        )
