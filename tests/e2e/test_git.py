"""The agent cannot make the user's own git run code on the host later: `.git/config` and
`.git/hooks` are read-only in the sandbox (unless the environment says `git_writable`), and
`.git` cannot be swapped for another; a commit by the agent still works."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from codestation import SessionInfo, Status
from tests.e2e.conftest import ServiceFactory, run_in_session


def git(workspace: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(workspace), "-c", "user.name=u", "-c", "user.email=u@example.com",
         *args],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


@pytest.fixture
def repository(workspace: Path) -> Path:
    git(workspace, "init", "-q", "-b", "main")
    git(workspace, "add", ".")
    git(workspace, "commit", "-q", "-m", "first")
    return workspace


PLANT = {
    "fsmonitor": "git -C /workspace config core.fsmonitor 'touch /tmp/escaped #'",
    "hooks_path": "git -C /workspace config core.hooksPath /workspace/h",
    "hook": "printf '#!/bin/sh\\ntouch /tmp/escaped\\n' > /workspace/.git/hooks/post-checkout",
    "config_edit": "echo '[core] fsmonitor = x' >> /workspace/.git/config",
    "config_replace": "cp /workspace/.git/config /tmp/c && mv -f /tmp/c /workspace/.git/config",
    "hooks_replace": "mv /workspace/.git/hooks /workspace/.git/old-hooks",
    "git_moved": "mv /workspace/.git /workspace/.git-old",
}


def running(start_service: ServiceFactory, workspace: Path, environment: str) -> SessionInfo:
    environments = {"open": {"git_writable": True}}
    service = start_service(environments=json.dumps(environments))
    session = service.client.wait(service.client.start(str(workspace), environment, wait=False).id)
    assert session.status is Status.RUNNING, session.error
    return session


def test_the_agent_cannot_plant_code_for_the_user_s_git(
    start_service: ServiceFactory, repository: Path
) -> None:
    config = (repository / ".git" / "config").read_bytes()
    hooks = sorted(p.name for p in (repository / ".git" / "hooks").iterdir())
    session = running(start_service, repository, "default")
    for name, script in PLANT.items():
        code, printed = run_in_session(session, script)
        assert code != 0, f"{name}: the agent could do it: {printed}"
    assert (repository / ".git" / "config").read_bytes() == config
    assert sorted(p.name for p in (repository / ".git" / "hooks").iterdir()) == hooks
    # Work goes on: the agent commits, and the user sees the commit.
    code, printed = run_in_session(
        session,
        "cd /workspace && echo changed > README.md && git add README.md && "
        "git -c user.name=agent -c user.email=agent@example.com commit -q -m 'by the agent'",
    )
    assert code == 0, printed
    assert "by the agent" in git(repository, "log", "--format=%s")
    git(repository, "status")  # the user's git, on the host
    assert not Path("/tmp/escaped").exists()


def test_git_writable_lets_the_agent_change_the_config(
    start_service: ServiceFactory, repository: Path
) -> None:
    session = running(start_service, repository, "open")
    code, printed = run_in_session(session, "git -C /workspace config codestation.test yes")
    assert code == 0, printed
    assert git(repository, "config", "codestation.test").strip() == "yes"


def test_a_workspace_that_is_not_a_repository_is_not_touched(
    start_service: ServiceFactory, workspace: Path
) -> None:
    session = running(start_service, workspace, "default")
    assert not (workspace / ".git").exists()
    code, printed = run_in_session(session, "cd /workspace && git init -q && echo made")
    assert code == 0, printed
