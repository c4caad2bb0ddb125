"""Each session's own OpenCode, served on its own host name: `<session id>.<proxy_domain>`.

OpenCode's web UI uses absolute asset paths, so it needs an origin of its own. Requests whose
Host is a session's name go to that session's OpenCode, with its credentials added upstream,
so the person never sees a password prompt. Plain HTTP and server-sent events stream through
unbuffered; WebSockets (OpenCode's `/pty/{id}/connect`) are bridged both ways. Every request
and every frame from the browser counts as activity on the session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from codestation.api.access import origin_allowed
from codestation.manager import SessionManager
from codestation.sessions import Session, Status

# Hop-by-hop headers, and those the proxy sets itself.
_DROP = {
    "host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade", "authorization", "content-length",
}  # fmt: skip


class SessionProxy:
    """ASGI middleware: a session's host name goes to its OpenCode; anything else on to `app`."""

    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self.suffix = f".{domain}"
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30, read=None))

    def _session_id(self, scope: Scope) -> str | None:
        host = Headers(scope=scope).get("host", "").rsplit(":", 1)[0].lower()
        if host.endswith(self.suffix) and host != self.suffix[1:]:
            label = host.removesuffix(self.suffix)
            return label if "." not in label else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = self._session_id(scope) if scope["type"] in ("http", "websocket") else None
        if session_id is None:
            await self.app(scope, receive, send)
            return
        manager: SessionManager = scope["app"].state.manager  # set by the app's lifespan
        session = manager.find(session_id)
        if session is None or session.status is not Status.RUNNING:
            await _refuse(scope, send, session_id, session)
            return
        manager.touch(session)
        upstream = f"{manager.settings.local_host}:{session.port}"
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, manager, session, upstream)
        else:
            await self._http_request(scope, receive, send, session, upstream)

    async def _http_request(
        self, scope: Scope, receive: Receive, send: Send, session: Session, upstream: str
    ) -> None:
        headers = _upstream_headers(scope, session)
        url = f"http://{upstream}{scope['raw_path'].decode()}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode()
        request = self._http.build_request(
            scope["method"], url, headers=headers, content=_body(receive)
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _plain(send, 502, f"OpenCode of session {session.id} did not answer: {exc}")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.decode().lower() not in _DROP - {"content-length"}
                        and k.decode().lower() != "www-authenticate"
                    ],
                }
            )
            # Raw bytes, as they come: server-sent events must not wait in a buffer.
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except OSError:  # the browser went away
            pass
        finally:
            await response.aclose()

    async def _websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        manager: SessionManager,
        session: Session,
        upstream: str,
    ) -> None:
        port = int(Headers(scope=scope).get("host", "").rsplit(":", 1)[-1] or 80)
        if not origin_allowed(scope, {f"{session.id}{self.suffix}"}, port):
            await send({"type": "websocket.close", "code": 1008})  # another site's page
            return
        browser = WebSocket(scope, receive, send)
        path = scope["raw_path"].decode()
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode()
        try:
            opencode = await connect(
                f"ws://{upstream}{path}",
                additional_headers={"Authorization": _basic(session)},
                max_size=None,
            )
        except (OSError, InvalidStatus) as exc:
            await browser.close(code=1011, reason=f"OpenCode refused: {exc}"[:120])
            return
        await browser.accept()

        async def to_opencode() -> None:
            while True:
                message = await browser.receive()
                if message["type"] == "websocket.disconnect":
                    return
                manager.touch(session)  # terminal input is activity
                data = message.get("bytes") or message.get("text") or ""
                await opencode.send(data)

        async def to_browser() -> None:
            async for data in opencode:
                if isinstance(data, bytes):
                    await browser.send_bytes(data)
                else:
                    await browser.send_text(data)

        tasks = [asyncio.create_task(to_opencode()), asyncio.create_task(to_browser())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await opencode.close()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, ConnectionClosed):
                await browser.close()


def _basic(session: Session) -> str:
    token = base64.b64encode(f"{session.username}:{session.password}".encode()).decode()
    return f"Basic {token}"


def _upstream_headers(scope: Scope, session: Session) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in Headers(scope=scope).items() if k.lower() not in _DROP]
    return [*headers, ("authorization", _basic(session))]


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body"):
            return


async def _plain(send: Send, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


async def _refuse(scope: Scope, send: Send, session_id: str, session: Session | None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    if session is None:
        await _plain(send, 404, f"There is no session {session_id}.")
    else:
        await _plain(send, 503, f"Session {session_id} is {session.status}, not running.")
