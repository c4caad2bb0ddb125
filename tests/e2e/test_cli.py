"""The `codestation` command against a real service."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from codestation import Status
from tests.e2e.conftest import Model, Service, ServiceFactory, snapshot


def cli(service: Service, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "codestation.cli", *args],
        env={**service.env, "CODESTATION_URL": service.url, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_start_ls_status_logs_stop(service: Service, workspace: Path, runtime: str) -> None:
    started = cli(service, "start", str(workspace), "--environment", "default")
    url = re.search(r"url\s+(http://\S+)", started.stdout)
    password = re.search(r"password\s+(\S+)", started.stdout)
    session_id = started.stdout.split()[0]
    assert url, started.stdout
    assert password, started.stdout
    health = httpx.get(
        f"{url.group(1)}/global/health", auth=("opencode", password.group(1)), timeout=10
    )
    assert health.json()["healthy"] is True

    listed = cli(service, "ls")
    assert session_id in listed.stdout
    assert "running" in listed.stdout
    assert runtime in listed.stdout
    as_json = json.loads(cli(service, "ls", "--json").stdout)
    assert [s["id"] for s in as_json] == [session_id]

    status = cli(service, "status", session_id, "--json")
    assert json.loads(status.stdout)["url"] == url.group(1)
    assert "opencode server listening" in cli(service, "logs", session_id).stdout

    assert "stopped" in cli(service, "stop", session_id).stdout
    assert (workspace / "README.md").exists()


def test_follow_streams_new_lines_and_ends_when_the_session_stops(
    service: Service, workspace: Path
) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    follower = subprocess.Popen(
        [sys.executable, "-m", "codestation.cli", "logs", "--follow", session.id],
        env={**service.env, "CODESTATION_URL": service.url},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in follower.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def read_until(text: str) -> str:
        seen = ""
        deadline = time.monotonic() + 30
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"the follower never printed {text!r}; it printed {seen!r}"
            with contextlib.suppress(queue.Empty):
                seen += lines.get(timeout=left)
        return seen

    read_until("opencode server listening")  # the stored tail: the follow has begun
    # Only now make OpenCode log something new: it logs each session it creates, title and all.
    marker = f"made-after-follow-began-{secrets.token_hex(4)}"
    created = httpx.post(
        f"{session.url}/session",
        json={"title": marker},
        auth=(session.auth.username, session.auth.password),
        timeout=30,
    )
    assert created.status_code == 200, created.text
    read_until(marker)  # streamed while the session still runs
    service.client.stop(session.id)
    follower.wait(timeout=60)
    reader.join(timeout=10)
    assert follower.returncode == 0


def test_rm_stops_and_forgets_a_session(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    assert service.leftovers() != []  # its sandbox runs, and the check below would see it
    before = snapshot(workspace)
    removed = cli(service, "rm", session.id)
    assert f"{session.id} removed" in removed.stdout
    assert session.id not in cli(service, "ls").stdout
    assert json.loads(cli(service, "ls", "--json").stdout) == []
    with service.http() as http:
        assert http.get(f"/api/v1/code/session/{session.id}").status_code == 404
    assert service.leftovers() == []
    assert snapshot(workspace) == before
    again = cli(service, "rm", session.id, check=False)
    assert again.returncode == 1
    assert "no session" in again.stderr
    unknown = cli(service, "rm", "cs-nope", check=False)
    assert unknown.returncode == 1
    assert "no session" in unknown.stderr


def test_errors_are_sentences_and_exit_non_zero(service: Service, tmp_path: Path) -> None:
    missing = cli(service, "start", str(tmp_path / "missing"), check=False)
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr
    unknown = cli(service, "status", "cs-nope", check=False)
    assert unknown.returncode == 1
    assert "no session" in unknown.stderr
    down = subprocess.run(
        [sys.executable, "-m", "codestation.cli", "ls", "--url", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1
    assert "codestation serve" in down.stderr


def test_config_masks_secrets(service: Service, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[environments.hosted]\nenv = { OPENAI_API_KEY = "sk-very-secret" }\n')
    result = subprocess.run(
        [sys.executable, "-m", "codestation.cli", "config"],
        env={**service.env, "CODESTATION_CONFIG": str(config)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["environments"]["hosted"]["env"]["OPENAI_API_KEY"] == "********"
    assert "sk-very-secret" not in result.stdout
    assert str(config) in result.stderr


def test_run_streams_the_reply_prints_the_changes_and_stops(
    start_service: ServiceFactory, model: Model, workspace: Path
) -> None:
    service = start_service(
        environments=json.dumps({"agent": model.environment()}), env={model.env_var: model.key}
    )
    done = cli(service, "run", str(workspace), "please write ran.txt: from the cli", "-e", "agent")
    assert "Wrote ran.txt." in done.stdout
    assert "· write" in done.stderr
    assert "1 added" in done.stderr
    assert re.search(r"A ran\.txt", done.stderr)
    assert (workspace / "ran.txt").read_text() == "from the cli"
    assert [s.status for s in service.client.sessions()] == [Status.STOPPED]

    # --keep leaves it running, and the next run there uses it, and leaves it running.
    kept = cli(service, "run", str(workspace), "just say hi", "-e", "agent", "--keep")
    running = [s for s in service.client.sessions() if s.status is Status.RUNNING]
    assert len(running) == 1, kept.stderr
    again = cli(service, "run", str(workspace), "please write again.txt: more", "-e", "agent")
    assert f"session {running[0].id} (running)" in again.stderr
    assert re.search(r"A again\.txt", again.stderr)
    assert service.client.get(running[0].id).status is Status.RUNNING

    # A turn that fails (a model the provider does not have) exits 1, saying why.
    failed = cli(service, "run", str(workspace), "hello", "-e", "agent",
                 "--model", "scripted/no-such-model", check=False)  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "error" in failed.stderr
