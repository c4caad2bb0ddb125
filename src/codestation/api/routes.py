"""`/api/v1/code/...`: validate, call the SessionManager, shape the answer. No logic here."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse
from websockets.exceptions import ConnectionClosed

from codestation import __version__
from codestation.api.access import origin_allowed, service_hosts
from codestation.manager import SessionManager
from codestation.schemas import (
    Auth,
    EnvironmentInfo,
    EnvironmentList,
    ErrorBody,
    Health,
    SessionInfo,
    SessionList,
    StartRequest,
    StartResponse,
    StopAllResponse,
)
from codestation.sessions import Session, Status
from codestation.terminals import MODES, Terminals

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 404, 422, 503)
}

router = APIRouter()
code = APIRouter(prefix="/api/v1/code", tags=["sessions"], responses=ERRORS)


def get_manager(request: Request) -> SessionManager:
    manager: SessionManager = request.app.state.manager
    return manager


Manager = Annotated[SessionManager, Depends(get_manager)]


def info(manager: SessionManager, s: Session) -> SessionInfo:
    return SessionInfo(
        id=s.id,
        status=s.status,
        runtime=s.runtime,
        url=manager.url(s) if s.status is Status.RUNNING else None,
        web_url=manager.web_url(s) if s.status is Status.RUNNING else None,
        port=s.port,
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
        auth=Auth(username=s.username, password=s.password),
    )


@code.post("/start", status_code=202, response_model=StartResponse)
async def start(body: StartRequest, manager: Manager) -> StartResponse:
    """Start a session; it answers at once with `starting`, poll the session to see it run."""
    session = await manager.start(
        body.workspace, body.environment, idle_timeout=body.idle_timeout, max_age=body.max_age
    )
    return StartResponse(session_id=session.id, **info(manager, session).model_dump())


@code.get("/environments", response_model=EnvironmentList)
async def environments(manager: Manager) -> EnvironmentList:
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
async def sessions(manager: Manager) -> SessionList:
    return SessionList(sessions=[info(manager, s) for s in manager.sessions()])


@code.get("/session/{session_id}", response_model=SessionInfo)
async def session(session_id: str, manager: Manager) -> SessionInfo:
    found = manager.get(session_id)
    manager.touch(found)
    return info(manager, found)


@code.get("/session/{session_id}/logs", response_class=PlainTextResponse)
async def logs(
    session_id: str,
    manager: Manager,
    tail: Annotated[int, Query(ge=1, le=10000, description="How many last lines.")] = 200,
    follow: Annotated[bool, Query(description="Keep streaming new output.")] = False,
) -> Response:
    """The agent's output (OpenCode's log); a stopped session keeps its last lines."""
    manager.touch(manager.get(session_id))  # and a 404 before a stream begins
    if follow:
        return StreamingResponse(manager.follow(session_id, tail), media_type="text/plain")
    return PlainTextResponse(await manager.logs(session_id, tail))


@code.get("/events", response_class=StreamingResponse)
async def events(manager: Manager) -> StreamingResponse:
    """Server-sent events: first `snapshot` (every session), then `session` (one changed, in
    full) and `deleted` (`{"id": ...}`) as they happen; a comment every 15 s keeps it open."""
    queue = manager.subscribe()

    async def stream() -> AsyncIterator[str]:
        try:
            snapshot = SessionList(sessions=[info(manager, s) for s in manager.sessions()])
            yield _sse("snapshot", snapshot.model_dump_json())
            while True:
                try:
                    kind, item = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(item, Session):
                    yield _sse(kind, info(manager, item).model_dump_json())
                else:
                    yield _sse(kind, json.dumps({"id": item}))
        finally:
            manager.unsubscribe(queue)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


@code.websocket("/session/{session_id}/terminal")
async def terminal(websocket: WebSocket, session_id: str, mode: str = "agent") -> None:
    """A terminal in the session's sandbox: `mode=agent` (OpenCode's TUI) or `mode=shell`.
    Send `{"data": ...}` to type and `{"rows": r, "cols": c}` to resize; output comes as bytes.
    Reattaching within five minutes replays recent output. Only codestation's own pages may
    open it (Origin is checked)."""
    manager: SessionManager = websocket.app.state.manager
    terminals: Terminals = websocket.app.state.terminals
    if not origin_allowed(websocket.scope, service_hosts(), manager.settings.port):
        await websocket.close(code=1008, reason="foreign origin")
        return
    session = manager.find(session_id)
    if session is None or session.status is not Status.RUNNING or mode not in MODES:
        await websocket.close(code=1008, reason="no such running session, or mode")
        return
    await websocket.accept()

    async def receive() -> str | None:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        return message.get("text") or (message.get("bytes") or b"").decode(errors="replace")

    inside = manager.runtimes[session.runtime].inside_port(session.port)
    with contextlib.suppress(WebSocketDisconnect, ConnectionClosed, RuntimeError):
        await terminals.attach(
            session, mode, inside, receive, websocket.send_bytes, lambda: manager.touch(session)
        )
        await websocket.close()


@code.post("/session/{session_id}/stop", response_model=SessionInfo)
async def stop(session_id: str, manager: Manager) -> SessionInfo:
    """Stop the session and remove its sandbox; its workspace is left as it is."""
    return info(manager, await manager.stop(session_id))


@code.delete("/session/{session_id}", status_code=204)
async def delete(session_id: str, manager: Manager) -> Response:
    """Stop the session and forget it."""
    await manager.delete(session_id)
    return Response(status_code=204)


@code.post("/stop", response_model=StopAllResponse)
async def stop_all(manager: Manager) -> StopAllResponse:
    """Stop every live session."""
    return StopAllResponse(stopped=[info(manager, s) for s in await manager.stop_all()])


@router.get("/healthz", response_model=Health, tags=["service"])
async def healthz(manager: Manager) -> Health:
    return Health(ok=True, runtime=manager.default_runtime, version=__version__)


router.include_router(code)
