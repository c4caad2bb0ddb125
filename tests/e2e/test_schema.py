"""Schemathesis against codestation's own OpenAPI schema, with a token: zero 5xx, zero schema
violations.

It generates requests for every operation in `/openapi.json` (examples, boundary values, then
random and malformed data, then sequences that feed one answer into the next request) and
checks every answer: no server error; a status code the schema documents; the documented
content type, headers and body shape. The session routes get a real running session's id (and
ids of sessions it starts itself on workspaces it learned from earlier answers), so their
success answers are checked too, not only their 404s. Left out: `GET /api/v1/code/events`,
a stream that never ends by design (`test_events.py` covers it), and the WebSocket terminal,
which OpenAPI cannot describe (`test_terminal.py`, `test_hostile.py`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codestation import Status
from tests.e2e.conftest import ServiceFactory

pytestmark = pytest.mark.runtimes("bwrap")  # the API is the same; bwrap starts fastest

EVENTS = "/api/v1/code/events"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    start_service: ServiceFactory, workspace: Path, tmp_path: Path
) -> None:
    # More ports than one user may hold: a start beyond the user's share is the documented
    # 429, never the 503 of an exhausted range.
    service = start_service(size=12, max_sessions_per_user="4")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[[operations]]\n"
        "include-path-regex = '^/api/v1/code/session/\\{session_id\\}(/stop)?$'\n"
        f'parameters = {{ "session_id" = "{session.id}" }}\n'
    )
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
            "--no-color",
            "run", f"{service.url}/openapi.json",
            "--header", f"Authorization: Bearer {service.token}",
            "--checks", ",".join(CHECKS),
            "--exclude-path", EVENTS,
            "--max-examples", "40",
            "--request-timeout", "60",
            "--seed", "8585",
        ],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    with service.http() as http:
        paths = http.get("/openapi.json").json()["paths"]
    operations = sum(len(methods) for path, methods in paths.items() if path != EVENTS)
    assert f"Tested: {operations}" in report, report[-2000:]  # every one, none skipped
    log = service.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    assert "internal error" not in log
