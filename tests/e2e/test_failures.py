"""A start that cannot succeed ends `failed`, with the reason and log lines, leaving nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from codestation import Status
from codestation.image import FALLBACK_BASE
from codestation.ports import port_is_free
from tests.e2e.conftest import ServiceFactory


def test_a_start_that_times_out_fails_and_cleans_up(
    start_service: ServiceFactory, workspace: Path
) -> None:
    # OpenCode needs about 2-3 s to answer; half a second is never enough.
    service = start_service(start_timeout="0.5")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.FAILED
    assert session.error is not None
    assert "did not answer" in session.error
    assert "start_timeout" in session.error
    assert session.stopped_at is not None
    assert service.leftovers() == []
    assert port_is_free("127.0.0.1", session.port)
    assert (workspace / "README.md").exists()


def test_an_agent_that_exits_fails_with_its_log(
    start_service: ServiceFactory, workspace: Path
) -> None:
    # A home it cannot create its state in (it runs as the workspace's owner, not root):
    # OpenCode exits at once, saying why in its log.
    os.chown(workspace, 4321, 4321)
    environments = {"broken": {"env": {"HOME": "/nonexistent"}}}
    service = start_service(environments=json.dumps(environments))
    started = service.client.start(str(workspace), environment="broken", wait=False)
    session = service.client.wait(started.id, timeout=120)
    assert session.status is Status.FAILED, session
    assert session.error is not None
    assert "OpenCode ended before it was ready: OpenCode exited with status 1" in session.error
    assert "last log lines" in session.error
    assert service.client.logs(session.id).strip()
    assert service.leftovers() == []


def test_an_image_without_opencode_fails_cleanly(
    start_service: ServiceFactory, workspace: Path, runtime: str
) -> None:
    # The debootstrap base exists wherever the sandbox image was built from it; elsewhere the
    # pulled base stands in. Either lacks OpenCode.
    environments = {"bare": {"image": FALLBACK_BASE}}
    service = start_service(environments=json.dumps(environments))
    session = service.client.wait(
        service.client.start(str(workspace), "bare", wait=False).id, timeout=120
    )
    assert session.status is Status.FAILED
    assert session.error is not None
    # Docker finds no OpenCode in it; bubblewrap runs no images, and says so.
    assert ("opencode" if runtime == "docker" else "only the Docker runtime") in session.error
    assert service.leftovers() == []
    assert port_is_free("127.0.0.1", session.port)
