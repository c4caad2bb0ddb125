"""What an agent can reach from inside its sandbox, tried from inside through OpenCode's shell."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, agent_pid, run_in_session


def running(service: Service, workspace: Path) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.RUNNING, session.error
    return session


@pytest.mark.runtimes("bwrap")
@pytest.mark.parametrize("owner", [0, 4321], ids=["root-owned", "user-owned"])
def test_bwrap_confines_the_agent(
    service: Service, workspace: Path, tmp_path: Path, owner: int
) -> None:
    for path in [workspace, *workspace.rglob("*")]:
        os.chown(path, owner, owner)
    other = tmp_path / "other-workspace"
    other.mkdir()
    (other / "secret.txt").write_text("not yours")
    session = running(service, workspace)

    def ok(script: str) -> bool:
        return run_in_session(session, script)[0] == 0

    # Only the workspace is writable.
    assert ok("echo inside > /workspace/made-inside")
    assert (workspace / "made-inside").read_text() == "inside\n"
    for target in ("/etc/escape", "/usr/escape", "/usr/bin/escape", "/opt/opencode/bin/x"):
        assert not ok(f"echo x > {target}"), target
    assert not ok("mkdir /escape")
    assert ok("echo scratch > /tmp/scratch")  # a private /tmp, not the host's
    assert not Path("/tmp/scratch").exists()
    # The host's homes, other workspaces and codestation's data are not there at all.
    for hidden in (service.data_dir, service.data_dir / "codestation.db", other, "/root", "/home"):
        assert not ok(f"test -e {hidden}"), hidden
    assert not ok(f"cat {service.data_dir}/codestation.db")
    # Its own PID and UTS namespaces, no new privileges, no capabilities.
    assert ok("test $(ls /proc | grep -c '^[0-9]') -lt 12")
    assert run_in_session(session, "hostname")[1].strip() == f"codestation-{session.id}"
    assert ok("grep -q 'NoNewPrivs:.*1' /proc/self/status")
    assert ok("grep -q 'CapEff:.*0000000000000000' /proc/self/status")
    assert run_in_session(session, "id -u")[1].strip() == str(owner)
    service.client.stop(session.id)
    assert (workspace / "made-inside").exists()
    assert (other / "secret.txt").read_text() == "not yours"


def test_a_crashed_agent_is_noticed(service: Service, workspace: Path) -> None:
    session = running(service, workspace)
    os.kill(agent_pid(session), signal.SIGKILL)
    for _ in range(100):  # the watcher polls every second
        failed = service.client.session(session.id)
        if failed.status is Status.FAILED:
            break
        time.sleep(0.1)
    assert failed.status is Status.FAILED
    assert failed.error is not None
    assert "OpenCode stopped unexpectedly" in failed.error
    assert "status" in failed.error
    assert "last log lines" in failed.error
    assert service.leftovers() == []


def test_opencode_finds_its_configuration_in_place_and_installs_nothing(
    service: Service, workspace: Path
) -> None:
    """OpenCode installs its plugin SDK into its configuration directory whenever it loads a
    project: in a fresh sandbox, a download and some 95 MB of the in-memory /tmp at every
    start. Each sandbox gets it ready-made and read-only instead, the rest of ~/.config
    writable."""
    for path in [workspace, *workspace.rglob("*")]:
        os.chown(path, 4321, 4321)
    session = running(service, workspace)
    # The project is loaded (codestation asks the agent what it is doing every 3 s); give any
    # install it would start time to run.
    time.sleep(10)
    code, printed = run_in_session(
        session,
        "grep -h '\"name\"' ~/.config/opencode/node_modules/@opencode-ai/plugin/package.json; "
        "echo tmp-kib=$(du -skx /tmp | cut -f1); "
        "touch ~/.config/opencode/changed && echo config-written; "
        "mkdir -p ~/.config/other && touch ~/.config/other/x && echo other-written",
    )
    assert code == 0, printed
    assert '"name": "@opencode-ai/plugin"' in printed, printed
    used_kib = int(printed.split("tmp-kib=")[1].split()[0])
    assert used_kib < 16 * 1024, f"the sandbox's /tmp holds {used_kib} KiB: {printed}"
    assert "config-written" not in printed, printed
    assert "other-written" in printed, printed
