"""Choosing where sessions run: `auto`, a fixed runtime, and per environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from codestation import Status
from tests.e2e.conftest import ServiceFactory

NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def test_auto_takes_docker_when_an_engine_answers(
    launch_service: ServiceFactory, workspace: Path
) -> None:
    service = launch_service(runtime="auto")
    assert service.client.health()["runtime"] == "docker"


def test_auto_falls_back_to_bwrap_without_docker(
    launch_service: ServiceFactory, workspace: Path
) -> None:
    service = launch_service(runtime="auto", env=NO_DOCKER)
    assert service.client.health()["runtime"] == "bwrap"
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    assert session.runtime == "bwrap"
    assert "sessions run in bwrap (chosen automatically)" in service.log.read_text()
    service.client.stop(session.id)


def test_an_environment_can_name_its_runtime(
    launch_service: ServiceFactory, workspace: Path
) -> None:
    environments = {"sandboxed": {"runtime": "bwrap"}}
    service = launch_service(runtime="docker", environments=json.dumps(environments))
    default = service.client.start(str(workspace), wait=False)
    sandboxed = service.client.start(str(workspace), environment="sandboxed", wait=False)
    assert (default.runtime, sandboxed.runtime) == ("docker", "bwrap")
    for session_id in (default.id, sandboxed.id):
        session = service.client.wait(session_id, timeout=120)
        assert session.status is Status.RUNNING, session.error
    service.client.stop_all()


def test_an_environment_whose_runtime_is_missing_answers_503(
    launch_service: ServiceFactory, workspace: Path
) -> None:
    environments = {"containers": {"runtime": "docker"}}
    service = launch_service(runtime="bwrap", environments=json.dumps(environments), env=NO_DOCKER)
    with service.http() as http:
        answer = http.post(
            "/api/v1/code/start", json={"workspace": str(workspace), "environment": "containers"}
        )
        assert answer.status_code == 503
        assert answer.json()["code"] == "runtime_unavailable"
        assert "Docker engine" in answer.json()["error"]
        assert http.get("/api/v1/code/sessions").json() == {"sessions": []}


def test_with_no_runtime_the_service_says_how_to_get_one(tmp_path: Path) -> None:
    env = {
        **os.environ,
        **NO_DOCKER,
        "PATH": str(tmp_path),  # no bwrap on it
        "CODESTATION_DATA_DIR": str(tmp_path / "data"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "codestation.cli", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no runtime can run sessions here" in result.stderr
    assert "bubblewrap" in result.stderr
    assert "Docker" in result.stderr
