"""The agent at work, end to end: a prompt goes in through codestation (its API, the Python
clients), the real OpenCode calls the scripted model (`tests/e2e/llm.py`, reached over the
sandbox's default egress network), writes a file in the workspace, and codestation reports the
change. Also: the agent's event stream, abort, and a prompt to a stopped session.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from codestation import AsyncClient, NotRunning
from codestation.schemas import AgentEvent
from tests.e2e.conftest import Model, Service, ServiceFactory

USER = 4321  # the workspace's owner, whom the agent runs as


@pytest.fixture
def working(start_service: ServiceFactory, model: Model) -> Service:
    """A service with an environment `agent` whose OpenCode uses the scripted model."""
    return start_service(
        environments=json.dumps({"agent": model.environment()}), env={model.env_var: model.key}
    )


def test_a_prompt_edits_the_workspace_and_the_change_is_reported(
    working: Service, workspace: Path
) -> None:
    for path in [workspace, *workspace.rglob("*")]:  # a user's, not root's
        os.chown(path, USER, USER)
    with working.client.start(str(workspace), "agent") as session:
        assert session.status == "running", session.error
        reply = session.prompt("please write hello.txt: Hello from the agent")
        written = workspace / "hello.txt"
        assert written.read_text() == "Hello from the agent"
        assert (written.stat().st_uid, written.stat().st_gid) == (USER, USER)
        assert reply.finished
        assert reply.error is None
        assert reply.opencode_session.startswith("ses_")
        assert reply.message.startswith("msg_")
        assert [(t.tool, t.status) for t in reply.tools] == [("write", "completed")]
        assert "Wrote hello.txt." in reply.text
        assert reply.tokens.input > 0
        assert reply.tokens.output > 0

        report = session.changes()
        assert [(f.path, f.change) for f in report.files] == [("hello.txt", "added")]
        assert report.files[0].diff is not None
        assert "+Hello from the agent" in report.files[0].diff
        assert (report.added, report.modified, report.deleted) == (1, 0, 0)

        # The same OpenCode session goes on: its history holds both prompts.
        again = session.prompt("just say hi", opencode_session=reply.opencode_session)
        assert again.opencode_session == reply.opencode_session
        assert again.text
    assert working.client.get(session.id).status == "stopped"


def test_the_event_stream_shows_the_tool_call_and_the_reply_as_they_happen(
    working: Service, workspace: Path
) -> None:
    session = working.client.start(str(workspace), "agent")
    seen: list[tuple[float, AgentEvent]] = []
    opened = threading.Event()

    def watch() -> None:
        for event in session.events():
            seen.append((time.monotonic(), event))
            opened.set()
            if event.type == "session.idle":
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert opened.wait(30), "the event stream sent nothing"
    accepted = session.prompt("please write streamed.txt: one two three", wait=False)
    watcher.join(120)
    assert not watcher.is_alive(), f"no session.idle in {[e.type for _, e in seen]}"
    done = time.monotonic()
    ours = [(t, e) for t, e in seen if _session_of(e) == accepted.opencode_session]
    tools = [
        e.properties["part"]
        for _, e in ours
        if e.type == "message.part.updated" and e.properties["part"].get("type") == "tool"
    ]
    assert any(p["tool"] == "write" and p["state"]["status"] == "completed" for p in tools)
    deltas = [t for t, e in ours if e.type == "message.part.delta"]
    assert len(deltas) >= 2, [e.type for _, e in ours]
    # As they happen: the reply's pieces came before its text part was complete, in order
    # (by order, not by clock: a loaded machine may deliver pieces close together).
    kinds = [e.type for _, e in ours]
    first_piece = kinds.index("message.part.delta")
    finished_text = next(
        i for i, (_, e) in enumerate(ours)
        if e.type == "message.part.updated" and e.properties["part"].get("type") == "text"
        and (e.properties["part"].get("time") or {}).get("end")
    )  # fmt: skip
    assert first_piece < finished_text < kinds.index("session.idle"), kinds
    assert min(deltas) < done
    reply = session.reply(accepted)
    assert reply.finished
    assert "Wrote streamed.txt." in reply.text
    assert (workspace / "streamed.txt").read_text() == "one two three"
    session.stop()


def _session_of(event: AgentEvent) -> str | None:
    """The OpenCode session an event is about, wherever its type keeps it."""
    found = event.properties
    for inner in (found, found.get("part") or {}, found.get("info") or {}):
        if isinstance(inner, dict) and inner.get("sessionID"):
            return str(inner["sessionID"])
    return None


def test_abort_ends_a_slow_turn(working: Service, workspace: Path) -> None:
    session = working.client.start(str(workspace), "agent")
    events = session.events()
    next(events)  # open before the prompt: its first words are not missed
    accepted = session.prompt("take it slow", wait=False)
    for event in events:  # the model has begun to answer
        if event.type == "message.part.delta" and _session_of(event) == accepted.opencode_session:
            break
    assert session.reply(accepted).finished is False
    assert session.abort() == [accepted.opencode_session]
    began = time.monotonic()
    for event in events:
        if event.type == "session.idle" and _session_of(event) == accepted.opencode_session:
            break
    events.close()
    assert time.monotonic() - began < 10, "the turn went on after abort"
    reply = session.reply(accepted)
    assert reply.finished
    assert reply.error is not None
    assert "abort" in reply.error.lower()
    session.stop()


def test_a_prompt_to_a_stopped_session_is_a_clear_409(working: Service, workspace: Path) -> None:
    session = working.client.start(str(workspace), "agent")
    session.stop()
    with pytest.raises(NotRunning, match="stopped"):
        session.prompt("anyone there?")
    answer = working.http().post(f"/api/v1/code/session/{session.id}/prompt", json={"text": "hi"})
    assert answer.status_code == 409
    assert answer.json()["code"] == "not_running"
    for path in ("changes", "events"):
        answer = working.http().get(f"/api/v1/code/session/{session.id}/{path}")
        assert answer.status_code == 409, (path, answer.text)


def test_bad_prompts_are_400s_that_say_what_to_fix(working: Service, workspace: Path) -> None:
    session = working.client.start(str(workspace), "agent")
    http = working.http()
    for body in ({}, {"text": ""}, {"text": "x", "opencode_session": "../../x"},
                 {"text": "x", "model": "no-slash"}, {"text": "x", "wait": "maybe"}):  # fmt: skip
        answer = http.post(f"/api/v1/code/session/{session.id}/prompt", json=body)
        assert answer.status_code in (400, 422), (body, answer.text)
        assert answer.json()["error"]
    known: list[tuple[dict[str, object], str]] = [
        ({"text": "x", "opencode_session": "ses_doesnotexist"}, "opencode_session"),
        ({"text": "x", "model": "scripted/no-such-model", "wait": True}, "scripted/mock-model"),
        ({"text": "x", "agent": "no-such-agent"}, "build"),
    ]
    for asked, said in known:
        answer = http.post(f"/api/v1/code/session/{session.id}/prompt", json=asked)
        assert answer.status_code == 400, answer.text
        assert said in answer.json()["error"]
    session.stop()


def test_the_async_client_does_the_same(working: Service, workspace: Path) -> None:
    async def work() -> None:
        async with AsyncClient(working.url, token=working.token, timeout=120) as cs:
            async with await cs.start(str(workspace), "agent") as session:
                assert session.status == "running", session.error
                reply = await session.prompt("please write async.txt: from asyncio")
                assert [(t.tool, t.status) for t in reply.tools] == [("write", "completed")]
                report = await session.changes()
                assert [f.path for f in report.files] == ["async.txt"]
                first = await anext(aiter(session.events()))
                assert first.type == "server.connected"
            assert (await cs.get(session.id)).status == "stopped"

    asyncio.run(work())
    assert (workspace / "async.txt").read_text() == "from asyncio"


def test_the_events_stream_ends_when_the_session_stops(working: Service, workspace: Path) -> None:
    session = working.client.start(str(workspace), "agent")
    ended = threading.Event()

    def watch() -> None:
        for _ in session.events():
            pass
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(1)
    assert not ended.is_set()
    session.stop()
    assert ended.wait(15), "the event stream outlived its session"


def test_the_sessions_list_shows_whether_the_agent_is_busy(
    working: Service, workspace: Path
) -> None:
    session = working.client.start(str(workspace), "agent")
    deadline = time.monotonic() + 30
    while working.client.get(session.id).agent != "idle":
        assert time.monotonic() < deadline, "never seen idle"
        time.sleep(0.5)
    accepted = session.prompt("slow please", wait=False)
    deadline = time.monotonic() + 30
    while working.client.get(session.id).agent != "busy":
        assert time.monotonic() < deadline, "never seen busy"
        time.sleep(0.5)
    session.abort(accepted.opencode_session)
    session.stop()


def upstream_connections(port: int) -> int:
    """Connections established to a session's published port (the service's, to its OpenCode)."""
    shown = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return len(shown.splitlines())


def test_abandoned_event_streams_end_upstream_and_give_their_places_back(
    working: Service, workspace: Path
) -> None:
    session = working.client.start(str(workspace), "agent")
    before = upstream_connections(session.port)
    path = f"{working.url}/api/v1/code/session/{session.id}/events"
    headers = working.auth_headers()
    # Far more than max_streams_per_user (16): each abandoned one must give its place back.
    for _ in range(40):
        with httpx.stream("GET", path, headers=headers, timeout=30) as answer:
            assert answer.status_code == 200, answer.read()
            next(answer.iter_bytes())
    deadline = time.monotonic() + 15
    while upstream_connections(session.port) > before + 3:  # keep-alive ones may come and go
        assert time.monotonic() < deadline, "abandoned event streams live on upstream"
        time.sleep(0.2)
    assert session.prompt("just say hi").text  # and the agent still answers
    session.stop()
