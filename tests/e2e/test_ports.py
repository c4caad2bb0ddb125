"""Ports: distinct under concurrency, foreign holders skipped, an exhausted range says so."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from codestation import Status
from codestation.ports import port_is_free
from tests.e2e.conftest import ServiceFactory


def test_a_port_another_process_holds_is_skipped(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(size=3)
    first = service.ports[0]
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", first))
        foreign.listen()
        session = service.client.wait(
            service.client.start(str(workspace), wait=False).id, timeout=120
        )
        assert session.status is Status.RUNNING, session.error
        assert session.port == first + 1
        service.client.stop(session.id)


def test_an_exhausted_range_answers_503(start_service: ServiceFactory, tmp_path: Path) -> None:
    service = start_service(size=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = service.client.start(str(tmp_path / "a"), wait=False)
    with service.http() as http:
        answer = http.post("/api/v1/code/start", json={"workspace": str(tmp_path / "b")})
        assert answer.status_code == 503
        assert answer.json()["code"] == "no_free_port"
        assert "port" in answer.json()["error"]
        assert len(http.get("/api/v1/code/sessions").json()["sessions"]) == 1
    # A stopped session gives its port back.
    service.client.stop(first.id)
    second = service.client.wait(
        service.client.start(str(tmp_path / "b"), wait=False).id, timeout=120
    )
    assert second.port == first.port
    assert second.status is Status.RUNNING, second.error
    service.client.stop(second.id)


@pytest.mark.serial  # twenty agents at once load the machine for every other test
def test_twenty_concurrent_starts(start_service: ServiceFactory, tmp_path: Path) -> None:
    service = start_service(size=25, start_timeout="180", max_sessions_per_user="20")
    workspaces = []
    for i in range(20):
        (tmp_path / f"w{i}").mkdir()
        workspaces.append(str(tmp_path / f"w{i}"))

    def start(ws: str) -> str:
        with service.client_for(service.token) as client:
            return client.start(ws, wait=False).id

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(start, workspaces))
    assert len(set(ids)) == 20
    with ThreadPoolExecutor(20) as pool:
        ended = list(pool.map(lambda i: service.client.wait(i, timeout=300), ids))
    ports = [s.port for s in ended]
    assert len(set(ports)) == 20
    assert all(service.ports[0] <= p <= service.ports[1] for p in ports)
    for session in ended:
        # Each ends running, or cleanly failed with a reason and its port given back.
        assert session.status in (Status.RUNNING, Status.FAILED)
        if session.status is Status.FAILED:
            assert session.error
            assert port_is_free("127.0.0.1", session.port)
    running = [s for s in ended if s.status is Status.RUNNING]
    assert len(running) >= 18, [s.error for s in ended if s.error]
    stopped = service.client.stop_all()
    assert {s.id for s in stopped} == {s.id for s in running}
    assert service.leftovers() == []
