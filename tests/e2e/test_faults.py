"""Fault injection: the service killed or stopped, the agent's sandbox killed, the engine
restarted. Each test asserts what a user sees: statuses, reasons, reachable URLs, nothing left
behind (no orphan sandbox, no leaked lease)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import httpx
import pytest

from codestation import SessionInfo, Settings, Status
from codestation.image import image_tag
from codestation.ports import port_is_free
from codestation.runtimes.docker import LABEL_DATA_DIR, LABEL_MANAGED, LABEL_SESSION
from tests.e2e.conftest import Service, ServiceFactory

pytestmark = pytest.mark.serial  # it stops and restarts the Docker engine every other test uses


def healthy(session: SessionInfo) -> bool:
    auth = (session.auth.username, session.auth.password)
    try:
        return httpx.get(f"{session.url}/global/health", auth=auth, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def settle(service: Service, seconds: float = 120) -> list[SessionInfo]:
    """The sessions once none is starting or stopping any more."""
    deadline = time.monotonic() + seconds
    while True:
        sessions: list[SessionInfo] = list(service.client.sessions())
        busy = [s for s in sessions if s.status in (Status.STARTING, Status.STOPPING)]
        if not busy or time.monotonic() > deadline:
            assert not busy, f"stuck: {[(s.id, s.status, s.step) for s in busy]}"
            return sessions
        time.sleep(0.2)


def assert_store_consistent(service: Service) -> None:
    """Every live session holds exactly its lease; nothing else holds one; nothing is torn."""
    db = sqlite3.connect(service.data_dir / "codestation.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        live = {
            (sid, port)
            for sid, port in db.execute(
                "SELECT id, port FROM sessions WHERE status IN ('starting','running','stopping')"
            )
        }
        leases = {
            (sid, port) for port, sid in db.execute("SELECT port, session_id FROM port_leases")
        }
    finally:
        db.close()
    assert leases == live


def test_sigkill_while_running_keeps_the_session(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service()
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    service.restart(signal.SIGKILL)
    again = service.client.session(session.id)
    assert again.status is Status.RUNNING
    assert (again.url, again.port, again.auth) == (session.url, session.port, session.auth)
    assert healthy(again)
    assert_store_consistent(service)


def test_sigkill_mid_start_finishes_or_fails_cleanly(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = start_service()
    ids = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        ids.append(service.client.start(str(tmp_path / name), wait=False).id)
    time.sleep(0.3)  # some launched, some maybe not yet
    service.restart(signal.SIGKILL)
    sessions = {s.id: s for s in settle(service)}
    for session_id in ids:
        session = sessions[session_id]
        assert session.status in (Status.RUNNING, Status.FAILED), session
        if session.status is Status.RUNNING:
            assert healthy(session)
        else:
            assert session.error
    assert_store_consistent(service)


def test_stop_on_shutdown_stops_every_session(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(stop_on_shutdown="true")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    service.stop_process(signal.SIGTERM)
    assert service.leftovers() == []
    assert port_is_free("127.0.0.1", session.port)
    service.restart()
    stopped = service.client.session(session.id)
    assert stopped.status is Status.STOPPED
    assert stopped.reason == "shutdown"


def test_concurrent_stops_are_safe(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: service.client.stop(session.id), range(6)))
    assert {r.status for r in results} == {Status.STOPPED}
    assert {r.stopped_at for r in results} == {results[0].stopped_at}
    assert service.leftovers() == []


def test_kill_9_in_a_loop_leaves_the_store_whole(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = start_service(size=12)
    rng = random.Random(4)
    for round_ in range(5):
        ws = tmp_path / f"round-{round_}"
        ws.mkdir()
        for _ in range(2):
            service.client.start(str(ws), wait=False)
        running = [s for s in service.client.sessions() if s.status is Status.RUNNING]
        if running:
            with ThreadPoolExecutor(1) as pool:
                pool.submit(service.client.stop, running[0].id)
                time.sleep(rng.uniform(0, 0.5))
        time.sleep(rng.uniform(0, 2))
        service.restart(signal.SIGKILL)
        assert_store_consistent(service)
    sessions = settle(service)
    assert_store_consistent(service)
    for session in sessions:
        if session.status is Status.RUNNING:
            assert healthy(session)
    service.client.stop_all()
    assert service.leftovers() == []


@pytest.mark.runtimes("docker")
def test_docker_kill_is_noticed_within_two_seconds(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    engine = docker.from_env()
    engine.containers.get(f"codestation-{session.id}").kill()
    engine.close()
    killed_at = time.monotonic()
    while service.client.session(session.id).status is Status.RUNNING:
        assert time.monotonic() - killed_at < 5, "not noticed"
        time.sleep(0.05)
    failed = service.client.session(session.id)
    assert time.monotonic() - killed_at < 2.5
    assert failed.status is Status.FAILED
    assert failed.error is not None
    assert "status 137" in failed.error
    assert port_is_free("127.0.0.1", session.port)
    assert service.leftovers() == []


@pytest.mark.runtimes("docker")
def test_the_engine_s_events_report_a_death_without_the_poll(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(watch_interval="3600")  # the backstop poll never comes
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    engine = docker.from_env()
    engine.containers.get(f"codestation-{session.id}").kill()
    engine.close()
    deadline = time.monotonic() + 20
    while service.client.session(session.id).status is Status.RUNNING:
        assert time.monotonic() < deadline, "the die event was not acted on"
        time.sleep(0.1)
    assert service.client.session(session.id).status is Status.FAILED


@pytest.mark.runtimes("docker")
def test_orphan_containers_are_removed_at_start_up(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service()
    engine = docker.from_env()
    tag = image_tag(Settings())  # any image with `sleep` will do: ours is there
    engine.containers.run(
        tag, ["sleep", "600"], detach=True, name="codestation-cs-orphan",
        labels={LABEL_MANAGED: "true", LABEL_SESSION: "cs-orphan",
                LABEL_DATA_DIR: str(service.data_dir)},
    )  # fmt: skip
    service.restart()
    assert service.containers() == []
    assert "removed 1 orphan" in service.log.read_text().replace("\n", " ")
    engine.close()


@pytest.mark.runtimes("docker")
def test_a_docker_engine_restart_leaves_nothing_stuck(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING
    restart_dockerd()
    failed = settle_failed(service, session.id)
    assert failed.status is Status.FAILED, failed
    assert failed.error
    assert port_is_free("127.0.0.1", session.port)
    # A session the engine's going down failed is removed once the engine answers again.
    deadline = time.monotonic() + 30
    while service.leftovers():
        assert time.monotonic() < deadline, service.leftovers()
        time.sleep(0.5)
    # And the engine serves new sessions again.
    again = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert again.status is Status.RUNNING, again.error
    assert healthy(again)
    service.client.stop(again.id)


def settle_failed(service: Service, session_id: str) -> SessionInfo:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        session = service.client.sessions()
        found = next(s for s in session if s.id == session_id)
        if found.status is not Status.RUNNING:
            return found
        time.sleep(0.2)
    return found


def restart_dockerd() -> None:
    """Stop the engine (its containers stop with it) and start it again, as CI started it.
    The host's engine only, by its pid file: a test cluster's node runs a dockerd of its own."""
    pid = int(Path("/var/run/docker.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid):
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)
    with Path("/var/log/dockerd.log").open("ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "dockerd did not come back"
        time.sleep(0.3)


def _alive(pid: int) -> bool:
    """Whether `pid` runs: not gone, nor a zombie its parent (this test?) has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
