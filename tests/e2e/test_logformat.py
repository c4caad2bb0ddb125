"""`codestation serve --log-format json` on the real service: every line it writes is one JSON
object, a session's lines name it and its user, request lines name who asked and carry no
query string, and no token reaches the log."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from codestation import Status
from tests.e2e.conftest import ServiceFactory

pytestmark = pytest.mark.runtimes("bwrap")  # the log is the service's, not a runtime's


def test_every_line_is_json_naming_sessions_and_users_and_hiding_secrets(
    launch_service: ServiceFactory, workspace: Path
) -> None:
    service = launch_service(runtime="bwrap", log_format="json")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    httpx.get(f"{service.url}/login?token=csl_not_a_real_code")
    service.client.stop(session.id)
    service.stop_process()

    text = service.log.read_text()
    lines = [json.loads(raw) for raw in text.splitlines() if raw.strip()]
    assert lines
    assert all({"time", "level", "logger", "event"} <= line.keys() for line in lines)
    about = [line for line in lines if line.get("session") == session.id]
    running = [line for line in about if "running at" in line["event"]]
    assert running
    assert running[0]["user"] == "admin"
    assert any("stopped" in line["event"] for line in about)
    requests = [line for line in lines if line["event"] == "request"]
    assert any(line["path"] == "/login?[query hidden]" for line in requests), requests
    # Who asked: the start's request names its user; one no token came with names none.
    [start] = [line for line in requests if line["path"] == "/api/v1/code/start"
               and line["method"] == "POST"]  # fmt: skip
    assert start["user"] == "admin", start
    assert all("user" not in line for line in requests if line["path"].startswith("/login"))
    assert "csl_not_a_real_code" not in text
    assert service.token not in text
    assert session.auth.password not in text
    # The first start's one-time login link is a line of its own, as it is in text.
    assert any("/login?token=csl_" in line["event"] for line in lines)
