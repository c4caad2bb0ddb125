"""A workspace swapped for a symlink while its session starts never moves the mount.

The attack: ask for a session on your own directory, and in the moment between codestation's
check and the sandbox's mount (the image build can take minutes) replace the directory with a
symlink to somewhere you may not have, here codestation's own data directory. The sandbox must
mount the directory that was checked, or fail the start; never the link's target.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from codestation import SessionInfo, Status, WorkspaceRejected
from codestation.config import Settings
from codestation.runtimes import Exit, LaunchSpec, make_runtimes
from codestation.workspaces import Workspace, open_workspace
from tests.e2e.conftest import Service, run_in_session


def swap_forever(path: Path, target: Path, stop: threading.Event, swaps: list[int]) -> None:
    """Swap `path` between its directory and a symlink to `target` until `stop`, counting
    swaps in `swaps[0]`. The directory stands a little longer than the link, so that some
    starts get past the check and meet the swap later, at the mount."""
    aside = path.with_name(path.name + ".aside")
    while not stop.is_set():
        path.rename(aside)
        path.symlink_to(target)
        time.sleep(0.0005)
        path.unlink()
        aside.rename(path)
        swaps[0] += 1
        time.sleep(0.002)


def test_starts_during_a_swap_loop_mount_the_checked_directory_or_fail(
    service: Service, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "marker").write_text("the real project\n")
    stop, counted = threading.Event(), [0]
    swapper = threading.Thread(target=swap_forever, args=(project, service.data_dir, stop, counted))
    swapper.start()
    started: list[str] = []
    refused = 0
    try:
        rounds = 0
        # Until a few got past the check, with the loop swapping all along.
        while (len(started) < 4 or counted[0] <= 100) and rounds < 40:
            rounds += 1
            for _ in range(2):
                try:
                    started.append(service.client.start(str(project), wait=False).id)
                except WorkspaceRejected:
                    refused += 1  # the check saw the link, or the path in mid-swap
            time.sleep(0.2)
    finally:
        stop.set()
        swapper.join()
    assert counted[0] > 100, counted  # the loop really ran while the starts were checked
    assert started, f"every start was refused at the check ({refused})"
    assert project.is_dir()
    assert not project.is_symlink()
    sessions: list[SessionInfo] = [service.client.wait(sid, timeout=180) for sid in started]
    running: list[SessionInfo] = []
    for s in sessions:
        if s.status is Status.FAILED:  # the mount by path lost the race: the guard says so,
            said = (s.error or "").lower()  # or the engine found no directory there at all
            assert "was replaced while the session started" in said or any(
                gone in said for gone in ("does not exist", "no such file")
            ), said
        else:
            assert s.status is Status.RUNNING, s.error
            running.append(s)
    # Once the swapping stops, a start runs on the real directory.
    after = service.client.wait(service.client.start(str(project), wait=False).id, timeout=180)
    assert after.status is Status.RUNNING, after.error
    checked: list[SessionInfo] = [*running, after]
    for s in checked:
        code, printed = run_in_session(s, "cat /workspace/marker; ls /workspace")
        assert code == 0, printed
        assert "the real project" in printed
        assert "codestation.db" not in printed
        service.client.stop(s.id)


def test_the_guard_stops_opencode_on_any_other_directory(
    service: Service, tmp_path: Path, runtime: str
) -> None:
    """The loop above may or may not hit the last instant before the mount; make it certain.
    The sandbox gets the checked directory's descriptor but another directory's identity,
    exactly what a swap between the check and an engine's mount by path leaves: OpenCode must
    never start."""
    checked, other = tmp_path / "checked", tmp_path / "other"
    checked.mkdir()
    other.mkdir()
    settings = Settings(data_dir=service.data_dir)
    engine = make_runtimes(settings)[runtime]
    held = open_workspace(str(checked), [tmp_path], [])
    seen = os.stat(other)
    impostor = Workspace(other, held.fd, 0, 0, seen.st_dev, seen.st_ino)
    spec = LaunchSpec(
        session_id="cs-guardtestaaaaaaa",
        workspace=impostor,
        address="127.0.0.1",
        port=service.ports[0],
        env={"OPENCODE_SERVER_PASSWORD": "x"},
        profile=settings.environments["default"],
        limits=settings.limits,
        uid=0,
        gid=0,
    )

    async def run() -> tuple[Exit, str]:
        state = await engine.start(spec)
        held.close()
        try:
            deadline = time.monotonic() + 30
            while (ended := await engine.poll(spec.session_id, state)) is None:
                assert time.monotonic() < deadline, "OpenCode kept running"
                await asyncio.sleep(0.1)
            return ended, await engine.logs(spec.session_id, state, 20)
        finally:
            await engine.stop(spec.session_id, state, 0)
            await engine.close()

    ended, logged = asyncio.run(run())
    assert ended.code == 97, ended
    assert "/workspace was replaced while the session started" in logged
    assert "opencode server listening" not in logged
