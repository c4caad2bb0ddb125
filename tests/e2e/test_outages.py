"""An engine that stops answering, and records or answers that make no sense: the service
goes on, answers 503 rather than 500, and finishes what it could not do once it can."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, ServiceFactory

ENGINE = "/var/run/docker.sock"


class EngineSwitch:
    """The Docker engine behind a socket of the test's own, which it can take down and bring
    back: the real engine keeps running for every other test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """The engine is gone: the socket refuses, and every open connection breaks."""
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        self.path.unlink()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            engine.connect(ENGINE)
            with self._lock:
                self._open |= {client, engine}
            for a, b in ((client, engine), (engine, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineSwitch]:
    switch = EngineSwitch(tmp_path / "engine.sock")
    switch.up()
    yield switch
    if switch._listener is None:
        switch.up()  # let the fixture's clean-up reach the engine


def status_of(service: Service, session_id: str) -> SessionInfo:
    # From the list: reading one session is activity on it, and would keep it from culling.
    return next(s for s in service.client.sessions() if s.id == session_id)


def wait_for(service: Service, session_id: str, done: set[Status], seconds: float) -> SessionInfo:
    deadline = time.monotonic() + seconds
    while (session := status_of(service, session_id)).status not in done:
        assert time.monotonic() < deadline, f"still {session.status} after {seconds} s"
        time.sleep(0.2)
    return session


@pytest.mark.runtimes("docker")
def test_a_stop_while_the_engine_is_down_finishes_once_it_is_back(
    start_service: ServiceFactory, engine: EngineSwitch, workspace: Path
) -> None:
    service = start_service(env={"DOCKER_HOST": engine.docker_host})
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    engine.down()
    with service.http() as http:
        stop = http.post(f"/api/v1/code/session/{session.id}/stop")
        assert stop.status_code == 503, stop.text
        assert stop.json()["code"] == "runtime_unavailable"
        assert "stopped as soon as the engine answers" in stop.json()["error"]
        logs = http.get(f"/api/v1/code/session/{session.id}/logs")
        assert logs.status_code == 503, logs.text
        assert status_of(service, session.id).status is Status.STOPPING
        everyone = http.post("/api/v1/code/stop", params={"all": "true"})
        assert everyone.status_code == 200, everyone.text
        assert [s["status"] for s in everyone.json()["stopped"]] == ["stopping"]
    engine.up()
    stopped = wait_for(service, session.id, {Status.STOPPED}, 30)
    assert stopped.reason == "requested"
    assert service.containers() == []


@pytest.mark.runtimes("docker")
def test_a_start_meets_an_engine_that_is_down(
    start_service: ServiceFactory, engine: EngineSwitch, workspace: Path
) -> None:
    service = start_service(env={"DOCKER_HOST": engine.docker_host})
    engine.down()
    with service.http() as http:
        refused = http.post("/api/v1/code/start", json={"workspace": str(workspace)})
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "runtime_unavailable"
        assert http.get("/api/v1/code/sessions").json()["sessions"] == []
    engine.up()
    # Down in the middle of a start: it ends running (the container was up in time) or
    # failed with the reason, and never stays starting; nothing is left that no record knows.
    started = service.client.start(str(workspace), wait=False)
    engine.down()
    ended = wait_for(service, started.id, {Status.RUNNING, Status.FAILED}, 90)
    engine.up()
    if ended.status is Status.FAILED:
        assert "Docker engine" in (ended.error or ""), ended.error
        deadline = time.monotonic() + 30
        while service.containers():
            assert time.monotonic() < deadline, "the failed start's container was not removed"
            time.sleep(0.5)
    again = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert again.status is Status.RUNNING, again.error


def add_bad_records(db: Path, like: str) -> None:
    """Two records a hand edit or another version might leave: one this version cannot read,
    and one running in a runtime it does not know, idle for long enough to be culled."""
    columns = [row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(sessions)")]
    changed = {
        "id": "?", "status": "'running'", "runtime": "?", "runtime_state": "?",
        "idle_timeout": "1", "last_activity": "'2000-01-01T00:00:00+00:00'",
    }  # fmt: skip
    select = ", ".join(changed.get(c, c) for c in columns)
    with sqlite3.connect(db) as conn:
        for session_id, runtime, state in (
            ("cs-unreadable", "bwrap", "{not json"),
            ("cs-unknown-runtime", "firecracker", "{}"),
        ):
            conn.execute(
                f"INSERT INTO sessions ({', '.join(columns)}) SELECT {select} "
                "FROM sessions WHERE id = ?",
                (session_id, runtime, state, like),
            )


def test_reconcile_and_cull_survive_bad_records(
    start_service: ServiceFactory, workspace: Path, tmp_path: Path
) -> None:
    service = start_service(cull_interval="1")
    kept = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert kept.status is Status.RUNNING, kept.error
    service.stop_process()
    add_bad_records(service.data_dir / "codestation.db", kept.id)
    service.restart()
    # Reconcile got past them: the good session is re-adopted and still answers.
    assert status_of(service, kept.id).status is Status.RUNNING
    auth = (kept.auth.username, kept.auth.password)
    assert httpx.get(f"{kept.url}/global/health", auth=auth, timeout=10).is_success
    # Cull gets past them too: an idle session after them in the store is stopped.
    other = tmp_path / "other"
    other.mkdir()
    idle = service.client.wait(service.client.start(str(other), idle_timeout=2, wait=False).id)
    assert idle.status is Status.RUNNING, idle.error
    culled = wait_for(service, idle.id, {Status.STOPPED}, 30)
    assert culled.reason == "idle"
    assert "cs-unreadable in the store cannot be read" in service.log.read_text()
    # Its sandbox is beyond this version, but its record is culled like any other.
    unknown = wait_for(service, "cs-unknown-runtime", {Status.STOPPED}, 10)
    assert unknown.reason == "idle"
    with sqlite3.connect(service.data_dir / "codestation.db") as conn:
        conn.execute("DELETE FROM sessions WHERE id IN ('cs-unreadable', 'cs-unknown-runtime')")
