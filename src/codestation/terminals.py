"""Browser terminals on a session: reconnecting PTYs inside its sandbox.

A terminal is a PTY that the session's own OpenCode runs (its `/pty` API), so it lives inside
the sandbox, as the agent's user. `agent` mode runs `opencode attach` on the session's server
(the agent's TUI); `shell` mode runs bash. A terminal outlives the browser: closing the tab
detaches it, and attaching again within `terminal_keep` seconds replays its recent output
(OpenCode keeps it) and carries on, as Coder's reconnecting PTY does. One terminal per session
and mode. `sweep`, run every `cull_interval`, ends terminals detached longer than that, and
those a previous run of the service left (their PTYs carry the title `codestation:<mode>`).
A terminal left open is not activity on its session; typing in it is.

Browser protocol (JSON text frames in, raw output out): `{"data": "ls\\r"}` types,
`{"rows": 24, "cols": 80}` resizes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from websockets.exceptions import ConnectionClosed

from codestation.agent import DIRECTORY, TERMINAL, websocket
from codestation.sessions import Session

MODES = ("agent", "shell")


@dataclass
class _Terminal:
    session: Session
    pty_id: str
    detached_at: float | None = None


class Terminals:
    def __init__(self, agent_url: Callable[[Session], str], keep: float) -> None:
        self._agent_url = agent_url  # where codestation reaches a session's OpenCode
        self.keep = keep  # seconds a detached terminal waits for its browser to come back
        self._open: dict[tuple[str, str], _Terminal] = {}
        self._making: collections.Counter[str] = collections.Counter()  # PTYs being made
        self._http = httpx.AsyncClient(timeout=10)

    async def close(self) -> None:
        await self._http.aclose()

    def attached(self) -> int:
        """Terminals a browser is attached to now."""
        return sum(1 for t in self._open.values() if t.detached_at is None)

    def _url(self, session: Session) -> str:
        return self._agent_url(session)

    def _auth(self, session: Session) -> tuple[str, str]:
        return (session.username, session.password.get_secret_value())

    async def _pty(self, session: Session, mode: str, inside_port: int) -> str:
        """The id of the session's terminal in `mode`, made if it has none (or it ended)."""
        key = (session.id, mode)
        known = self._open.get(key)
        if known is not None:
            known.detached_at = None  # claimed: `sweep` must not end it while we ask
            alive = await self._http.get(
                f"{self._url(session)}/pty/{known.pty_id}", auth=self._auth(session),
                headers=DIRECTORY,
            )  # fmt: skip
            if alive.status_code == 200 and alive.json().get("status") == "running":
                return known.pty_id
        if mode == "agent":
            # No password on the command line (`ps` shows it): `attach` takes it from
            # OPENCODE_SERVER_PASSWORD, which the PTY inherits from the session's OpenCode.
            command = "opencode"
            args = ["attach", f"http://127.0.0.1:{inside_port}"]
        else:
            command, args = "bash", []
        self._making[session.id] += 1
        try:
            created = await self._http.post(
                f"{self._url(session)}/pty",
                auth=self._auth(session),
                headers=DIRECTORY,
                json={
                    "command": command, "args": args, "cwd": "/workspace",
                    "title": TERMINAL + mode,
                },
            )  # fmt: skip
            created.raise_for_status()
            pty_id: str = created.json()["id"]
            self._open[key] = _Terminal(session, pty_id)
        finally:
            self._making[session.id] -= 1
            if not self._making[session.id]:
                del self._making[session.id]
        return pty_id

    async def resize(self, session: Session, pty_id: str, rows: int, cols: int) -> None:
        await self._http.put(
            f"{self._url(session)}/pty/{pty_id}",
            auth=self._auth(session),
            headers=DIRECTORY,
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
        pty_id = await self._pty(session, mode, inside_port)
        terminal = self._open[(session.id, mode)]
        terminal.detached_at = None
        ws_url = self._url(session).replace("http://", "ws://")
        async with websocket(
            f"{ws_url}/pty/{pty_id}/connect?cursor=0", session.password, DIRECTORY
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
                        if not isinstance(message, dict):
                            continue
                        if "rows" in message and "cols" in message:
                            size = int(message["rows"]), int(message["cols"])
                    except (ValueError, TypeError):  # not what the protocol says: ignored
                        continue
                    if "data" in message:
                        on_input()
                        await pty.send(str(message["data"]))
                    if "rows" in message and "cols" in message:
                        await self.resize(session, pty_id, *size)

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

    async def sweep(self, running: list[Session]) -> None:
        """End terminals detached longer than `keep`, those of sessions no longer running, and
        those of `running` sessions that this process does not know (a previous run's)."""
        now = time.monotonic()
        live = {s.id for s in running}
        for key, terminal in list(self._open.items()):
            detached = terminal.detached_at
            if terminal.session.id not in live:
                del self._open[key]
            elif detached is not None and now - detached > self.keep:
                del self._open[key]
                await self._end(terminal.session, terminal.pty_id)
        for session in running:
            if session.id in self._making:
                continue  # its new PTY may be listed before it is recorded: next time
            try:
                # Bounded: the agent controls its OpenCode and may trickle an answer.
                listed = await asyncio.wait_for(
                    self._http.get(
                        f"{self._url(session)}/pty", auth=self._auth(session), headers=DIRECTORY
                    ),
                    10,
                )
                shells = listed.json()
                left = [p["id"] for p in shells if str(p.get("title", "")).startswith(TERMINAL)]
            except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError, TimeoutError):
                continue  # it will say next time, or it is not running any more
            ours = {t.pty_id for t in self._open.values()}  # as of now, after the await
            for pty_id in left:
                if pty_id not in ours and session.id not in self._making:
                    await self._end(session, str(pty_id))

    async def _end(self, session: Session, pty_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # gone with its session already
            await self._http.delete(
                f"{self._url(session)}/pty/{pty_id}", auth=self._auth(session), headers=DIRECTORY
            )
