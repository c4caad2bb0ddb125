"""What survives what (docs/what-survives-what.md): the rows no other test proves exactly.

A service killed mid-start or leaving sandboxes no record knows, an engine that is down when the
service starts, an agent killed under a running service, a log followed past its size, and
what keeps a session from being culled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from websockets.sync.client import connect
from websockets.typing import Origin

from codestation import SessionInfo, Settings, Status
from codestation.image import image_tag
from codestation.ports import port_is_free
from codestation.runtimes.docker import LABEL_DATA_DIR, LABEL_MANAGED, LABEL_SESSION
from tests.e2e.conftest import Service, ServiceFactory, agent_pid, run_in_session
from tests.e2e.test_logs import SPEW, log_files
from tests.e2e.test_outages import EngineSwitch


def running(service: Service, workspace: Path, **options: Any) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), **options, wait=False).id)
    assert session.status is Status.RUNNING, session.error
    return session


def listed(service: Service, session_id: str) -> SessionInfo:
    # From the list: reading one session is activity on it, and would keep it from culling.
    return next(s for s in service.client.sessions() if s.id == session_id)


def settled(service: Service, session_id: str, seconds: float = 120) -> SessionInfo:
    """The session once it is neither starting nor stopping."""
    deadline = time.monotonic() + seconds
    while (session := listed(service, session_id)).status in (Status.STARTING, Status.STOPPING):
        assert time.monotonic() < deadline, f"still {session.status} after {seconds} s"
        time.sleep(0.2)
    return session


def ended(service: Service, session_id: str, seconds: float) -> SessionInfo:
    """The session once it is stopped or failed."""
    deadline = time.monotonic() + seconds
    while (session := listed(service, session_id)).status.live:
        assert time.monotonic() < deadline, f"still {session.status} after {seconds} s"
        time.sleep(0.2)
    return session


def healthy(session: SessionInfo) -> bool:
    auth = (session.auth.username, session.auth.password)
    try:
        return httpx.get(f"{session.url}/global/health", auth=auth, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_port_free(port: int, seconds: float = 15) -> None:
    # The engine's port proxy may take a moment to let go on a loaded machine.
    deadline = time.monotonic() + seconds
    while not port_is_free("127.0.0.1", port):
        assert time.monotonic() < deadline, f"port {port} still held"
        time.sleep(0.2)


@contextlib.contextmanager
def store(service: Service) -> Iterator[sqlite3.Connection]:
    """The service's store, opened as another program (an admin's sqlite3) would."""
    db = sqlite3.connect(service.data_dir / "codestation.db")
    try:
        with db:
            yield db
    finally:
        db.close()


# -- the service killed ---------------------------------------------------------------------


def test_a_sandbox_no_record_knows_is_removed_at_start_up(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service()
    session = running(service, workspace)
    service.stop_process(signal.SIGKILL)
    with store(service) as db:  # its sandbox runs on, and no record knows it
        db.execute("DELETE FROM port_leases WHERE session_id = ?", (session.id,))
        db.execute("DELETE FROM sessions WHERE id = ?", (session.id,))
    assert service.leftovers()
    if runtime == "bwrap":
        assert (service.data_dir / "run" / f"{session.id}.json").exists()
    service.restart()
    assert service.leftovers() == []
    assert list((service.data_dir / "run").glob(f"{session.id}.*")) == []
    assert "removed 1 orphan sandbox" in service.log.read_text().replace("\n", " ")
    wait_port_free(session.port)


def test_a_start_cut_short_by_a_kill_ends_running_or_failed(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service()
    started = service.client.start(str(workspace), wait=False)
    # Catch it launched but not yet answering, then kill the service there.
    deadline = time.monotonic() + 120
    while True:
        with store(service) as db:
            status, state = db.execute(
                "SELECT status, runtime_state FROM sessions WHERE id = ?", (started.id,)
            ).fetchone()
        if status != "starting" or json.loads(state):
            break
        assert time.monotonic() < deadline, "its sandbox was never launched"
        time.sleep(0.005)
    service.process.send_signal(signal.SIGSTOP)  # no more writes from here
    with store(service) as db:
        status = db.execute("SELECT status FROM sessions WHERE id = ?", (started.id,)).fetchone()
    assert status == ("starting",), "OpenCode answered before the service could be killed"
    service.stop_process(signal.SIGKILL)
    spare = next(p for p in range(service.ports[0], service.ports[1] + 1) if p != started.port)
    with store(service) as db:
        # Its sandbox exists, but say the launch never got as far as recording it.
        db.execute("UPDATE sessions SET runtime_state = '{}' WHERE id = ?", (started.id,))
        # And another start, killed before its sandbox was made: recorded, leased, nothing more.
        columns = [row[1] for row in db.execute("PRAGMA table_info(sessions)")]
        changed = {"id": "'cs-neverlaunched'", "port": str(spare), "runtime_state": "'{}'"}
        db.execute(
            f"INSERT INTO sessions ({', '.join(columns)}) SELECT "
            f"{', '.join(changed.get(c, c) for c in columns)} FROM sessions WHERE id = ?",
            (started.id,),
        )
        db.execute("INSERT INTO port_leases (port, session_id) VALUES (?, 'cs-neverlaunched')",
                   (spare,))  # fmt: skip
    service.restart()

    finished = settled(service, started.id)
    assert finished.status is Status.RUNNING, finished.error
    assert healthy(finished)
    never = settled(service, "cs-neverlaunched")
    assert never.status is Status.FAILED
    assert never.error is not None
    assert never.error.startswith("lost while codestation was down: "), never.error
    with store(service) as db:
        leases = db.execute("SELECT port, session_id FROM port_leases").fetchall()
    assert leases == [(started.port, started.id)]
    service.client.stop(started.id)


# -- the engine down ------------------------------------------------------------------------


@pytest.fixture
def engine_switch(tmp_path: Path) -> Iterator[EngineSwitch]:
    switch = EngineSwitch(tmp_path / "engine.sock")
    switch.up()
    yield switch
    if switch._listener is None:
        switch.up()  # let the service fixture's clean-up reach the engine


def test_docker_sessions_wait_for_an_engine_that_was_down_at_start_up(
    launch_service: ServiceFactory, engine_switch: EngineSwitch, workspace: Path
) -> None:
    service = launch_service(runtime="docker", env={"DOCKER_HOST": engine_switch.docker_host})
    session = running(service, workspace)
    engine = docker.from_env()
    try:
        engine.containers.run(
            image_tag(Settings()), ["sleep", "600"], detach=True, name="codestation-cs-orphan2",
            labels={LABEL_MANAGED: "true", LABEL_SESSION: "cs-orphan2",
                    LABEL_DATA_DIR: str(service.data_dir)},
        )  # fmt: skip
        service.stop_process()
        engine_switch.down()
        service.env["CODESTATION_RUNTIME"] = "auto"
        service.restart()
        assert service.client.health()["runtime"] == "bwrap"
        assert "1 session(s) in docker left as they are" in service.log.read_text()
        time.sleep(5)  # rounds of watching (every second) that cannot reach the engine
        assert listed(service, session.id).status is Status.RUNNING
        assert healthy(session)
        assert len(service.containers()) == 2  # the orphan too: nothing could remove it

        engine_switch.up()
        deadline = time.monotonic() + 30
        while [c.name for c in service.containers()] != [f"codestation-{session.id}"]:
            assert time.monotonic() < deadline, "the orphan outlived the engine's return"
            time.sleep(0.5)
        again = listed(service, session.id)
        assert again.status is Status.RUNNING
        assert (again.url, again.auth.password) == (session.url, session.auth.password)
        assert healthy(again)
        assert service.client.stop(session.id).status is Status.STOPPED
        assert service.containers() == []
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.containers.get("codestation-cs-orphan2").remove(force=True)
        engine.close()


# -- the agent killed -----------------------------------------------------------------------


def test_a_killed_agent_fails_its_session_within_two_seconds(
    service: Service, workspace: Path
) -> None:
    session = running(service, workspace)
    os.kill(agent_pid(session), signal.SIGKILL)
    killed_at = time.monotonic()
    while (failed := listed(service, session.id)).status is Status.RUNNING:
        assert time.monotonic() - killed_at < 5, "not noticed"
        time.sleep(0.05)
    assert time.monotonic() - killed_at < 2.5
    assert failed.status is Status.FAILED
    assert failed.error is not None
    assert failed.error.startswith("OpenCode stopped unexpectedly: OpenCode exited with status ")
    assert "--- last log lines ---\n" in failed.error
    assert service.leftovers() == []
    wait_port_free(session.port)


# -- logs -------------------------------------------------------------------------------------


def test_a_followed_log_carries_on_past_log_max_size(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(log_max_size="64k")
    session = running(service, workspace)
    seen: list[str] = []
    broke: list[BaseException] = []
    followed = threading.Event()

    def follow() -> None:
        path = f"/api/v1/code/session/{session.id}/logs"
        try:
            with (
                service.http() as http,
                http.stream("GET", path, params={"follow": "true", "tail": 1}, timeout=60) as logs,
            ):
                for chunk in logs.iter_text():
                    seen.append(chunk)
                    followed.set()
                    if "final line 0" in "".join(seen):
                        return
        except BaseException as exc:
            broke.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert followed.wait(30), broke
    run_in_session(session, SPEW.format(lines=2000, marker="after"))  # ~180 KB, past the size
    deadline = time.monotonic() + 10
    while len(log_files(service, runtime, session)) < 2:  # rotated
        assert time.monotonic() < deadline, "the log was not rotated"
        time.sleep(0.2)
    run_in_session(session, SPEW.format(lines=1, marker="final"))
    follower.join(30)
    assert "final line 0" in "".join(seen), f"the follower stopped at the rotation: {broke}"
    service.client.stop(session.id)


# -- culling ---------------------------------------------------------------------------------


def test_a_change_to_its_opencode_sessions_keeps_a_session(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="0.5")
    # Not 3 s: OpenCode can take seconds to make its first session on a loaded machine.
    session = running(service, workspace, idle_timeout=8)
    auth = (session.auth.username, session.auth.password)
    for _ in range(24):  # 12 s and more of an agent's sessions changing, straight to OpenCode
        made = httpx.post(f"{session.url}/session", auth=auth, json={}, timeout=10)
        assert made.status_code == 200, made.text
        assert listed(service, session.id).status is Status.RUNNING
        time.sleep(0.5)
    stopped = ended(service, session.id, 30)
    assert stopped.status is Status.STOPPED
    assert stopped.reason == "idle"


def test_typing_in_a_terminal_keeps_a_session_and_an_open_one_does_not(
    start_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="0.5")
    # Not the 3 s of the other culling tests: an agent that opens a shell can take seconds to
    # answer the culler, and a round judges by the activity seen when it began.
    session = running(service, workspace, idle_timeout=8)
    url = f"ws://127.0.0.1:{service.port}/api/v1/code/session/{session.id}/terminal?mode=shell"
    with connect(url, origin=Origin(service.url), additional_headers=service.auth_headers()) as ws:
        for i in range(24):  # 12 s and more of someone typing, a keystroke every 0.5 s
            ws.send(json.dumps({"data": f": {i}\r"}))
            with contextlib.suppress(TimeoutError):
                while ws.recv(timeout=0.5):
                    pass
            assert listed(service, session.id).status is Status.RUNNING
        # Still open, but no one types in it: that is no activity.
        stopped = ended(service, session.id, 30)
    assert stopped.status is Status.STOPPED
    assert stopped.reason == "idle"
