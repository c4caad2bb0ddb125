"""A session's log stays within `log_max_size` however much its agent prints, in both runtimes,
and its latest lines are still there to read and follow."""

from __future__ import annotations

import time
from pathlib import Path

import docker

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, ServiceFactory, run_in_session

# Print into OpenCode's own output (its log) from the agent's shell: the server's stdout.
SPEW = (
    "pid=$(grep -l serve /proc/[0-9]*/cmdline | head -1 | cut -d/ -f3); "
    "i=0; while [ $i -lt {lines} ]; do echo \"{marker} line $i $(printf '%080d' 0)\"; "
    "i=$((i+1)); done >> /proc/$pid/fd/1"
)


def log_files(service: Service, runtime: str, session: SessionInfo) -> list[Path]:
    if runtime == "docker":
        engine = docker.from_env()
        path = engine.containers.get(f"codestation-{session.id}").attrs["LogPath"]
        engine.close()
        return sorted(Path(path).parent.glob(Path(path).name + "*"))
    return sorted((service.data_dir / "logs").glob(f"{session.id}.log*"))


def test_the_log_stays_within_log_max_size(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    service = start_service(log_max_size="64k")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error
    code, printed = run_in_session(session, SPEW.format(lines=20000, marker="spew"))  # ~1.8 MB
    assert code == 0, printed
    deadline = time.monotonic() + 10
    while sum(p.stat().st_size for p in log_files(service, runtime, session)) > 3 * 65536:
        sizes = {p.name: p.stat().st_size for p in log_files(service, runtime, session)}
        assert time.monotonic() < deadline, f"the log was not kept small: {sizes}"
        time.sleep(0.5)
    # The newest lines are still there.
    assert "spew line 19999" in service.client.logs(session.id, tail=50)
    # And a follower keeps getting lines across rotations.
    follower = service.client.follow_logs(session.id, tail=1)
    next(follower)
    run_in_session(session, SPEW.format(lines=2000, marker="after"))  # past the size: rotated
    time.sleep(2)
    run_in_session(session, SPEW.format(lines=1, marker="final"))
    seen = ""
    for chunk in follower:
        seen += chunk
        if "final line 0" in seen:
            break
    service.client.stop(session.id)
