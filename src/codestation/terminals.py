"""Browser terminals on a session: reconnecting PTYs inside its sandbox.

A terminal is a PTY that the session's own OpenCode runs (its `/pty` API), so it lives inside
the sandbox, as the agent's user. `agent` mode runs `opencode attach` on the session's server
(the agent's TUI); `shell` mode runs bash. A terminal outlives the browser: closing the tab
detaches it, and attaching again within `KEEP` replays its recent output (OpenCode keeps it)
and carries on, as Coder's reconnecting PTY does. One terminal per session and mode.

Browser protocol (JSON text frames in, raw output out): `{"data": "ls\\r"}` types,
`{"rows": 24, "cols": 80}` resizes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from codestation.sessions import Session

KEEP = 300.0  # seconds a detached terminal waits for its browser to come back
MODES = ("agent", "shell")


@dataclass
class _Terminal:
    session: Session
    pty_id: str
    detached_at: float | None = None


class Terminals:
    def __init__(self, local_host: str) -> None:
        self.local_host = local_host
        self._open: dict[tuple[str, str], _Terminal] = {}
        self._http = httpx.AsyncClient(timeout=10)

    async def close(self) -> None:
        await self._http.aclose()

    def _url(self, session: Session) -> str:
        return f"http://{self.local_host}:{session.port}"

    def _auth(self, session: Session) -> tuple[str, str]:
        return (session.username, session.password.get_secret_value())

    async def _pty(self, session: Session, mode: str, inside_port: int) -> str:
        """The id of the session's terminal in `mode`, made if it has none (or it ended)."""
        key = (session.id, mode)
        known = self._open.get(key)
        if known is not None:
            alive = await self._http.get(
                f"{self._url(session)}/pty/{known.pty_id}", auth=self._auth(session)
            )
            if alive.status_code == 200 and alive.json().get("status") == "running":
                return known.pty_id
        if mode == "agent":
            # No password on the command line (`ps` shows it): `attach` takes it from
            # OPENCODE_SERVER_PASSWORD, which the PTY inherits from the session's OpenCode.
            command = "opencode"
            args = ["attach", f"http://127.0.0.1:{inside_port}"]
        else:
            command, args = "bash", []
        created = await self._http.post(
            f"{self._url(session)}/pty",
            auth=self._auth(session),
            json={"command": command, "args": args, "cwd": "/workspace", "title": mode},
        )
        created.raise_for_status()
        pty_id: str = created.json()["id"]
        self._open[key] = _Terminal(session, pty_id)
        return pty_id

    async def resize(self, session: Session, pty_id: str, rows: int, cols: int) -> None:
        await self._http.put(
            f"{self._url(session)}/pty/{pty_id}",
            auth=self._auth(session),
            json={"size": {"rows": rows, "cols": cols}},
        )

    async def attach(
        self,
        session: Session,
        mode: str,
        inside_port: int,
        receive: Callable[[], Awaitable[str | None]],
        send: Callable[[bytes], Awaitable[None]],
        on_input: Callable[[], None],
    ) -> None:
        """Bridge a browser to the terminal until either side goes away."""
        self.expire()
        pty_id = await self._pty(session, mode, inside_port)
        terminal = self._open[(session.id, mode)]
        terminal.detached_at = None
        token = base64.b64encode(":".join(self._auth(session)).encode()).decode()
        ws_url = self._url(session).replace("http://", "ws://")
        async with connect(
            f"{ws_url}/pty/{pty_id}/connect?cursor=0",
            additional_headers={"Authorization": f"Basic {token}"},
            max_size=None,
        ) as pty:

            async def output() -> None:
                async for frame in pty:
                    data = frame.encode() if isinstance(frame, str) else frame
                    if data.startswith(b"\x00"):  # OpenCode's cursor bookkeeping, not output
                        continue
                    await send(data)

            async def typing() -> None:
                while (text := await receive()) is not None:
                    try:
                        message = json.loads(text)
                    except ValueError:
                        continue
                    if "data" in message:
                        on_input()
                        await pty.send(str(message["data"]))
                    if "rows" in message and "cols" in message:
                        await self.resize(
                            session, pty_id, int(message["rows"]), int(message["cols"])
                        )

            tasks = [asyncio.create_task(output()), asyncio.create_task(typing())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                terminal.detached_at = time.monotonic()
                for result in results:
                    if isinstance(result, Exception) and not isinstance(
                        result, (ConnectionClosed, asyncio.CancelledError)
                    ):
                        raise result

    def expire(self) -> None:
        """End terminals detached longer than KEEP."""
        now = time.monotonic()
        for key, terminal in list(self._open.items()):
            if terminal.detached_at is not None and now - terminal.detached_at > KEEP:
                del self._open[key]
                asyncio.get_running_loop().create_task(self._end(terminal))

    async def _end(self, terminal: _Terminal) -> None:
        with contextlib.suppress(httpx.HTTPError):  # gone with its session already
            await self._http.delete(
                f"{self._url(terminal.session)}/pty/{terminal.pty_id}",
                auth=self._auth(terminal.session),
            )
