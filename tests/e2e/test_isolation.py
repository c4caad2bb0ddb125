"""Each user sees only their own: two users and an admin over every route.

alice and bob are codestation users mapped to Unix uids 4321 and 4322; their workspaces are
theirs on disk. Nothing bob does may touch, read or even confirm the existence of alice's
session: every route answers as it does for an id that does not exist.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from codestation import SessionInfo, Status, TooManySessions, WorkspaceRejected
from tests.e2e.conftest import Service, ServiceFactory

pytestmark = pytest.mark.runtimes("docker")  # ownership is the manager's, whatever the runtime

USERS = {"alice": 4321, "bob": 4322}


def owned_by(path: Path, uid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "README.md").write_text(f"# {path.name}\n")
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid)
    return path


@pytest.fixture
def team(start_service: ServiceFactory) -> Service:
    users = {name: {"uid": uid} for name, uid in USERS.items()}
    return start_service(users=json.dumps(users), max_sessions_per_user="3")


@pytest.fixture
def tokens(team: Service) -> dict[str, str]:
    return {"alice": team.make_token("alice"), "bob": team.make_token("bob"), "admin": team.token}


@pytest.fixture
def alices(team: Service, tokens: dict[str, str], tmp_path: Path) -> SessionInfo:
    alice = team.client_for(tokens["alice"])
    started = alice.start(str(owned_by(tmp_path / "alice-project", USERS["alice"])), wait=False)
    session = alice.wait(started.id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    assert session.owner == "alice"
    return session


def _not_found_like_a_stranger(answer: httpx.Response, unknown: httpx.Response) -> None:
    assert answer.status_code == 404, answer.text
    assert answer.status_code == unknown.status_code
    assert answer.json()["code"] == unknown.json()["code"]


def test_another_user_s_session_is_not_found_on_every_route(
    team: Service, tokens: dict[str, str], alices: SessionInfo
) -> None:
    with team.http(tokens["bob"]) as bob:
        spec = bob.get("/openapi.json").json()
        routes = [
            (method.upper(), path)
            for path, operations in spec["paths"].items()
            if "{session_id}" in path
            for method in operations
        ]
        assert len(routes) >= 4, routes
        # A request each route would take, so that only whose session it is can refuse it.
        valid: dict[str, dict[str, Any]] = {
            "/prompt": {"json": {"text": "hi"}},
            "/reply": {"params": {"opencode_session": "ses_a", "message": "msg_a"}},
        }
        for method, path in routes:
            asked = next((v for end, v in valid.items() if path.endswith(end)), {})
            theirs = bob.request(method, path.replace("{session_id}", alices.id), **asked)
            unknown = bob.request(
                method, path.replace("{session_id}", "cs-aaaaaaaaaaaaaaaa"), **asked
            )
            _not_found_like_a_stranger(theirs, unknown)
        # OpenCode's own API through codestation (no route of the schema: the proxy's).
        for path in ("/opencode/session", "/opencode/config", "/opencode"):
            theirs = bob.get(f"/api/v1/code/session/{alices.id}{path}")
            unknown = bob.get(f"/api/v1/code/session/cs-aaaaaaaaaaaaaaaa{path}")
            _not_found_like_a_stranger(theirs, unknown)
        follow = bob.get(f"/api/v1/code/session/{alices.id}/logs", params={"follow": True})
        assert follow.status_code == 404
        # The way to a session's host name, for a browser.
        opened = bob.get(f"/open/{alices.id}", follow_redirects=False)
        assert opened.status_code == 404, opened.text
        # Lists, the event stream, and stopping "all" are bob's alone.
        assert bob.get("/api/v1/code/sessions").json() == {"sessions": []}
        with bob.stream("GET", "/api/v1/code/events") as events:
            lines = events.iter_lines()
            assert next(lines) == "event: snapshot"
            assert json.loads(next(lines).removeprefix("data: ")) == {"sessions": []}
        assert bob.post("/api/v1/code/stop").json() == {"stopped": []}
        everyone = bob.post("/api/v1/code/stop", params={"all": "true"})
        assert everyone.status_code == 403, everyone.text
    # Through the proxy, with bob's own valid token, on alice's session's host name.
    host = {"Host": f"{alices.id}.localhost:{team.port}"}
    with httpx.Client(base_url=team.url, headers={**host, **team.auth_headers(tokens["bob"])}) as p:
        assert p.get("/global/health").status_code == 404
        assert p.get("/session").status_code == 404
        assert p.post("/session", json={"title": "bob was here"}).status_code == 404
    # WebSockets: the terminal, and OpenCode's own PTY through the proxy.
    with pytest.raises(InvalidStatus):
        connect(
            f"ws://127.0.0.1:{team.port}/api/v1/code/session/{alices.id}/terminal?mode=shell",
            additional_headers=team.auth_headers(tokens["bob"]),
        )
    with pytest.raises(InvalidStatus):
        connect(
            f"ws://127.0.0.1:{team.port}/pty/x/connect",
            additional_headers={**host, **team.auth_headers(tokens["bob"])},
            origin=Origin(f"http://{alices.id}.localhost:{team.port}"),
        )
    # And after all that, alice's session runs, untouched, and she still sees it.
    alice = team.client_for(tokens["alice"])
    assert alice.session(alices.id).status is Status.RUNNING
    assert [s.id for s in alice.sessions()] == [alices.id]


def test_alice_reaches_her_own_through_the_proxy_and_the_terminal(
    team: Service, tokens: dict[str, str], alices: SessionInfo
) -> None:
    host = {"Host": f"{alices.id}.localhost:{team.port}"}
    with httpx.Client(
        base_url=team.url, headers={**host, **team.auth_headers(tokens["alice"])}, timeout=30
    ) as mine:
        assert mine.get("/global/health").json()["healthy"] is True
    with connect(
        f"ws://127.0.0.1:{team.port}/api/v1/code/session/{alices.id}/terminal?mode=shell",
        additional_headers=team.auth_headers(tokens["alice"]),
    ) as ws:
        ws.send(json.dumps({"data": "id -u\r"}))
        seen, deadline = "", time.monotonic() + 20
        while "4321" not in seen and time.monotonic() < deadline:
            frame = ws.recv(timeout=20)
            seen += frame if isinstance(frame, str) else frame.decode(errors="replace")
        assert "4321" in seen  # the agent's shell runs as alice's uid


def test_an_admin_sees_and_stops_everyone_s(
    team: Service, tokens: dict[str, str], alices: SessionInfo
) -> None:
    admin = team.client_for(tokens["admin"])
    assert [s.id for s in admin.sessions()] == [alices.id]
    assert admin.session(alices.id).auth.password == alices.auth.password
    assert admin.stop_all() == []  # "all" means the admin's own, unless asked for everyone's
    stopped = admin.stop_all(everyone=True)
    assert [s.id for s in stopped] == [alices.id]
    assert team.client_for(tokens["alice"]).session(alices.id).status is Status.STOPPED


def test_only_the_owner_s_workspaces_and_never_root_s(
    team: Service, tokens: dict[str, str], tmp_path: Path
) -> None:
    alice = team.client_for(tokens["alice"])
    bobs = owned_by(tmp_path / "bob-project", USERS["bob"])
    roots = owned_by(tmp_path / "root-project", 0)
    with pytest.raises(WorkspaceRejected, match="belongs to uid 4322, not to you"):
        alice.start(str(bobs), wait=False)
    with pytest.raises(WorkspaceRejected, match="belongs to root"):
        alice.start(str(roots), wait=False)
    assert alice.sessions() == []
    # carol has a token but no Unix account and no uid configured: nowhere to work.
    carol = team.client_for(team.make_token("carol"))
    with pytest.raises(WorkspaceRejected, match="no Unix account"):
        carol.start(str(owned_by(tmp_path / "carol-project", 4323)), wait=False)
    # An admin may (admin_any_owner): the agent then runs as the owner, root here.
    admin = team.client_for(tokens["admin"])
    session = admin.wait(admin.start(str(roots), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    admin.stop(session.id)


def test_a_user_s_live_sessions_are_capped(
    team: Service, tokens: dict[str, str], tmp_path: Path
) -> None:
    alice = team.client_for(tokens["alice"])
    project = owned_by(tmp_path / "alice-many", USERS["alice"])
    started = [alice.start(str(project), wait=False) for _ in range(3)]
    with pytest.raises(TooManySessions, match="3 live sessions"):
        alice.start(str(project), wait=False)
    assert len(alice.sessions()) == 3
    # bob is not counted against alice
    bob = team.client_for(tokens["bob"])
    bob.stop(bob.start(str(owned_by(tmp_path / "bob-one", USERS["bob"])), wait=False).id)
    alice.stop(started[0].id)
    alice.stop(alice.start(str(project), wait=False).id)  # room again
    for s in started[1:]:
        alice.stop(s.id)


def test_per_user_roots(launch_service: ServiceFactory, runtime: str, tmp_path: Path) -> None:
    homes = tmp_path / "homes"
    service = launch_service(
        runtime=runtime,
        allowed_roots=json.dumps([f"{homes}/{{user}}"]),
        users=json.dumps({"alice": {"uid": USERS["alice"]}}),
    )
    alice = service.client_for(service.make_token("alice"))
    inside = owned_by(homes / "alice" / "project", USERS["alice"])
    outside = owned_by(homes / "bob" / "project", USERS["alice"])
    with pytest.raises(WorkspaceRejected, match="outside the allowed roots"):
        alice.start(str(outside), wait=False)
    session = alice.start(str(inside), wait=False)
    alice.stop(session.id)
