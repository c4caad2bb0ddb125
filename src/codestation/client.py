"""`codestation.Client` and `codestation.AsyncClient`: the Python face of the HTTP API.

Both clients make the same requests and read the same answers: each request is written once,
as a `_Call` (what to send, how to read the answer), and each client only sends it. A session
comes back as a `Session` (or `AsyncSession`): its `SessionInfo`, plus the methods that act on
it. Errors come back as the classes in `codestation.errors`, rebuilt from the answer's `code`.

    with Client() as cs, cs.start("/home/me/project") as session:
        reply = session.prompt("please write hello.txt: Hello")
        print(reply.text, session.changes().files)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from pydantic import PrivateAttr

from codestation.changes import Changes
from codestation.errors import StartTimeout, Unavailable, error_for_code
from codestation.schemas import (
    AbortResponse,
    AgentEvent,
    Me,
    PromptAccepted,
    PromptRequest,
    Reply,
    SessionInfo,
    SessionList,
    StartRequest,
)
from codestation.sessions import Status

DEFAULT_URL = "http://127.0.0.1:8585"
T = TypeVar("T")
API = "/api/v1/code"


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request, and how to read its answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    timeout: float | None = 60.0


def _session(r: httpx.Response) -> SessionInfo:
    return SessionInfo.model_validate(r.json())


def _start(
    workspace: str, environment: str, idle_timeout: float | None, max_age: float | None
) -> _Call[SessionInfo]:
    body = StartRequest(
        workspace=workspace, environment=environment, idle_timeout=idle_timeout, max_age=max_age
    )
    return _Call("POST", f"{API}/start", _session, json=body.model_dump(exclude_none=True))


def _get(session_id: str) -> _Call[SessionInfo]:
    return _Call("GET", f"{API}/session/{session_id}", _session)


def _list() -> _Call[list[SessionInfo]]:
    return _Call("GET", f"{API}/sessions", lambda r: SessionList.model_validate(r.json()).sessions)


def _logs(session_id: str, tail: int) -> _Call[str]:
    return _Call("GET", f"{API}/session/{session_id}/logs", lambda r: r.text, {"tail": tail})


def _stop(session_id: str) -> _Call[SessionInfo]:
    return _Call("POST", f"{API}/session/{session_id}/stop", _session)


def _delete(session_id: str) -> _Call[None]:
    return _Call("DELETE", f"{API}/session/{session_id}", lambda r: None)


def _stop_all(everyone: bool) -> _Call[list[SessionInfo]]:
    return _Call(
        "POST",
        f"{API}/stop",
        lambda r: [SessionInfo.model_validate(s) for s in r.json()["stopped"]],
        {"all": "true"} if everyone else {},
    )


def _me() -> _Call[Me]:
    return _Call("GET", f"{API}/me", lambda r: Me.model_validate(r.json()))


def _health() -> _Call[dict[str, Any]]:
    return _Call("GET", "/healthz", lambda r: dict(r.json()))


def _prompt(session_id: str, request: PromptRequest) -> _Call[PromptAccepted | Reply]:
    def read(r: httpx.Response) -> PromptAccepted | Reply:
        body = r.json()
        return Reply.model_validate(body) if "text" in body else PromptAccepted.model_validate(body)

    path = f"{API}/session/{session_id}/prompt"
    body = request.model_dump(exclude_none=True)
    return _Call("POST", path, read, json=body, timeout=None if request.wait else 60.0)


def _abort(session_id: str, opencode_session: str | None) -> _Call[list[str]]:
    params = {"opencode_session": opencode_session} if opencode_session else {}
    return _Call(
        "POST",
        f"{API}/session/{session_id}/abort",
        lambda r: AbortResponse.model_validate(r.json()).aborted,
        params,
    )


def _reply(session_id: str, accepted: PromptAccepted) -> _Call[Reply]:
    params = {"opencode_session": accepted.opencode_session, "message": accepted.message}
    return _Call(
        "GET", f"{API}/session/{session_id}/reply", lambda r: Reply.model_validate(r.json()), params
    )


def _changes(session_id: str) -> _Call[Changes]:
    return _Call(
        "GET", f"{API}/session/{session_id}/changes", lambda r: Changes.model_validate(r.json())
    )


def _event(sse: ServerSentEvent) -> AgentEvent | None:
    """OpenCode's event, from one server-sent event; None for one of another shape (the agent
    writes these: anything may come)."""
    try:
        data = json.loads(sse.data)
        return AgentEvent.model_validate(data) if isinstance(data, dict) else None
    except (ValueError, RecursionError):  # pydantic's ValidationError is a ValueError
        return None


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
        message, code = body["error"], body.get("code", "")
    except (ValueError, KeyError, TypeError):
        message, code = response.text or response.reason_phrase, ""
    raise error_for_code(code)(message)


def _base(url: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    url = (url or os.environ.get("CODESTATION_URL") or DEFAULT_URL).rstrip("/")
    token = token or os.environ.get("CODESTATION_TOKEN") or None
    # httpx masks the Authorization header in every repr, so the token never prints.
    return url, {"Authorization": f"Bearer {token}"} if token else {}


def _unavailable(url: str) -> Unavailable:
    return Unavailable(
        f"codestation does not answer at {url}; start it with `codestation serve` (or `make run`)."
    )


class Session(SessionInfo):
    """A session of a `Client`: what the service said of it when asked, and what to do with it.
    `with client.start(...) as session:` stops it on leaving the block."""

    _client: Client = PrivateAttr()

    @classmethod
    def of(cls, client: Client, info: SessionInfo) -> Session:
        session = cls.model_validate(info.model_dump())
        session._client = client
        return session

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client.get(self.id).status.live:
            self.stop()

    def refresh(self) -> Session:
        """The session as the service sees it now."""
        return self._client.get(self.id)

    @overload
    def prompt(self, text: str, wait: Literal[True] = True, **options: Any) -> Reply: ...
    @overload
    def prompt(self, text: str, wait: Literal[False], **options: Any) -> PromptAccepted: ...

    def prompt(self, text: str, wait: bool = True, **options: Any) -> Reply | PromptAccepted:
        """Send `text` to the agent; with `wait`, its reply once the turn ends. Options:
        `model` ("provider/model"), `agent`, `opencode_session` (continue that one)."""
        request = PromptRequest(text=text, wait=wait, **options)
        return self._client.call(_prompt(self.id, request))

    def events(self) -> Generator[AgentEvent, None, None]:
        """The agent's events as they happen, until the session stops."""
        return self._client.agent_events(self.id)

    def reply(self, accepted: PromptAccepted) -> Reply:
        """The reply so far to a prompt sent with `wait=False` (`finished` once it ended)."""
        return self._client.call(_reply(self.id, accepted))

    def changes(self) -> Changes:
        """What changed in the workspace since the session started."""
        return self._client.call(_changes(self.id))

    def logs(self, tail: int = 200) -> str:
        return self._client.call(_logs(self.id, tail))

    def abort(self, opencode_session: str | None = None) -> list[str]:
        """End the agent's turn under way; returns the OpenCode sessions aborted."""
        return self._client.call(_abort(self.id, opencode_session))

    def stop(self) -> Session:
        return Session.of(self._client, self._client.call(_stop(self.id)))


class Client:
    """A codestation service, at `url` (default `$CODESTATION_URL`, else 127.0.0.1:8585), with
    `token` (default `$CODESTATION_TOKEN`) sent as `Authorization: Bearer <token>`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, headers = _base(url, token)
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=headers
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, call: _Call[T]) -> T:
        """Send one request; its answer read, or the error it stands for raised."""
        timeout = httpx.Timeout(60.0, read=call.timeout)
        try:
            response = self._http.request(
                call.method, call.path, params=call.params, json=call.json, timeout=timeout
            )
        except httpx.ConnectError as exc:
            raise _unavailable(self.base_url) from exc
        _raise_for_error(response)
        return call.read(response)

    def health(self) -> dict[str, Any]:
        return self.call(_health())

    def me(self) -> Me:
        return self.call(_me())

    def start(
        self,
        workspace: str,
        environment: str = "default",
        *,
        wait: bool = True,
        timeout: float = 600.0,
        idle_timeout: float | None = None,
        max_age: float | None = None,
    ) -> Session:
        """Start a session on `workspace`; with `wait`, return it once it runs (or failed)."""
        info = self.call(_start(workspace, environment, idle_timeout, max_age))
        return self.wait(info.id, timeout=timeout) if wait else Session.of(self, info)

    def get(self, session_id: str) -> Session:
        return Session.of(self, self.call(_get(session_id)))

    session = get

    def sessions(self) -> list[Session]:
        return [Session.of(self, s) for s in self.call(_list())]

    def wait(
        self,
        session_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.25,
        on_update: Callable[[SessionInfo], None] | None = None,
    ) -> Session:
        """Poll until the session is no longer `starting`; return it (running or failed)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(session_id)
            if on_update is not None:
                on_update(info)
            if info.status is not Status.STARTING:
                return info
            if time.monotonic() > deadline:
                raise StartTimeout(f"session {session_id} was still starting after {timeout:g} s")
            time.sleep(interval)

    def logs(self, session_id: str, tail: int = 200) -> str:
        return self.call(_logs(session_id, tail))

    def follow_logs(self, session_id: str, tail: int = 200) -> Iterator[str]:
        params: dict[str, Any] = {"tail": tail, "follow": True}
        path = f"{API}/session/{session_id}/logs"
        with self._http.stream("GET", path, params=params, timeout=None) as response:
            if response.is_error:
                response.read()
                _raise_for_error(response)
            yield from response.iter_text()

    def agent_events(self, session_id: str) -> Generator[AgentEvent, None, None]:
        path = f"{API}/session/{session_id}/events"
        try:
            with connect_sse(self._http, "GET", path, timeout=httpx.Timeout(60.0, read=None)) as s:
                if s.response.is_error:
                    s.response.read()
                    _raise_for_error(s.response)
                for sse in s.iter_sse():
                    if (event := _event(sse)) is not None:
                        yield event
        except httpx.ConnectError as exc:
            raise _unavailable(self.base_url) from exc

    def stop(self, session_id: str) -> Session:
        return Session.of(self, self.call(_stop(session_id)))

    def delete(self, session_id: str) -> None:
        self.call(_delete(session_id))

    def stop_all(self, *, everyone: bool = False) -> list[SessionInfo]:
        """Stop your live sessions; an admin may stop `everyone`'s."""
        return self.call(_stop_all(everyone))


class AsyncSession(SessionInfo):
    """A session of an `AsyncClient`: `async with await client.start(...) as session:`."""

    _client: AsyncClient = PrivateAttr()

    @classmethod
    def of(cls, client: AsyncClient, info: SessionInfo) -> AsyncSession:
        session = cls.model_validate(info.model_dump())
        session._client = client
        return session

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if (await self._client.get(self.id)).status.live:
            await self.stop()

    async def refresh(self) -> AsyncSession:
        return await self._client.get(self.id)

    @overload
    async def prompt(self, text: str, wait: Literal[True] = True, **options: Any) -> Reply: ...
    @overload
    async def prompt(self, text: str, wait: Literal[False], **options: Any) -> PromptAccepted: ...

    async def prompt(self, text: str, wait: bool = True, **options: Any) -> Reply | PromptAccepted:
        request = PromptRequest(text=text, wait=wait, **options)
        return await self._client.call(_prompt(self.id, request))

    def events(self) -> AsyncIterator[AgentEvent]:
        return self._client.agent_events(self.id)

    async def reply(self, accepted: PromptAccepted) -> Reply:
        return await self._client.call(_reply(self.id, accepted))

    async def changes(self) -> Changes:
        return await self._client.call(_changes(self.id))

    async def logs(self, tail: int = 200) -> str:
        return await self._client.call(_logs(self.id, tail))

    async def abort(self, opencode_session: str | None = None) -> list[str]:
        return await self._client.call(_abort(self.id, opencode_session))

    async def stop(self) -> AsyncSession:
        return AsyncSession.of(self._client, await self._client.call(_stop(self.id)))


class AsyncClient:
    """`Client`, for asyncio: the same methods, awaited."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url, headers = _base(url, token)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=headers
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, call: _Call[T]) -> T:
        timeout = httpx.Timeout(60.0, read=call.timeout)
        try:
            response = await self._http.request(
                call.method, call.path, params=call.params, json=call.json, timeout=timeout
            )
        except httpx.ConnectError as exc:
            raise _unavailable(self.base_url) from exc
        _raise_for_error(response)
        return call.read(response)

    async def health(self) -> dict[str, Any]:
        return await self.call(_health())

    async def me(self) -> Me:
        return await self.call(_me())

    async def start(
        self,
        workspace: str,
        environment: str = "default",
        *,
        wait: bool = True,
        timeout: float = 600.0,  # noqa: ASYNC109 (the same as Client.start's)
        idle_timeout: float | None = None,
        max_age: float | None = None,
    ) -> AsyncSession:
        info = await self.call(_start(workspace, environment, idle_timeout, max_age))
        return await self.wait(info.id, timeout=timeout) if wait else AsyncSession.of(self, info)

    async def get(self, session_id: str) -> AsyncSession:
        return AsyncSession.of(self, await self.call(_get(session_id)))

    async def sessions(self) -> list[AsyncSession]:
        return [AsyncSession.of(self, s) for s in await self.call(_list())]

    async def wait(
        self,
        session_id: str,
        *,
        timeout: float = 600.0,  # noqa: ASYNC109 (the same as Client.wait's)
        interval: float = 0.25,
    ) -> AsyncSession:
        deadline = time.monotonic() + timeout
        while (info := await self.get(session_id)).status is Status.STARTING:
            if time.monotonic() > deadline:
                raise StartTimeout(f"session {session_id} was still starting after {timeout:g} s")
            await asyncio.sleep(interval)
        return info

    async def logs(self, session_id: str, tail: int = 200) -> str:
        return await self.call(_logs(session_id, tail))

    async def agent_events(self, session_id: str) -> AsyncIterator[AgentEvent]:
        path = f"{API}/session/{session_id}/events"
        timeout = httpx.Timeout(60.0, read=None)
        try:
            async with aconnect_sse(self._http, "GET", path, timeout=timeout) as s:
                if s.response.is_error:
                    await s.response.aread()
                    _raise_for_error(s.response)
                async for sse in s.aiter_sse():
                    if (event := _event(sse)) is not None:
                        yield event
        except httpx.ConnectError as exc:
            raise _unavailable(self.base_url) from exc

    async def stop(self, session_id: str) -> AsyncSession:
        return AsyncSession.of(self, await self.call(_stop(session_id)))

    async def delete(self, session_id: str) -> None:
        await self.call(_delete(session_id))

    async def stop_all(self, *, everyone: bool = False) -> list[SessionInfo]:
        return await self.call(_stop_all(everyone))
