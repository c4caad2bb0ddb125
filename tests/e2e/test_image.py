"""The sandbox image is built on a session's first need, once, and reused after."""

from __future__ import annotations

import contextlib
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from codestation import SessionInfo, Settings, Status
from codestation.image import FALLBACK_BASE, image_tag
from tests.e2e.conftest import ServiceFactory

pytestmark = pytest.mark.serial  # it removes and rebuilds the sandbox image every other test uses


def run(container: Container, script: str) -> str:
    output = container.exec_run(["sh", "-c", script]).output
    assert isinstance(output, bytes)
    return output.decode()


@pytest.mark.runtimes("docker")
def test_a_missing_image_is_built_on_first_need_and_then_reused(
    start_service: ServiceFactory, workspace: Path
) -> None:
    tag = image_tag(Settings())
    engine = docker.from_env()
    engine.images.remove(tag, force=True)
    service = start_service()

    steps: list[str] = []

    def seen(info: SessionInfo) -> None:
        if info.step and info.step not in steps:
            steps.append(info.step)

    first = service.client.wait(service.client.start(str(workspace), wait=False).id, on_update=seen)
    assert first.status is Status.RUNNING, first.error
    # The build shows as a step of its own, before OpenCode is launched.
    assert steps.index("preparing the sandbox") < steps.index("waiting for OpenCode"), steps
    built = engine.images.get(tag)
    assert built.attrs["Config"]["Labels"]["org.codestation.sandbox"] == "true"
    service.client.stop(first.id)

    second = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert second.status is Status.RUNNING, second.error
    assert engine.images.get(tag).id == built.id  # not rebuilt
    container = engine.containers.get(f"codestation-{second.id}")
    assert container.image is not None
    assert container.image.id == built.id
    # The image holds the pinned OpenCode, executable by anyone, and the agent's tools.
    version = run(container, "opencode --version").strip()
    assert version == Settings().opencode_version
    script = "stat -c %a /usr/local/bin/opencode; for t in git rg curl; do command -v $t; done"
    tools = run(container, script)
    assert tools.split()[0] == "755"
    assert all(t in tools for t in ("/git", "/rg", "/curl"))
    service.client.stop(second.id)
    engine.close()


@pytest.mark.runtimes("docker")
def test_another_base_image_makes_another_sandbox_image(
    start_service: ServiceFactory, workspace: Path
) -> None:
    engine = docker.from_env()
    default_tag = image_tag(Settings())
    engine.images.get(FALLBACK_BASE).tag("codestation-test-base", "other")
    other = Settings(sandbox_base_image="codestation-test-base:other")
    tag = image_tag(other)
    assert tag != default_tag
    try:
        service = start_service(sandbox_base_image=other.sandbox_base_image)
        session = service.client.wait(service.client.start(str(workspace), wait=False).id)
        assert session.status is Status.RUNNING, session.error
        container = engine.containers.get(f"codestation-{session.id}")
        assert container.image is not None
        assert container.image.id == engine.images.get(tag).id
        service.client.stop(session.id)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(tag, force=True)
        engine.images.remove("codestation-test-base:other")
        engine.close()
