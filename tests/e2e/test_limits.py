"""Resource limits: applied by the runtime that can, shown with the session, and enforced."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import docker

from codestation import SessionInfo, Status
from tests.e2e.conftest import ServiceFactory, agent_pid, run_in_session


def applied(runtime: str, session: SessionInfo) -> dict[str, object]:
    """The limits the engine holds the session to, read from the engine itself."""
    if runtime == "docker":
        engine = docker.from_env()
        host = engine.containers.get(f"codestation-{session.id}").attrs["HostConfig"]
        engine.close()
        return {
            "memory": host["Memory"],
            "cpus": host["NanoCpus"] / 1e9,
            "pids": host["PidsLimit"],
            "tmp": host["Tmpfs"]["/tmp"].rsplit("size=", 1)[1],
        }
    groups = dict(
        line.split(":", 2)[1:]
        for line in Path(f"/proc/{agent_pid(session)}/cgroup").read_text().splitlines()
    )

    def read(controller: str, name: str) -> str:
        return Path(f"/sys/fs/cgroup/{controller}{groups[controller]}/{name}").read_text().strip()

    tmp = subprocess.run(
        ["findmnt", "-N", str(agent_pid(session)), "-no", "OPTIONS", "/tmp"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    size_k = int(tmp.split("size=", 1)[1].split(",")[0].strip().rstrip("k"))
    return {
        "memory": int(read("memory", "memory.limit_in_bytes")),
        "cpus": int(read("cpu", "cpu.cfs_quota_us")) / int(read("cpu", "cpu.cfs_period_us")),
        "pids": int(read("pids", "pids.max")),
        "tmp": f"{size_k // 1024}m",
    }


def test_the_environment_limits_are_applied(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    environments = {"small": {"limits": {"memory": "1g", "cpus": 0.5, "pids": 200, "tmp": "64m"}}}
    service = start_service(environments=json.dumps(environments))
    default = service.client.wait(service.client.start(str(workspace), wait=False).id)
    small = service.client.wait(service.client.start(str(workspace), "small", wait=False).id)
    assert default.limits == {"memory": "4g", "cpus": 2.0, "pids": 1024, "tmp": "1g"}
    assert small.limits == {"memory": "1g", "cpus": 0.5, "pids": 200, "tmp": "64m"}
    assert applied(runtime, small) == {
        "memory": 1024**3, "cpus": 0.5, "pids": 200, "tmp": "64m",
    }  # fmt: skip
    service.client.stop_all()


def test_a_fork_bomb_and_a_full_tmp_stay_inside(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    environments = {"small": {"limits": {"pids": 64, "tmp": "32m"}}}
    service = start_service(environments=json.dumps(environments))
    session = service.client.wait(service.client.start(str(workspace), "small", wait=False).id)
    assert session.status is Status.RUNNING, session.error
    # A bounded fork bomb (perl is in every Debian): children until fork fails, then none.
    code, printed = run_in_session(
        session,
        "perl -e 'my @k; for (1..200) { my $p = fork; last unless defined $p; "
        "if (!$p) { sleep 30; exit 0 } push @k, $p } print qq(started=), scalar(@k), qq(\\n); "
        "kill 9, @k; 1 while wait != -1'",
    )
    assert code == 0, printed
    started = int(printed.split("started=")[1].split()[0])
    assert started < 64, printed
    code, printed = run_in_session(session, "dd if=/dev/zero of=/tmp/fill bs=1M count=100")
    assert code != 0
    assert "No space left on device" in printed
    run_in_session(session, "rm -f /tmp/fill")
    assert service.client.session(session.id).status is Status.RUNNING
    service.client.stop(session.id)


def test_running_out_of_memory_fails_the_session_and_says_so(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    # OpenCode needs a few hundred MB; 64 MB is not enough to start.
    environments = {"tiny": {"limits": {"memory": "64m"}}}
    service = start_service(environments=json.dumps(environments))
    session = service.client.wait(service.client.start(str(workspace), "tiny", wait=False).id)
    assert session.status is Status.FAILED
    assert session.error is not None
    assert "out of memory" in session.error
    assert service.leftovers() == []
