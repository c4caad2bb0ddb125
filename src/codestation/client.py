"""`codestation.Client`: the Python face of the HTTP API (the CLI is built on it)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import httpx

from codestation.errors import CodestationError, StartTimeout, Unavailable, error_for_code
from codestation.schemas import Me, SessionInfo, SessionList, StartRequest, StartResponse
from codestation.sessions import Status

DEFAULT_URL = "http://127.0.0.1:8585"


class Client:
    """A codestation service. Errors come back as the classes in `codestation.errors`.

    `token` is sent as `Authorization: Bearer <token>`; it defaults to `$CODESTATION_TOKEN`.

    >>> with Client("http://127.0.0.1:8585", token="cst_...") as cs:
    ...     session = cs.wait(cs.start("/home/me/project").id)
    ...     print(session.url, session.auth.password)
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        token = token or os.environ.get("CODESTATION_TOKEN") or None
        # httpx masks the Authorization header in every repr, so the token never prints.
        headers = {"Authorization": f"Bearer {token}"} if token else {}
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

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise Unavailable(
                f"codestation does not answer at {self.base_url}; start it with "
                "`codestation serve` (or `make run`)."
            ) from exc
        _raise_for_error(response)
        return response

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/healthz").json()
        return result

    def start(
        self,
        workspace: str,
        environment: str = "default",
        *,
        idle_timeout: float | None = None,
        max_age: float | None = None,
    ) -> StartResponse:
        body = StartRequest(
            workspace=workspace,
            environment=environment,
            idle_timeout=idle_timeout,
            max_age=max_age,
        ).model_dump(exclude_none=True)
        return StartResponse.model_validate(
            self._request("POST", "/api/v1/code/start", json=body).json()
        )

    def session(self, session_id: str) -> SessionInfo:
        return SessionInfo.model_validate(
            self._request("GET", f"/api/v1/code/session/{session_id}").json()
        )

    def sessions(self) -> list[SessionInfo]:
        return SessionList.model_validate(
            self._request("GET", "/api/v1/code/sessions").json()
        ).sessions

    def wait(
        self,
        session_id: str,
        *,
        timeout: float = 600.0,
        interval: float = 0.25,
        on_update: Callable[[SessionInfo], None] | None = None,
    ) -> SessionInfo:
        """Poll until the session is no longer `starting`; return it (running or failed)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.session(session_id)
            if on_update is not None:
                on_update(info)
            if info.status is not Status.STARTING:
                return info
            if time.monotonic() > deadline:
                raise StartTimeout(f"session {session_id} was still starting after {timeout:g} s")
            time.sleep(interval)

    def logs(self, session_id: str, tail: int = 200) -> str:
        return self._request(
            "GET", f"/api/v1/code/session/{session_id}/logs", params={"tail": tail}
        ).text

    def follow_logs(self, session_id: str, tail: int = 200) -> Iterator[str]:
        params: dict[str, Any] = {"tail": tail, "follow": True}
        path = f"/api/v1/code/session/{session_id}/logs"
        with self._http.stream("GET", path, params=params, timeout=None) as response:
            if response.is_error:
                response.read()
                _raise_for_error(response)
            yield from response.iter_text()

    def stop(self, session_id: str) -> SessionInfo:
        return SessionInfo.model_validate(
            self._request("POST", f"/api/v1/code/session/{session_id}/stop").json()
        )

    def delete(self, session_id: str) -> None:
        self._request("DELETE", f"/api/v1/code/session/{session_id}")

    def stop_all(self, *, everyone: bool = False) -> list[SessionInfo]:
        """Stop your live sessions; an admin may stop `everyone`'s."""
        params = {"all": "true"} if everyone else {}
        body = self._request("POST", "/api/v1/code/stop", params=params).json()
        return [SessionInfo.model_validate(s) for s in body["stopped"]]

    def me(self) -> Me:
        return Me.model_validate(self._request("GET", "/api/v1/code/me").json())


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
        message, code = str(body["error"]), str(body["code"])
    except (ValueError, KeyError, TypeError):
        message, code = response.text or response.reason_phrase, "http_error"
    error: CodestationError = error_for_code(code)(message)
    error.status_code, error.code = response.status_code, code
    raise error
