"""Long-lived streams (event streams, followed logs) are bounded per user and overall."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from codestation import Status
from tests.e2e.conftest import Service, ServiceFactory


@contextmanager
def opened(service: Service, path: str, token: str | None = None) -> Iterator[httpx.Response]:
    with (
        service.http(token) as http,
        http.stream("GET", path, params={"follow": "true"} if "logs" in path else None) as answer,
    ):
        chunks = answer.iter_raw()  # kept while the stream is held: dropping it hangs up
        if answer.status_code == 200:
            next(chunks)  # the stream has begun
        else:
            answer.read()
        yield answer
        del chunks


@pytest.mark.runtimes("bwrap")
def test_streams_are_bounded_per_user_and_overall(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(max_streams_per_user="2", max_streams="3")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    logs = f"/api/v1/code/session/{session.id}/logs"
    events = "/api/v1/code/events"
    bob = service.make_token("bob")
    with ExitStack() as held:
        first = held.enter_context(opened(service, events))
        assert first.status_code == 200
        assert held.enter_context(opened(service, logs)).status_code == 200
        for path in (events, logs):  # a third of the admin's, of either kind
            with opened(service, path) as third:
                assert third.status_code == 429, path
                assert third.json()["code"] == "too_many_streams"
                assert "max_streams_per_user" in third.json()["error"]
        # A terminal is a stream too.
        with pytest.raises(InvalidStatus):
            connect(
                f"ws://127.0.0.1:{service.port}/api/v1/code/session/{session.id}/terminal",
                origin=Origin(service.url),
                additional_headers=service.auth_headers(),
            )
        assert held.enter_context(opened(service, events, bob)).status_code == 200
        with opened(service, events, service.make_token("carol")) as fourth:
            assert fourth.status_code == 429
            assert "max_streams)" in fourth.json()["error"]
    # Closed streams give their places back.
    deadline = time.monotonic() + 5
    while True:
        with opened(service, events) as again:
            if again.status_code == 200:
                break
        assert time.monotonic() < deadline, "closed streams kept their places"
        time.sleep(0.2)
    service.client.stop(session.id)
