"""`GET /metrics`: Prometheus' text format, for an admin's token or the metrics token only, and
figures that follow what the service did: starts and their failures, culls, the proxy's
requests and bytes, sessions by status, open terminals."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codestation import Settings, Status
from tests.e2e.conftest import Service, ServiceFactory
from tests.e2e.test_terminal import open_terminal, read_until

pytestmark = pytest.mark.runtimes("bwrap")  # what is counted is the manager's, not a runtime's


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scraped(service: Service, token: str | None = None) -> Samples:
    """Every sample of the service's metrics: (name, sorted labels) to value."""
    with service.http(token) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_only_an_admin_or_the_metrics_token_may_read_them(
    launch_service: ServiceFactory,
) -> None:
    scraper = secrets.token_urlsafe(32)
    service = launch_service(runtime="bwrap", metrics_token=scraper)
    assert httpx.get(f"{service.url}/metrics").status_code == 401
    user = service.make_token("bob")
    refused = httpx.get(f"{service.url}/metrics", headers=service.auth_headers(user))
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"
    assert "metrics_token" in refused.json()["error"]

    assert value(scraped(service), "codestation_sessions") == 0  # the admin's token
    assert value(scraped(service, scraper), "codestation_memory_budget_bytes") > 0
    # The metrics token opens /metrics and nothing else.
    elsewhere = httpx.get(f"{service.url}/api/v1/code/sessions",
                          headers=service.auth_headers(scraper))  # fmt: skip
    assert elsewhere.status_code == 401
    wrong = httpx.get(f"{service.url}/metrics", headers=service.auth_headers(scraper[:-1] + "x"))
    assert wrong.status_code == 401


def test_a_metrics_token_too_short_to_be_a_secret_is_refused_at_start_up(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        Settings(data_dir=tmp_path, metrics_token="short")


def test_what_the_service_did_is_counted(
    start_service: ServiceFactory, launch_service: ServiceFactory, workspace: Path
) -> None:
    service = start_service(cull_interval="0.5")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    own_host = {"Host": f"{session.id}.localhost:{service.port}"}
    with service.http() as http:
        for _ in range(3):
            assert http.get("/global/health", headers=own_host).status_code == 200
    with open_terminal(service, session, "shell") as ws:
        ws.send(json.dumps({"data": "echo counted-$((6*7))\r"}))
        read_until(ws, "counted-42")
        during = scraped(service)
    assert value(during, "codestation_terminals_open") == 1
    assert value(during, "codestation_sessions", status="running", runtime=session.runtime) == 1
    assert value(during, "codestation_session_start_seconds_count",
                 runtime=session.runtime, started_from="cold") == 1  # fmt: skip
    took = value(during, "codestation_session_start_seconds_sum",
                 runtime=session.runtime, started_from="cold")  # fmt: skip
    assert 0 < took < 120
    assert value(during, "codestation_proxy_requests_total", kind="http") >= 3
    assert value(during, "codestation_proxy_bytes_total", direction="from_agent") > 0

    # Idle for a second: culled, and counted so.
    service.client.stop(session.id)
    idle = service.client.wait(service.client.start(str(workspace), idle_timeout=1, wait=False).id)
    assert idle.status is Status.RUNNING, idle.error
    deadline = time.monotonic() + 60
    # Listed, not read: reading a session is activity on it.
    while next(s for s in service.client.sessions() if s.id == idle.id).status.live:
        assert time.monotonic() < deadline, "never culled"
        time.sleep(0.3)
    after = scraped(service)
    assert value(after, "codestation_session_culls_total", reason="idle") == 1
    assert value(after, "codestation_sessions", status="stopped", runtime=session.runtime) == 2
    assert value(after, "codestation_terminals_open") == 0

    # A start that cannot answer in time fails, counted by the error's code.
    hurried = launch_service(runtime="bwrap", start_timeout="0.2")
    failed = hurried.client.wait(hurried.client.start(str(workspace), wait=False).id)
    assert failed.status is Status.FAILED
    assert value(scraped(hurried), "codestation_session_start_failures_total",
                 runtime=failed.runtime, reason="start_timeout") == 1  # fmt: skip
