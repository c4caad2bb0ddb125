"""Admission control: a session that does not fit on this host is refused (503 capacity) before
anything is made, and the service says how full it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from codestation import AtCapacity, Status
from tests.e2e.conftest import ServiceFactory


def test_a_start_past_the_memory_budget_is_refused(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(memory_budget="5g")  # one session at the default 4g, not two
    first = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert first.status is Status.RUNNING, first.error
    capacity = service.client.health()["capacity"]
    assert capacity == {
        "sessions": 1, "max_sessions": 100, "memory_reserved": 4 << 30, "memory_budget": 5 << 30,
        "pool_ready": {},
    }  # fmt: skip
    with service.http() as http:
        refused = http.post("/api/v1/code/start", json={"workspace": str(workspace)})
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "capacity"
    assert "4.0 GiB of its 5.0 GiB memory budget" in refused.json()["error"]
    assert len(service.client.sessions()) == 1  # nothing half-made
    service.client.stop(first.id)
    second = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert second.status is Status.RUNNING, second.error
    service.client.stop(second.id)


def test_a_start_past_max_live_sessions_is_refused(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(max_live_sessions="1")
    first = service.client.start(str(workspace), wait=False)
    with pytest.raises(AtCapacity, match="1 sessions are live"):
        service.client.start(str(workspace), wait=False)
    service.client.stop(first.id)
    assert service.client.health()["capacity"]["sessions"] == 0


@pytest.mark.runtimes("bwrap")
def test_an_environment_bigger_than_the_budget_is_a_client_error(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(memory_budget="1g")
    with service.http() as http:
        refused = http.post("/api/v1/code/start", json={"workspace": str(workspace)})
    assert refused.status_code == 400, refused.text
    assert "more than the whole memory budget" in refused.json()["error"]
