"""Tokens and users from the command line, against the real service and its data directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from codestation import Client, Unauthorized
from tests.e2e.conftest import Service, ServiceFactory

pytestmark = pytest.mark.runtimes("bwrap")


def test_the_first_start_makes_one_admin_and_prints_its_link_once(service: Service) -> None:
    log = service.log.read_text()
    links = re.findall(r"http://127\.0\.0\.1:\d+/login\?token=(csl_\S+)", log)
    assert len(links) == 1  # a one-time code, not the token
    assert service.token not in log
    token_file = Path(service.env["CODESTATION_TOKEN_FILE"])
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() == service.token
    service.restart()
    assert re.findall(r"/login\?token=", service.log.read_text()) == ["/login?token="]
    users = json.loads(service.cli("user", "ls", "--json").stdout)
    assert [(u["user"], u["admin"], u["tokens"]) for u in users] == [("admin", True, 1)]


def test_under_systemd_the_first_start_writes_no_login_link_to_the_journal(
    launch_service: ServiceFactory,
) -> None:
    """systemd sets JOURNAL_STREAM when the log is the journal, which the adm and
    systemd-journal groups read: the one-time link would be anyone's of them."""
    service = launch_service(runtime="bwrap", env={"JOURNAL_STREAM": "8:12345"})
    log = service.log.read_text()
    assert "/login?token=" not in log
    token_id = service.token.split("_")[1]
    assert f"`codestation token link {token_id}`" in log
    link = service.login_link()  # as the README says to make one
    assert "/login?token=csl_" in link


def test_create_list_revoke_with_the_service_running_or_not(service: Service) -> None:
    made = service.cli("token", "create", "--user", "alice", "--note", "laptop")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert made.stdout == token + "\n"  # alone on stdout, for $(...)
    assert re.fullmatch(r"cst_[a-z2-7]{8}_[A-Za-z0-9_-]{43}", token)
    alice = service.client_for(token)
    assert alice.me().user == "alice"
    assert not alice.me().admin
    listed = service.cli("token", "list", "--json")
    assert token.split("_", 2)[2] not in listed.stdout  # never the secret
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    token_id = token.split("_")[1]
    assert rows[token_id]["user"] == "alice"
    assert rows[token_id]["note"] == "laptop"
    assert rows[token_id]["last_used_at"] is not None
    # Revoked while the service runs: refused at the very next request.
    assert service.cli("token", "revoke", token_id).returncode == 0
    with pytest.raises(Unauthorized, match="not valid"):
        alice.sessions()
    missing = service.cli("token", "revoke", token_id)
    assert missing.returncode == 1
    assert "no token" in missing.stderr
    # With the service stopped: the same data directory, the same tokens.
    service.stop_process()
    offline = service.cli("token", "create", "--user", "bob", "--admin")
    assert offline.returncode == 0, offline.stderr
    users = {u["user"]: u for u in json.loads(service.cli("user", "ls", "--json").stdout)}
    assert users["bob"]["admin"]
    assert users["alice"]["tokens"] == 0
    service.restart()
    assert service.client_for(offline.stdout.strip()).me().user == "bob"


def test_a_token_that_expires_stops_working(service: Service) -> None:
    token = service.make_token("carol", expires="0.00003")  # about 2.6 s
    carol = service.client_for(token)
    assert carol.sessions() == []
    time.sleep(3)
    with pytest.raises(Unauthorized):
        carol.sessions()


@pytest.mark.parametrize("name", ["Alice", "../etc", "a b", ""])
def test_bad_user_names_are_refused(service: Service, name: str) -> None:
    made = service.cli("token", "create", "--user", name)
    assert made.returncode == 1
    assert "not allowed" in made.stderr
    assert made.stdout == ""


def test_the_cli_finds_its_token_in_order(service: Service, tmp_path: Path) -> None:
    alice = service.make_token("alice")
    token_file = Path(service.env["CODESTATION_TOKEN_FILE"])

    def whoami(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "codestation.cli", "ls", "--json", *args],
            env={**service.env, "CODESTATION_URL": service.url, **env},
            capture_output=True,
            text=True,
        )

    assert whoami().returncode == 0  # the token file: the admin's
    assert whoami("--token", alice).returncode == 0
    assert whoami(CODESTATION_TOKEN=alice).returncode == 0
    bad = whoami("--token", "cst_aaaaaaaa_nope")
    assert bad.returncode == 1
    assert "not valid" in bad.stderr
    token_file.chmod(0o644)
    loose = whoami()
    assert loose.returncode == 1
    assert "chmod 600" in loose.stderr
    token_file.unlink()
    none = whoami()
    assert none.returncode == 1
    assert "No token was given" in none.stderr
    assert "CODESTATION_TOKEN" in none.stderr


def test_the_python_client_takes_a_token_or_the_environment(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(service.url, token=service.token) as cs:
        assert cs.me().admin
        assert service.token not in repr(cs._http.headers)  # httpx masks it
    monkeypatch.setenv("CODESTATION_TOKEN", service.token)
    with Client(service.url) as cs:
        assert cs.me().user == "admin"
    monkeypatch.delenv("CODESTATION_TOKEN")
    with Client(service.url) as cs, pytest.raises(Unauthorized, match="token create"):
        cs.sessions()


def test_a_401_says_how_to_get_in(service: Service) -> None:
    answer = httpx.get(f"{service.url}/api/v1/code/sessions")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    body = answer.json()
    assert body["code"] == "unauthorized"
    assert "Authorization: Bearer" in body["error"]
    assert "codestation token create --user NAME" in body["error"]
    assert f"{service.url}/login" in body["error"]


def test_no_token_or_password_in_command_lines_or_logs(service: Service, workspace: Path) -> None:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    secrets = [service.token, session.auth.password]
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not [s for s in secrets if s in argv], (proc.name, argv)
    assert os.getuid() == 0  # root: every process's command line was readable
    # Nor in OpenCode's log as codestation shows it, nor in codestation's own.
    shown = service.client.logs(session.id)
    assert "opencode server listening" in shown
    service.client.stop(session.id)
    shown += service.client.logs(session.id)
    logged = service.log.read_text()
    for secret in secrets:
        assert secret not in shown
        assert secret not in logged
