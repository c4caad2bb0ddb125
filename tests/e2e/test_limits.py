"""Resource limits: applied by the runtime that can, shown with the session, and enforced."""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from codestation import Status
from tests.e2e.conftest import ServiceFactory


@pytest.mark.runtimes("docker")
def test_docker_applies_the_environment_limits(
    start_service: ServiceFactory, workspace: Path
) -> None:
    environments = {"small": {"limits": {"memory": "1g", "cpus": 0.5, "pids": 200}}}
    service = start_service(environments=json.dumps(environments))
    default = service.client.wait(service.client.start(str(workspace)).id)
    small = service.client.wait(service.client.start(str(workspace), "small").id)
    assert default.limits == {"memory": "4g", "cpus": 2.0, "pids": 1024}
    assert small.limits == {"memory": "1g", "cpus": 0.5, "pids": 200}
    engine = docker.from_env()
    host = engine.containers.get(f"codestation-{small.id}").attrs["HostConfig"]
    assert host["Memory"] == 1024**3
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 200
    engine.close()
    service.client.stop_all()


@pytest.mark.runtimes("docker")
def test_running_out_of_memory_fails_the_session_and_says_so(
    start_service: ServiceFactory, workspace: Path
) -> None:
    # OpenCode needs a few hundred MB; 64 MB is not enough to start.
    environments = {"tiny": {"limits": {"memory": "64m"}}}
    service = start_service(environments=json.dumps(environments))
    session = service.client.wait(service.client.start(str(workspace), "tiny").id)
    assert session.status is Status.FAILED
    assert session.error is not None
    assert "out of memory" in session.error
    assert service.leftovers() == []


@pytest.mark.runtimes("bwrap")
def test_bwrap_says_it_enforces_no_limits(start_service: ServiceFactory, workspace: Path) -> None:
    service = start_service()
    session = service.client.wait(service.client.start(str(workspace)).id)
    assert session.status is Status.RUNNING
    assert session.limits == {}
    service.client.stop(session.id)
