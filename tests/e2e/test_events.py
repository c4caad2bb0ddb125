"""`GET /api/v1/code/events`: a live stream of every session's changes, for the web UI."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Service


def listen(service: Service, into: queue.Queue[tuple[str, Any]], stop: threading.Event) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the service stopped under the stream
        read(service, into, stop)


def read(service: Service, into: queue.Queue[tuple[str, Any]], stop: threading.Event) -> None:
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=None), headers=service.auth_headers()) as http,
        http.stream("GET", f"{service.url}/api/v1/code/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                into.put((event, json.loads(line.removeprefix("data: "))))


def next_event(events: queue.Queue[tuple[str, Any]], kind: str, **match: Any) -> Any:
    while True:
        got, data = events.get(timeout=120)
        if got == kind and all(data.get(k) == v for k, v in match.items()):
            return data


def test_the_stream_shows_a_session_s_whole_life(service: Service, workspace: Path) -> None:
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=listen, args=(service, events, stop), daemon=True).start()
    assert next_event(events, "snapshot") == {"sessions": []}

    started = service.client.start(str(workspace), wait=False)
    assert next_event(events, "session", id=started.id, status="starting")["step"] == "queued"
    steps = []
    while (data := next_event(events, "session", id=started.id))["status"] == "starting":
        steps.append(data["step"])
    assert data["status"] == "running"
    assert data["url"]
    assert "waiting for OpenCode" in steps

    service.client.stop(started.id)
    assert next_event(events, "session", id=started.id, status="stopped")["reason"] == "requested"
    service.client.delete(started.id)
    assert next_event(events, "deleted") == {"id": started.id}
    stop.set()
