"""The warm pool: sandboxes started ahead of need, taken by a start in milliseconds.

A member must be indistinguishable from a cold-started session for whoever uses it: its
workspace at /workspace (its files, its pinned git paths read-only), files written as the
workspace's owner, OpenCode answering through the proxy for that workspace, a password of its
own, and nothing left behind. Pools fill only in spare room, refill, and are stopped with the
service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from codestation import SessionInfo, Status
from codestation.config import OPENCODE_VERSION
from tests.e2e.conftest import Model, Service, ServiceFactory, run_in_session, snapshot
from tests.e2e.test_network import World, reach, the_host, world  # noqa: F401 (a fixture)
from tests.e2e.test_terminal import open_terminal, read_until

USER = 4321  # the owner of most workspaces here, whom the agent runs as
OTHER = 4322


def pooled(**profile: object) -> str:
    return json.dumps({"default": {"pool": 1, **profile}})


def owned(path: Path, uid: int = USER) -> Path:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid)
    return path


def project(root: Path, name: str, uid: int = USER) -> Path:
    ws = root / name
    (ws / "src").mkdir(parents=True)
    (ws / "README.md").write_text(f"# {name}\n")
    (ws / "src" / "main.py").write_text("print('hello')\n")
    return owned(ws, uid)


def wait_pool(service: Service, ready: int = 1, environment: str = "default") -> None:
    deadline = time.monotonic() + 120
    while service.client.health()["capacity"]["pool_ready"].get(environment, 0) < ready:
        assert time.monotonic() < deadline, f"the pool never had {ready} ready member(s)"
        time.sleep(0.2)


def members(service: Service, runtime: str) -> set[str]:
    """The ids of every sandbox of the service (sessions and pool members)."""
    if runtime == "docker":
        return {c.labels["codestation.session"] for c in service.containers()}
    return {p.stem for p in (service.data_dir / "run").glob("*.json")}


def slot_mounts(service: Service) -> list[str]:
    """Mounts on the host under the service's slots (a workspace handed to a sandbox)."""
    slots = str(service.data_dir / "slots")
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if f" {slots}/" in line]  # fmt: skip


def files_seen(service: Service, session: SessionInfo) -> set[str]:
    """What OpenCode lists at the root of its project, asked through codestation."""
    with service.http() as http:
        answer = http.get(f"/api/v1/code/session/{session.id}/opencode/file", params={"path": "."})
    assert answer.status_code == 200, answer.text
    return {entry["name"] for entry in answer.json()}


def test_a_start_takes_a_started_sandbox_and_works_on_its_workspace(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = start_service(environments=pooled())
    first = service.client.start(str(project(tmp_path, "first")))
    assert first.started_from == "cold"
    wait_pool(service)

    workspace = project(tmp_path, "second")
    (workspace / "only-here.txt").write_text("x")
    before = snapshot(workspace)
    began = time.monotonic()
    session = service.client.start(str(workspace), wait=False)
    # Running in the answer to the start itself: nothing to wait for.
    assert session.status is Status.RUNNING, session.error
    assert time.monotonic() - began < 5
    assert session.started_from == "pool"
    assert set(session.phases) == {"admission", "bind", "snapshot"}
    assert session.auth.password != first.auth.password

    assert files_seen(service, session) == {"README.md", "src", "only-here.txt"}
    code, printed = run_in_session(session, "pwd; id -u; echo made > /workspace/by-agent.txt")
    assert code == 0, printed
    made = workspace / "by-agent.txt"
    assert made.read_text() == "made\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (USER, USER)
    assert printed.split()[1] == str(USER)
    made.unlink()
    changes = session.changes()
    assert changes.files == []

    service.client.stop(session.id)
    assert snapshot(workspace) == before, "stopping a session must not touch its workspace"
    assert not slot_mounts(service) or all(session.id not in m for m in slot_mounts(service))
    assert not (service.data_dir / "slots" / session.id).exists()


def claim(service: Service, workspace: Path, environment: str = "default") -> SessionInfo:
    """Start a session on `workspace` once the pool has a member ready; it must take it."""
    wait_pool(service, environment=environment)
    session = service.client.start(str(workspace), environment, wait=False)
    assert session.status is Status.RUNNING, session.error
    assert session.started_from == "pool"
    return session


def warmed(start_service: ServiceFactory, tmp_path: Path, **settings: Any) -> Service:
    """A service with a pool for USER's sessions, its first (cold) session started."""
    service = start_service(**{"environments": pooled(), **settings})
    assert service.client.start(str(project(tmp_path, "first"))).started_from == "cold"
    return service


def test_a_member_is_handed_out_once_and_the_pool_refills(
    start_service: ServiceFactory, tmp_path: Path, runtime: str
) -> None:
    service = warmed(start_service, tmp_path)
    one = claim(service, project(tmp_path, "one"))
    two = claim(service, project(tmp_path, "two"))
    assert one.id != two.id
    assert one.port != two.port
    assert one.auth.password != two.auth.password
    assert files_seen(service, one) == {"README.md", "src"}
    (tmp_path / "two" / "two.txt").write_text("2")
    assert files_seen(service, two) == {"README.md", "src", "two.txt"}
    # The one that took a member stops; the other still works on its own workspace.
    service.client.stop(one.id)
    assert files_seen(service, two) == {"README.md", "src", "two.txt"}
    wait_pool(service)  # refilled, a third time
    sessions = {s.id for s in service.client.sessions()}
    assert len(members(service, runtime) - sessions) == 1  # the member: no one's session


def kill_member(service: Service, runtime: str, member: str) -> None:
    """End a pool member's OpenCode at once, as a crash would."""
    if runtime == "docker":
        (container,) = [c for c in service.containers()
                        if c.labels["codestation.session"] == member]  # fmt: skip
        container.kill()
        return
    for proc in Path("/proc").iterdir():
        try:
            in_member = f"/codestation/{member}\n" in (proc / "cgroup").read_text()
            if in_member and b"opencode" in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_a_member_that_died_since_the_pool_looked_gives_way_to_a_cold_start(
    start_service: ServiceFactory, tmp_path: Path, runtime: str
) -> None:
    service = warmed(start_service, tmp_path)
    wait_pool(service)
    (member,) = members(service, runtime) - {s.id for s in service.client.sessions()}
    kill_member(service, runtime, member)
    # At once: the pool looks at its members every 2 s, so this start still takes the dead one.
    started = service.client.start(str(project(tmp_path, "after")), wait=False)
    session = service.client.wait(started.id)
    assert session.status is Status.RUNNING, session.error
    assert session.started_from == "cold"
    assert files_seen(service, session) == {"README.md", "src"}
    assert not (service.data_dir / "slots" / member).exists()  # the dead member's, released


def test_only_a_start_for_the_same_owner_takes_a_member(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = warmed(start_service, tmp_path)
    wait_pool(service)
    other = service.client.start(str(project(tmp_path, "theirs", uid=OTHER)))
    assert other.started_from == "cold"
    code, printed = run_in_session(other, "id -u")
    assert (code, printed.strip()) == (0, str(OTHER))


def test_pinned_git_paths_stay_read_only_in_a_member(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = warmed(start_service, tmp_path)
    workspace = tmp_path / "repo"
    workspace.mkdir()
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    (workspace / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    owned(workspace)
    config = (workspace / ".git" / "config").read_bytes()
    session = claim(service, workspace)
    _, printed = run_in_session(
        session,
        "echo x >> /workspace/.git/config && echo config-written; "
        "echo x > /workspace/.git/hooks/post-checkout && echo hook-written; "
        "mv /workspace/.git /workspace/moved && echo git-moved; "
        "echo fine > /workspace/.git/description && echo description-written",
    )
    assert "config-written" not in printed, printed
    assert "hook-written" not in printed, printed
    assert "git-moved" not in printed, printed
    assert "description-written" in printed, printed  # the rest of .git stays writable
    assert (workspace / ".git" / "config").read_bytes() == config


def test_a_prompt_to_a_pooled_session_edits_its_workspace(
    start_service: ServiceFactory, tmp_path: Path, model: Model
) -> None:
    # Only the scripted model: OpenCode then skips its built-in catalog at each project load.
    profile = {**model.environment(), "pool": 1, "catalog": "configured"}
    service = start_service(
        environments=json.dumps({"agent": profile}), env={model.env_var: model.key}
    )
    service.client.start(str(project(tmp_path, "first")), "agent")
    workspace = project(tmp_path, "work")
    session = claim(service, workspace, "agent")
    with service.http() as http:
        known = http.get(f"/api/v1/code/session/{session.id}/opencode/provider").json()
    assert [p["id"] for p in known["all"]] == ["scripted"]
    with service.client.wait(session.id) as running:
        reply = running.prompt("please write hello.txt: Hello from the agent")
        assert reply.error is None, reply
        written = workspace / "hello.txt"
        assert written.read_text() == "Hello from the agent"
        assert (written.stat().st_uid, written.stat().st_gid) == (USER, USER)
        report = running.changes()
        assert [(f.path, f.change) for f in report.files] == [("hello.txt", "added")]


def test_the_agent_terminal_of_a_pooled_session_shows_its_workspace(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = warmed(start_service, tmp_path)
    workspace = project(tmp_path, "tui")
    (workspace / "made-on-host.txt").write_text("x")
    session = claim(service, workspace)
    with open_terminal(service, session, "shell") as ws:
        ws.send(json.dumps({"data": "pwd; ls /workspace\r"}))
        assert "made-on-host.txt" in read_until(ws, "made-on-host.txt")
    with open_terminal(service, session, "agent") as ws:
        ws.send(json.dumps({"rows": 30, "cols": 100}))
        read_until(ws, OPENCODE_VERSION, 60)


def test_a_member_keeps_the_network_rules(
    start_service: ServiceFactory,
    tmp_path: Path,
    world: World,  # noqa: F811
) -> None:
    service = warmed(start_service, tmp_path)
    session = claim(service, project(tmp_path, "net"))
    targets = {"outside": world.outside, "private": world.private, **the_host(world, service)}
    reached = reach(session, targets)
    assert reached.pop("outside"), "egress must reach the outside world"
    assert not any(reached.values()), {k: targets[k] for k, v in reached.items() if v}


def test_rotated_secrets_replace_the_members(
    start_service: ServiceFactory, tmp_path: Path, runtime: str
) -> None:
    secret = tmp_path / "key"
    secret.write_text("first-value")
    service = start_service(
        environments=pooled(secrets={"API_KEY": {"file": str(secret)}}),
    )
    service.client.start(str(project(tmp_path, "first")))
    wait_pool(service)
    before = members(service, runtime) - {s.id for s in service.client.sessions()}
    secret.write_text("second-value")
    deadline = time.monotonic() + 120
    while (members(service, runtime) - {s.id for s in service.client.sessions()}) & before:
        assert time.monotonic() < deadline, "a member with the old secret stayed"
        time.sleep(0.2)
    session = claim(service, project(tmp_path, "rotated"))
    assert session.id not in before
    code, printed = run_in_session(session, "printenv API_KEY")
    assert (code, printed.strip()) == (0, "second-value")


@pytest.mark.runtimes("bwrap")
def test_members_use_only_spare_room(
    start_service: ServiceFactory, tmp_path: Path, runtime: str
) -> None:
    """Three ports, three sessions at most: a member waits in the spare room, and a start that
    needs its port gets it."""
    service = warmed(start_service, tmp_path, max_live_sessions="3", size=3)
    wait_pool(service)
    second = service.client.start(str(project(tmp_path, "b", uid=OTHER)))
    assert second.status is Status.RUNNING, second.error
    third = service.client.start(str(project(tmp_path, "c", uid=OTHER + 1)))
    assert third.status is Status.RUNNING, third.error
    assert third.started_from == "cold"
    assert members(service, runtime) == {s.id for s in service.client.sessions()}


@pytest.mark.runtimes("bwrap")
def test_members_give_way_when_sessions_need_the_room(
    start_service: ServiceFactory, tmp_path: Path, runtime: str
) -> None:
    service = warmed(start_service, tmp_path, max_live_sessions="2")
    wait_pool(service)
    second = service.client.start(str(project(tmp_path, "b", uid=OTHER)))
    assert second.status is Status.RUNNING, second.error
    deadline = time.monotonic() + 30
    while members(service, runtime) != {s.id for s in service.client.sessions()}:
        assert time.monotonic() < deadline, "a member kept room two sessions need"
        time.sleep(0.2)
    assert service.client.health()["capacity"]["pool_ready"] == {}


def test_members_end_with_the_service_and_orphans_go_at_the_next_start(
    start_service: ServiceFactory, tmp_path: Path, runtime: str
) -> None:
    service = warmed(start_service, tmp_path)
    wait_pool(service)
    member = members(service, runtime) - {s.id for s in service.client.sessions()}
    assert len(member) == 1
    service.restart(signal.SIGKILL)  # its member left running, its slot mounted
    assert not members(service, runtime) & member, "an orphaned member stayed"
    assert not [line for line in slot_mounts(service) for m in member if m in line]
    wait_pool(service)
    service.client.stop_all()
    service.stop_process()  # members end with the service
    assert members(service, runtime) == set()
    assert not slot_mounts(service)
