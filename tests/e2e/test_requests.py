"""Clients' mistakes get a 4xx with a JSON error that says what to fix, and create nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Service

START = "/api/v1/code/start"


def assert_nothing_created(service: Service) -> None:
    with service.http() as http:
        assert http.get("/api/v1/code/sessions").json() == {"sessions": []}
    assert service.leftovers() == []


def test_workspace_rules(service: Service, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    escape = tmp_path / "escape"
    os.symlink("/etc", escape)
    cases = {
        "relative/path": "relative",
        str(tmp_path / "missing"): "does not exist",
        str(a_file): "not a directory",
        "/etc": "outside the allowed roots",
        str(escape): "outside the allowed roots",
        str(service.data_dir.parent): "codestation's own directory",
        str(service.data_dir): "codestation's own directory",
        "": "empty",
    }
    with service.http() as http:
        for workspace, says in cases.items():
            answer = http.post(START, json={"workspace": workspace})
            assert answer.status_code == 400, (workspace, answer.text)
            body = answer.json()
            assert body["code"] == "workspace_rejected"
            assert says in body["error"], body
    assert_nothing_created(service)


def test_unknown_environment(service: Service, workspace: Path) -> None:
    with service.http() as http:
        answer = http.post(START, json={"workspace": str(workspace), "environment": "gpu"})
    assert answer.status_code == 400
    assert answer.json()["code"] == "unknown_environment"
    assert "default" in answer.json()["error"]
    assert_nothing_created(service)


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        (b"{not json", 400, "malformed_json", "not valid JSON"),
        (b"", 422, "invalid_request", "Field required"),
        (b"[]", 422, "invalid_request", "workspace"),
        (b'{"environment": "default"}', 422, "invalid_request", "workspace: Field required"),
        (b'{"workspace": 42}', 422, "invalid_request", "workspace"),
        (b'{"workspace": "/tmp", "colour": "red"}', 422, "invalid_request", "colour"),
    ],
)
def test_malformed_bodies(service: Service, body: bytes, status: int, code: str, says: str) -> None:
    with service.http() as http:
        answer = http.post(START, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code
    assert says in answer.json()["error"]
    assert_nothing_created(service)


def test_unknown_sessions_and_routes(service: Service) -> None:
    with service.http() as http:
        for method, path in [
            ("GET", "/api/v1/code/session/cs-nope"),
            ("GET", "/api/v1/code/session/cs-nope/logs"),
            ("GET", "/api/v1/code/session/cs-nope/logs?follow=true"),
            ("POST", "/api/v1/code/session/cs-nope/stop"),
            ("DELETE", "/api/v1/code/session/cs-nope"),
        ]:
            answer = http.request(method, path)
            assert answer.status_code == 404, (method, path)
            assert answer.json()["code"] == "session_not_found"
            assert "cs-nope" in answer.json()["error"]
        answer = http.get("/api/v1/code/nothing-here")
        assert answer.status_code == 404
        assert answer.json()["code"] == "not_found"
        answer = http.get(START)
        assert answer.status_code == 405
        assert answer.json()["code"] == "method_not_allowed"
        bad_tail = http.get("/api/v1/code/sessions/../session/x/logs", params={"tail": -1})
        assert bad_tail.status_code in (404, 422)


def test_the_api_describes_itself(service: Service, runtime: str) -> None:
    with service.http() as http:
        spec = http.get("/openapi.json").json()
        assert "/api/v1/code/start" in spec["paths"]
        assert http.get("/docs").status_code == 200
        assert http.get("/healthz").json()["runtime"] == runtime
