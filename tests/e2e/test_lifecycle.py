"""A session's whole life, as a user sees it, against the real engine and OpenCode."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from codestation import Status
from codestation.ports import port_is_free
from tests.e2e.conftest import Service, ServiceFactory, agent_pid, run_in_session, snapshot


def test_start_run_reach_and_stop(service: Service, workspace: Path, runtime: str) -> None:
    before = snapshot(workspace)
    with service.http() as http:
        answer = http.post(
            "/api/v1/code/start", json={"workspace": str(workspace), "environment": "default"}
        )
    assert answer.status_code == 202, answer.text
    started = answer.json()
    assert started["status"] == "starting"
    session_id = started["session_id"]
    assert started["id"] == session_id

    session = service.client.wait(session_id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    # How it started, step by step: a cold start, each phase timed.
    assert session.started_from == "cold"
    assert set(session.phases) == {"admission", "prepare", "sandbox", "boot", "snapshot"}
    assert all(0 <= took < 120 for took in session.phases.values()), session.phases
    assert session.phases["boot"] > session.phases["admission"]
    assert session.runtime == runtime
    assert service.ports[0] <= session.port <= service.ports[1]
    assert session.url == f"http://127.0.0.1:{session.port}"
    auth = (session.auth.username, session.auth.password)

    # OpenCode itself answers through the published port, behind the session's password.
    health = httpx.get(f"{session.url}/global/health", auth=auth, timeout=10)
    assert health.status_code == 200
    assert health.json()["healthy"] is True
    assert httpx.get(f"{session.url}/global/health", timeout=10).status_code == 401
    assert httpx.get(f"{session.url}/global/health", auth=("opencode", "wrong"), timeout=10)\
        .status_code == 401  # fmt: skip

    # A file made on the host after the start is seen by OpenCode in /workspace.
    (workspace / "made-on-host.txt").write_text("hello from the host\n")
    files = httpx.get(f"{session.url}/file", params={"path": "."}, auth=auth, timeout=10)
    assert files.status_code == 200
    names = {f["name"] for f in files.json()}
    assert {"README.md", "src", "made-on-host.txt"} <= names

    logs = service.client.logs(session_id)
    assert "opencode server listening" in logs

    stopped = service.client.stop(session_id)
    assert stopped.status is Status.STOPPED
    assert stopped.stopped_at is not None
    assert stopped.url is None

    assert service.leftovers() == []
    assert port_is_free("127.0.0.1", session.port)
    with service.http() as http:
        assert http.get(f"/api/v1/code/session/{session_id}/logs").status_code == 200
    # Nothing of the user's was deleted or changed; the file made after start is still there.
    after = snapshot(workspace)
    assert after.pop("made-on-host.txt")[1] == b"hello from the host\n"
    assert after == before


def test_stop_is_idempotent_and_delete_forgets(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    assert service.client.stop(session.id).status is Status.STOPPED
    assert service.client.stop(session.id).status is Status.STOPPED
    with service.http() as http:
        assert http.delete(f"/api/v1/code/session/{session.id}").status_code == 204
        gone = http.get(f"/api/v1/code/session/{session.id}")
    assert gone.status_code == 404
    assert gone.json()["code"] == "session_not_found"
    assert (workspace / "README.md").read_text() == "# a project\n"


def test_stop_during_start_leaves_nothing_behind(service: Service, workspace: Path) -> None:
    started = service.client.start(str(workspace), wait=False)
    stopped = service.client.stop(started.id)
    assert stopped.status is Status.STOPPED
    assert service.leftovers() == []
    assert port_is_free("127.0.0.1", started.port)


def test_the_agent_runs_as_the_workspace_owner(service: Service, workspace: Path) -> None:
    for path in [workspace, *workspace.rglob("*")]:
        os.chown(path, 4321, 4322)
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    assert run_in_session(session, "id -u; id -g") == (0, "4321\n4322\n")
    # A file the agent's shell writes belongs to the user, not to root.
    assert run_in_session(session, "echo hi > /workspace/written-by-agent")[0] == 0
    made = (workspace / "written-by-agent").stat()
    assert (made.st_uid, made.st_gid) == (4321, 4322)
    service.client.stop(session.id)


def test_stop_all_stops_every_session(service: Service, tmp_path: Path) -> None:
    ids = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        ids.append(service.client.start(str(tmp_path / name), wait=False).id)
    for session_id in ids:
        service.client.wait(session_id, timeout=120)
    stopped = service.client.stop_all()
    assert sorted(s.id for s in stopped) == sorted(ids)
    assert all(s.status is Status.STOPPED for s in stopped)
    assert service.leftovers() == []


def test_a_running_session_survives_a_service_restart(
    start_service: ServiceFactory, workspace: Path
) -> None:
    first = start_service()
    session = first.client.wait(first.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    # The same data directory and range: the next service finds the session and keeps it.
    first.restart()
    again = first.client.session(session.id)
    assert again.status is Status.RUNNING
    assert (again.url, again.auth.password) == (session.url, session.auth.password)
    auth = (again.auth.username, again.auth.password)
    assert httpx.get(f"{again.url}/global/health", auth=auth, timeout=10).status_code == 200


def test_a_session_that_died_while_the_service_was_down_is_marked_failed(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service()
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    service.stop_process()
    os.kill(agent_pid(session), signal.SIGKILL)
    deadline = time.monotonic() + 30  # let the sandbox notice its agent is gone and end
    while service.leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    service.restart()
    lost = service.client.session(session.id)
    assert lost.status is Status.FAILED
    assert lost.error is not None
    assert "lost while codestation was down" in lost.error
    assert port_is_free("127.0.0.1", session.port)
    assert service.leftovers() == []
