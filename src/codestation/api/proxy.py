"""Each session's own OpenCode, served on its own host name: `<session id>.<proxy_domain>`.

OpenCode's web UI uses absolute asset paths, so it needs an origin of its own. Requests whose
Host is a session's name go to that session's OpenCode, with its credentials added upstream,
so the person never sees a password prompt. Plain HTTP and server-sent events stream through
unbuffered; WebSockets (OpenCode's `/pty/{id}/connect`) are bridged both ways. Every request
and every frame from the browser counts as activity on the session.

Only the session's owner (or an admin) gets through: `api/access.py` has authenticated the
caller (a Bearer token, or this host's own login cookie) and this layer asks the manager for the
session as that caller, so anyone else gets the 404 an unknown id gets. A browser gets this
host's cookie at `/_codestation/auth` with a single-use ticket minted on the service's own
origin (`GET /open/{id}`): the token never appears in this host's URLs. On the way up,
codestation's own cookies and credentials are removed and the upstream URL is built from the
path alone; on the way down, OpenCode's CORS headers are dropped, so no other site's page can
read a session through codestation.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import parse_qs, quote, unquote

import httpcore
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.protocol import State

from codestation.accounts import Accounts
from codestation.agent import DIRECTORY, websocket
from codestation.api.access import (
    CSRF_HEADER,
    OURS,
    SESSION_COOKIE,
    STATE_COOKIE,
    TICKET_PATH,
    caller,
    cookie_pairs,
    cookie_values,
    login_cookie,
    opencode_path,
    refuse,
    safe_next,
    secure,
    session_host,
)
from codestation.api.web import PAGES
from codestation.errors import CodestationError, NotRunning, SessionNotFound
from codestation.manager import SessionManager
from codestation.metrics import Metrics
from codestation.sessions import Session, Status

# Connecting and sending are bounded; an answer may take as long as a turn or an event stream.
_TIMEOUTS = {"connect": 30.0, "write": 30.0, "read": None, "pool": 30.0}
_UPSTREAM_ERRORS = (OSError, httpcore.NetworkError, httpcore.TimeoutException,
                    httpcore.ProtocolError)  # fmt: skip
# Hop-by-hop headers, and those the proxy sets itself.
_DROP = {
    "host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade", "authorization", "content-length", "cookie",
    CSRF_HEADER,
}  # fmt: skip
# OpenCode answers CORS for any localhost page; through codestation, no other origin may read.
_DROP_DOWN = {"www-authenticate", "set-cookie"}
_OURS = {b"content-security-policy", b"x-content-type-options"}
LANDING_PAGE = "/_codestation/open"
LANDING = {LANDING_PAGE, "/_codestation/landing.js"}
_LANDING_HTML = (
    b'<!doctype html><meta charset="utf-8"><title>Opening the workspace</title>'
    b'<script src="/_codestation/landing.js"></script><p>Opening the workspace...</p>'
)


class SessionProxy:
    """ASGI middleware: a session's host name goes to its OpenCode; anything else on to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # No shared pool limit: one session's streams must never make another's wait. Each
        # session's share is bounded by `proxy_max_requests` instead. httpcore, not httpx's
        # client over it: a proxy needs none of the client's cookie jar, redirects or auth
        # (a shared cookie jar would even carry one session's cookies to another), and each
        # of those layers costs time on every request.
        self._http = httpcore.AsyncConnectionPool(max_connections=None,
                                                  max_keepalive_connections=32)  # fmt: skip
        self._in_flight: collections.Counter[str] = collections.Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        session_id = session_host(scope)
        prefixed = opencode_path(scope) if session_id is None else None
        if prefixed is not None:
            session_id, rest = prefixed
            scope = {**scope, "raw_path": rest, "path": unquote(rest.decode("latin-1"))}
            send = _sandboxed(send)
        if session_id is None:
            await self.app(scope, receive, send)
            return
        if prefixed is None and scope["type"] == "http" and scope["path"] == TICKET_PATH:
            await _redeem(scope, send, session_id)
            return
        if prefixed is None and scope["type"] == "http" and scope["path"] in LANDING:
            await _landing(send, scope["path"])
            return
        manager: SessionManager = scope["app"].state.manager  # set by the app's lifespan
        who = caller(scope)
        assert who is not None  # access.py lets no one else through but to the ticket door
        try:
            session = manager.get(who, session_id)
        except SessionNotFound as exc:
            await (refuse(scope, send, exc) if prefixed else _refuse(scope, send, session_id, None))
            return
        if session.status is not Status.RUNNING:
            if prefixed:
                await refuse(scope, send, NotRunning(f"session {session_id} is {session.status}."))
            else:
                await _refuse(scope, send, session_id, session)
            return
        manager.touch(session)
        if not scope["raw_path"].startswith(b"/"):
            # A request target such as `@evil.example/x` or `//evil.example/x` must never become
            # part of the upstream URL's authority.
            await _plain(send, 400, "The request target must be a path beginning with /.")
            return
        most = manager.settings.proxy_max_requests
        if self._in_flight[session.id] >= most:
            await _refuse_busy(scope, send, session.id, most)
            return
        upstream = manager.agent_address(session)
        counted: Metrics = scope["app"].state.metrics
        self._in_flight[session.id] += 1
        try:
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send, manager, session, upstream, counted)
            else:
                await self._http_request(scope, receive, send, session, upstream, counted)
        finally:
            self._in_flight[session.id] -= 1
            if not self._in_flight[session.id]:
                del self._in_flight[session.id]

    async def _http_request(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        session: Session,
        upstream: tuple[str, int],
        counted: Metrics,
    ) -> None:
        counted.http_requests.inc()
        headers = [("host", f"{upstream[0]}:{upstream[1]}"), *_upstream_headers(scope, session)]
        body_sent = asyncio.Event()
        target = scope["raw_path"] + (
            b"?" + scope["query_string"] if scope.get("query_string") else b""
        )
        url = httpcore.URL(scheme=b"http", host=upstream[0].strip("[]").encode(),
                           port=upstream[1], target=target)  # fmt: skip
        sent = Headers(scope=scope)
        content: AsyncIterator[bytes] | bytes = b""
        if "content-length" in sent:
            headers.append(("content-length", sent["content-length"]))
            content = _body(receive, body_sent, counted)
        elif "transfer-encoding" in sent:
            headers.append(("transfer-encoding", "chunked"))
            content = _body(receive, body_sent, counted)
        else:  # no body: sent as none, not as an empty chunked one OpenCode would wait on
            body_sent.set()
        request = httpcore.Request(
            scope["method"],
            url,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            content=content,
            extensions={"timeout": _TIMEOUTS},
        )
        try:
            response = await self._http.handle_async_request(request)
        except OSError:
            return  # the client left mid-upload: no one to answer
        except _UPSTREAM_ERRORS as exc:
            await _plain(send, 502, f"OpenCode of session {session.id} did not answer: {exc!r}")
            return
        stream = response.stream
        assert isinstance(stream, AsyncIterable)

        async def relay() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(k, v) for k, v in response.headers if _passes_down(k.decode())],
                }
            )
            # Raw bytes, as they come: server-sent events must not wait in a buffer.
            async for chunk in stream:
                counted.from_agent.inc(len(chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        async def client_leaves() -> None:
            # An event stream may say nothing for minutes: only `receive` tells that the
            # browser has gone, and then the upstream stream must end with it.
            await body_sent.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.create_task(relay()), asyncio.create_task(client_leaves())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await response.aclose()
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, _UPSTREAM_ERRORS):
                raise result  # one side went away mid-stream

    async def _websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        manager: SessionManager,
        session: Session,
        upstream: tuple[str, int],
        counted: Metrics,
    ) -> None:
        # access.py has refused a page of another origin already.
        browser = WebSocket(scope, receive, send)
        path = scope["raw_path"].decode()
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode()
        try:
            opencode = await websocket(
                f"ws://{upstream[0]}:{upstream[1]}{path}",
                session.password,
                {} if _names_project(scope) else DIRECTORY,
            )
        except (OSError, InvalidHandshake) as exc:  # refused, or not a WebSocket's answer
            await browser.close(code=1011, reason=f"OpenCode refused: {exc}"[:120])
            return
        await browser.accept()
        counted.websockets.inc()

        async def to_opencode() -> None:
            while True:
                message = await browser.receive()
                if message["type"] == "websocket.disconnect":
                    return
                manager.touch(session)  # terminal input is activity
                data = message.get("bytes") or message.get("text") or ""
                counted.to_agent.inc(_size(data))
                await opencode.send(data)

        async def to_browser() -> None:
            async for data in opencode:
                counted.from_agent.inc(_size(data))
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
            code, reason = _close_for_browser(opencode)
            await opencode.close()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, ConnectionClosed):
                await browser.close(code=code, reason=reason)


def _close_for_browser(opencode: ClientConnection) -> tuple[int, str]:
    """How to close a browser's WebSocket, told before the agent's side is closed: as the
    agent closed its own where it did so first, with one of the codes an ordinary end or an
    application uses (the others are codestation's own to say, e.g. 1008, 1013)."""
    protocol = opencode.protocol
    sent, received = protocol.close_sent, protocol.close_rcvd
    if sent is None and received is None:
        if protocol.state is State.OPEN:
            return 1000, ""  # the browser left first
        return 1011, "OpenCode's connection ended without a closing handshake"
    if received is None or protocol.close_rcvd_then_sent is False:
        assert sent is not None  # codestation ended it: a frame over MAX_FRAME, bad data
        return 1011, f"OpenCode sent what codestation does not pass on ({sent.code})"
    code = received.code
    if code == 1005:  # a clean close that named no code
        return 1000, ""
    if code not in (1000, 1001, 1011) and not 3000 <= code <= 4999:
        code = 1011
    printable = "".join(c for c in received.reason if c.isprintable())
    reason = f"OpenCode: {printable}" if printable else ""
    return code, reason.encode()[:120].decode(errors="ignore")  # a close reason: 123 bytes


def _size(frame: str | bytes) -> int:
    return len(frame) if isinstance(frame, bytes) else len(frame.encode())


def _sandboxed(send: Send) -> Send:
    """`send`, with every response marked as content of no origin: what a session's OpenCode
    answers is the agent's to write, and must never run as a page of the service's own."""

    async def sandboxed(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OURS]
            headers += [(b"content-security-policy", b"sandbox"),
                        (b"x-content-type-options", b"nosniff")]  # fmt: skip
            message = {**message, "headers": headers}
        await send(message)

    return sandboxed


def _basic(session: Session) -> str:
    pair = f"{session.username}:{session.password.get_secret_value()}"
    return f"Basic {base64.b64encode(pair.encode()).decode()}"


def _upstream_headers(scope: Scope, session: Session) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in Headers(scope=scope).items() if k.lower() not in _DROP]
    theirs = [f"{k}={v}" for k, v in cookie_pairs(scope) if k not in OURS]
    if theirs:
        headers.append(("cookie", "; ".join(theirs)))
    # A request that names no project is about the workspace: OpenCode's own default is its
    # working directory, which is not /workspace in a sandbox started ahead (the warm pool).
    if not _names_project(scope):
        headers.extend(DIRECTORY.items())
    return [*headers, ("authorization", _basic(session))]


def _names_project(scope: Scope) -> bool:
    """Whether a request says which project it is about (else it is about the workspace)."""
    query: bytes = scope.get("query_string", b"")
    # On every proxied request: parsed only where the name can be (ASGI's header names are
    # lowercase already).
    if b"directory=" in query and "directory" in parse_qs(query.decode("latin-1")):
        return True
    return any(name == b"x-opencode-directory" for name, _ in scope["headers"])


def _passes_down(name: str) -> bool:
    lower = name.lower()
    return lower not in (_DROP - {"content-length"}) | _DROP_DOWN and not lower.startswith(
        "access-control-"
    )


async def _redeem(scope: Scope, send: Send, session_id: str) -> None:
    """The ticket door: a ticket minted on the service's origin for this session, brought by
    the browser that holds the state it was minted for, becomes this host's own login cookie;
    then the browser goes on to where it was headed."""
    accounts: Accounts = scope["app"].state.accounts
    query = parse_qs(scope["query_string"].decode(errors="replace"))
    ticket = (query.get("ticket") or [""])[0]
    states = cookie_values(scope, STATE_COOKIE)
    who = accounts.redeem(ticket, session_id, states[-1] if states else "") if ticket else None
    try:
        cookie, max_age = accounts.login(who, scope=session_id) if who else ("", 0)
    except CodestationError:  # its token went away between the two calls
        who = None
    if who is None:
        await _plain(
            send,
            403,
            "This link has expired, was used already, or was made for another browser; open the "
            "session again from codestation.",
        )
        return
    https = secure(scope)
    await send({
        "type": "http.response.start",
        "status": 303,
        "headers": [
            (b"location", _through_landing(safe_next((query.get("next") or ["/"])[0]))),
            (b"set-cookie", login_cookie(SESSION_COOKIE, cookie, max_age, https=https).encode()),
            (b"set-cookie", login_cookie(STATE_COOKIE, "", 0, https=https).encode()),
            (b"cache-control", b"no-store"),
        ],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": b""})


def _through_landing(after: str) -> bytes:
    return f"{LANDING_PAGE}?next={quote(after, safe='')}".encode()


async def _landing(send: Send, path: str) -> None:
    """codestation's own first page on a session's host name (`web/landing.js` says why)."""
    if path == LANDING_PAGE:
        body, kind = _LANDING_HTML, b"text/html; charset=utf-8"
    else:
        body, kind = (PAGES / "landing.js").read_bytes(), b"text/javascript; charset=utf-8"
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", kind), (b"cache-control", b"no-store")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive, sent: asyncio.Event, counted: Metrics) -> AsyncIterator[bytes]:
    """The request's body, as it comes; `sent` is set once it has all come."""
    try:
        while True:
            message: Message = await receive()
            if message["type"] != "http.request":
                # Gone mid-upload: abort, so OpenCode never takes half a body for a whole one.
                raise OSError("the client went away before its request body ended")
            chunk = message.get("body", b"")
            counted.to_agent.inc(len(chunk))
            yield chunk
            if not message.get("more_body"):
                return
    finally:
        sent.set()


async def _plain(send: Send, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


async def _refuse_busy(scope: Scope, send: Send, session_id: str, most: int) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013})  # try again later
        return
    await _plain(
        send,
        503,
        f"Session {session_id} already has {most} requests open through codestation "
        "(proxy_max_requests); close some (tabs, event streams, terminals) and try again.",
    )


async def _refuse(scope: Scope, send: Send, session_id: str, session: Session | None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    if session is None:
        await _plain(send, 404, f"There is no session {session_id}.")
    else:
        await _plain(send, 503, f"Session {session_id} is {session.status}, not running.")
