"""`/api/v1/code/...`: validate, call the SessionManager, shape the answer. No logic here.

Every route takes the `Caller` that `api/access.py` resolved and hands it to the manager, which
shows each user only their own sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from codestation import __version__, prompts
from codestation.api.access import SCRAPER, caller
from codestation.changes import Changes
from codestation.errors import Forbidden, SessionNotFound, TooManyStreams, Unauthorized
from codestation.identity import Caller
from codestation.manager import SessionManager
from codestation.metrics import CONTENT_TYPE
from codestation.schemas import (
    AbortResponse,
    Auth,
    Capacity,
    EnvironmentInfo,
    EnvironmentList,
    ErrorBody,
    Health,
    Me,
    PromptAccepted,
    PromptRequest,
    Reply,
    SessionInfo,
    SessionList,
    StartRequest,
    StartResponse,
    StopAllResponse,
)
from codestation.sessions import Session, Status
from codestation.terminals import MODES, Terminals


class Stream(StreamingResponse):
    """A streamed answer that ends as soon as its client leaves. Starlette, under ASGI 2.4,
    notices a gone client only at its next write, and a quiet stream may not write for
    minutes: meanwhile it would hold its upstream (an agent's event stream, a log follow)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def client_leaves() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [
            asyncio.ensure_future(self.stream_response(send)),
            asyncio.ensure_future(client_leaves()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            closing = getattr(self.body_iterator, "aclose", None)
            if closing is not None:  # its upstream goes now, not whenever it is collected
                await closing()
            if self.background is not None:
                await self.background()
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, OSError):
                raise result


def errors(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI entries for error answers: always JSON, whatever the route's own answers are."""
    return {c: {"model": ErrorBody, "content": {"application/json": {}}} for c in codes}


ERRORS = errors(400, 401, 403, 404, 413, 422, 503)

router = APIRouter()
code = APIRouter(prefix="/api/v1/code", tags=["sessions"], responses=ERRORS)


def get_manager(request: Request) -> SessionManager:
    manager: SessionManager = request.app.state.manager
    return manager


def get_caller(request: Request) -> Caller:
    who = caller(request.scope)
    if who is None:  # only the public paths lack one, and none of them comes here
        raise Unauthorized("this request carries no credentials; send a Bearer token.")
    return who


Manager = Annotated[SessionManager, Depends(get_manager)]
CallerDep = Annotated[Caller, Depends(get_caller)]


def info(manager: SessionManager, s: Session) -> SessionInfo:
    return SessionInfo(
        id=s.id,
        status=s.status,
        runtime=s.runtime,
        url=manager.url(s) if s.status is Status.RUNNING else None,
        web_url=manager.web_url(s) if s.status is Status.RUNNING else None,
        opencode_url=manager.opencode_url(s) if s.status is Status.RUNNING else None,
        started_from="pool" if s.started_from == "pool" else "cold",
        phases=s.phases,
        agent=_busy(manager.busy.get(s.id)) if s.status is Status.RUNNING else None,
        port=s.port or (manager.agent_address(s)[1] if s.status is Status.RUNNING else 0),
        workspace=str(s.workspace),
        environment=s.environment,
        created_at=s.created_at,
        started_at=s.started_at,
        stopped_at=s.stopped_at,
        error=s.error,
        step=s.step,
        reason=s.reason,
        idle_timeout=s.idle_timeout,
        max_age=s.max_age,
        last_activity=s.last_activity,
        limits=s.limits,
        owner=s.owner,
        auth=Auth(username=s.username, password=s.password.get_secret_value()),
    )


def _busy(busy: bool | None) -> Literal["busy", "idle"] | None:
    return None if busy is None else "busy" if busy else "idle"


@code.post(
    "/start",
    status_code=202,
    response_model=StartResponse,
    responses=errors(429),
)
async def start(body: StartRequest, manager: Manager, who: CallerDep) -> StartResponse:
    """Start a session; it answers at once with `starting`, poll the session to see it run."""
    session = await manager.start(
        who, body.workspace, body.environment, idle_timeout=body.idle_timeout, max_age=body.max_age
    )
    return StartResponse(session_id=session.id, **info(manager, session).model_dump())


@code.get("/me", response_model=Me)
async def me(who: CallerDep) -> Me:
    """Who you are; a browser logged in by cookie also gets the CSRF token its changes carry."""
    return Me(
        user=who.user,
        admin=who.admin,
        token_id=who.token_id,
        csrf_token=who.login.csrf.get_secret_value() if who.login else None,
    )


@code.get("/environments", response_model=EnvironmentList)
async def environments(manager: Manager, who: CallerDep) -> EnvironmentList:
    """The environment profiles a session can be started with."""
    return EnvironmentList(
        environments=[
            EnvironmentInfo(
                name=name,
                description=profile.description,
                runtime=profile.runtime or manager.default_runtime,
            )
            for name, profile in sorted(manager.settings.environments.items())
        ]
    )


@code.get("/sessions", response_model=SessionList)
async def sessions(manager: Manager, who: CallerDep) -> SessionList:
    """Your sessions (an admin's: everyone's), oldest first."""
    return SessionList(sessions=[info(manager, s) for s in manager.sessions(who)])


@code.get("/session/{session_id}", response_model=SessionInfo)
async def session(session_id: str, manager: Manager, who: CallerDep) -> SessionInfo:
    found = manager.get(who, session_id)
    manager.touch(found)
    return info(manager, found)


@code.get("/session/{session_id}/logs", response_class=PlainTextResponse, responses=errors(429))
async def logs(
    session_id: str,
    manager: Manager,
    who: CallerDep,
    tail: Annotated[int, Query(ge=1, le=10000, description="How many last lines.")] = 200,
    follow: Annotated[bool, Query(description="Keep streaming new output.")] = False,
) -> Response:
    """The agent's output (OpenCode's log); a stopped session keeps its last lines."""
    manager.touch(manager.get(who, session_id))  # and a 404 before a stream begins
    if not follow:
        return PlainTextResponse(await manager.logs(who, session_id, tail))
    release = manager.open_stream(who)

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for chunk in manager.follow(who, session_id, tail):
                yield chunk
        finally:
            release()

    # The background task lets the stream go even if the client left before it began.
    return Stream(stream(), media_type="text/plain", background=BackgroundTask(release))


@code.get("/events", response_class=StreamingResponse, responses=errors(429))
async def events(manager: Manager, who: CallerDep) -> StreamingResponse:
    """Server-sent events about your sessions (an admin's: everyone's): first `snapshot`,
    then `session` (one changed, in full) and `deleted` (`{"id": ...}`) as they happen; a
    comment every 15 s keeps it open."""
    release = manager.open_stream(who)
    queue = manager.subscribe(who)

    def done() -> None:
        manager.unsubscribe(queue)
        release()

    async def stream() -> AsyncIterator[str]:
        try:
            snapshot = SessionList(sessions=[info(manager, s) for s in manager.sessions(who)])
            yield _sse("snapshot", snapshot.model_dump_json())
            while True:
                try:
                    kind, item = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:  # dropped for falling behind: the client starts again
                    return
                if kind == "deleted":
                    yield _sse(kind, json.dumps({"id": item.id}))
                else:
                    yield _sse(kind, info(manager, item).model_dump_json())
        finally:
            done()

    return Stream(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(done),
    )


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


@code.websocket("/session/{session_id}/terminal")
async def terminal(websocket: WebSocket, session_id: str, mode: str = "agent") -> None:
    """A terminal in the session's sandbox: `mode=agent` (OpenCode's TUI) or `mode=shell`.
    Send `{"data": ...}` to type and `{"rows": r, "cols": c}` to resize; output comes as bytes.
    Reattaching within `terminal_keep` seconds replays recent output. Only codestation's own
    pages may open it (`api/access.py` checks its Origin)."""
    manager: SessionManager = websocket.app.state.manager
    terminals: Terminals = websocket.app.state.terminals
    who = caller(websocket.scope)
    try:
        session = manager.get(who, session_id) if who is not None else None
    except SessionNotFound:
        session = None
    if session is None or session.status is not Status.RUNNING or mode not in MODES:
        await websocket.close(code=1008, reason="no such running session, or mode")
        return
    assert who is not None
    try:  # a terminal is a long-lived stream too: it counts against the same places
        release = manager.open_stream(who)
    except TooManyStreams:
        await websocket.close(code=1013, reason="too many streams open; close one")
        return
    try:
        await websocket.accept()
        await _attach(websocket, manager, terminals, session, mode)
    finally:
        release()


async def _attach(
    websocket: WebSocket, manager: SessionManager, terminals: Terminals, session: Session, mode: str
) -> None:

    async def receive() -> str | None:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        return message.get("text") or (message.get("bytes") or b"").decode(errors="replace")

    inside = manager.runtimes[session.runtime].inside_port(session.port)
    with contextlib.suppress(WebSocketDisconnect, ConnectionClosed, RuntimeError):
        try:
            await terminals.attach(session, mode, inside, receive, websocket.send_bytes,
                                   lambda: manager.touch(session))  # fmt: skip
        except (OSError, InvalidHandshake) as exc:  # whatever listens there is no terminal
            await websocket.close(code=1011, reason=f"OpenCode refused: {exc}"[:120])
            return
        await websocket.close()


@code.post(
    "/session/{session_id}/prompt",
    status_code=202,
    response_model=PromptAccepted | Reply,
    responses=errors(409),
)
async def prompt(
    session_id: str, body: PromptRequest, manager: Manager, who: CallerDep, response: Response
) -> PromptAccepted | Reply:
    """Send a prompt to the session's agent, in a new OpenCode session or `opencode_session`.
    At once (202) with the ids to follow it by, or with `wait` (200) the agent's reply once
    its turn ends: its text, the tools it used, tokens and cost."""
    answer = await prompts.prompt(manager.agent(who, session_id), body)
    if isinstance(answer, Reply):
        response.status_code = 200
    return answer


@code.post("/session/{session_id}/abort", response_model=AbortResponse, responses=errors(409))
async def abort(
    session_id: str,
    manager: Manager,
    who: CallerDep,
    opencode_session: Annotated[
        str | None,
        Query(pattern=r"^ses_[A-Za-z0-9]{1,64}$", description="Only this one; unset: any busy."),
    ] = None,
) -> AbortResponse:
    """End the agent's turn under way (in `opencode_session`, or in each that is working)."""
    aborted = await prompts.abort(manager.agent(who, session_id), opencode_session)
    return AbortResponse(aborted=aborted)


@code.get("/session/{session_id}/changes", response_model=Changes, responses=errors(409))
async def changes(session_id: str, manager: Manager, who: CallerDep) -> Changes:
    """What changed in the workspace since the session started: files added, modified and
    deleted, with a unified diff for text files (capped; binary files named only). Computed
    against a snapshot taken as the session started (see docs/changes.md)."""
    return await manager.changes(who, session_id)


@code.get(
    "/session/{session_id}/reply",
    response_model=Reply,
    responses=errors(409),
)
async def reply(
    session_id: str,
    manager: Manager,
    who: CallerDep,
    opencode_session: Annotated[str, Query(pattern=r"^ses_[A-Za-z0-9]{1,64}$")],
    message: Annotated[str, Query(pattern=r"^msg_[A-Za-z0-9]{1,64}$")],
) -> Reply:
    """The agent's reply, so far, to a prompt sent without waiting (`finished` once its turn
    has ended): the ids the prompt was accepted with name it."""
    return await prompts.reply(manager.agent(who, session_id), opencode_session, message)


@code.get(
    "/session/{session_id}/events",
    response_class=StreamingResponse,
    responses=errors(409, 429),
)
async def agent_events(session_id: str, manager: Manager, who: CallerDep) -> StreamingResponse:
    """The agent's events as server-sent events, as OpenCode sends them (`message.part.delta`
    as it writes, `message.part.updated` for each tool, `session.status`, `session.idle`,
    ...), until the session stops. Each event's `data` is OpenCode's JSON."""
    release = manager.open_stream(who)
    try:
        upstream = manager.agent_events(who, session_id)
        first = await anext(upstream)  # a session that is gone answers 409 or 503, not a stream
    except BaseException:
        release()
        raise

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in upstream:
                yield chunk
        finally:
            await upstream.aclose()
            release()

    return Stream(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(release),
    )


@code.post("/session/{session_id}/stop", response_model=SessionInfo)
async def stop(session_id: str, manager: Manager, who: CallerDep) -> SessionInfo:
    """Stop the session and remove its sandbox; its workspace is left as it is."""
    return info(manager, await manager.stop(who, session_id))


@code.delete("/session/{session_id}", status_code=204)
async def delete(session_id: str, manager: Manager, who: CallerDep) -> Response:
    """Stop the session and forget it."""
    await manager.delete(who, session_id)
    return Response(status_code=204)


@code.post("/stop", response_model=StopAllResponse)
async def stop_all(
    manager: Manager,
    who: CallerDep,
    all_: Annotated[
        bool, Query(alias="all", description="An admin's: everyone's sessions, not just yours.")
    ] = False,
) -> StopAllResponse:
    """Stop every live session of yours."""
    stopped = await manager.stop_all(who, everyone=all_)
    return StopAllResponse(stopped=[info(manager, s) for s in stopped])


@router.get("/healthz", response_model=Health, tags=["service"])
async def healthz(manager: Manager) -> Health:
    return Health(
        ok=True,
        runtime=manager.default_runtime,
        version=__version__,
        capacity=Capacity(**manager.capacity()),
    )


@router.get("/metrics", tags=["service"], response_class=PlainTextResponse)
async def metrics(request: Request, who: CallerDep) -> Response:
    """The service's metrics in Prometheus' text format: for an admin's token, or
    `metrics_token`."""
    if not (who.admin or who is SCRAPER):
        raise Forbidden(
            "the metrics are for an admin's token, or the service's metrics_token; ask an "
            "admin for one of those."
        )
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


router.include_router(code)
