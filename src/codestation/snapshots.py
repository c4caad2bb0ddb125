"""Each live session's snapshot of its workspace, for `changes`: where it is kept, when it is
taken and when it goes. How a snapshot is taken and compared is `changes.py`'s.

A snapshot is taken as the session starts, while its sandbox is prepared (the agent does
nothing before its first prompt), and goes when the session stops or fails; one left by a
service that died is swept at the next start. It names the directory it was taken of (device
and inode), so a report never compares it with another directory put at the same path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from codestation import changes
from codestation.changes import Changes
from codestation.errors import NotRunning, WorkspaceRejected
from codestation.workspaces import Workspace

log = logging.getLogger(__name__)
_ROOT = "root"  # the device:inode of the directory a snapshot was taken of


class Snapshots:
    def __init__(self, directory: Path, limits: changes.Limits = changes.Limits()) -> None:
        self.directory = directory
        self.limits = limits

    def _store(self, session_id: str) -> Path:
        return self.directory / session_id

    async def take(self, session_id: str, workspace: Workspace) -> None:
        """Snapshot `workspace` for `session_id`. A failure is logged, not raised: the session
        runs without one, and its `changes` say so."""
        # A descriptor of our own, closed by the thread: the caller's may close (and its number
        # be reused) while the thread still walks.
        root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=workspace.fd)
        store = self._store(session_id)
        try:
            await asyncio.shield(asyncio.to_thread(self._take, root, store))
        except OSError as exc:
            log.warning("session %s: no snapshot of its workspace: %s", session_id, exc)
            changes.discard(store)

    def _take(self, root: int, store: Path) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            changes.take(root, store, limits=self.limits)
            found = os.fstat(root)
            (store / _ROOT).write_text(f"{found.st_dev}:{found.st_ino}")
        finally:
            os.close(root)

    async def report(self, session_id: str, path: Path) -> Changes:
        """What changed in the workspace at `path` since the session's snapshot."""
        return await asyncio.to_thread(self._report, self._store(session_id), path)

    def _report(self, store: Path, path: Path) -> Changes:
        try:
            taken_of = (store / _ROOT).read_text()
        except FileNotFoundError:
            raise NotRunning(
                "this session has no snapshot of its workspace (it could not be taken, or the "
                "session started before codestation kept them), so what changed is unknown."
            ) from None
        try:
            root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise WorkspaceRejected(f"the workspace {path} cannot be opened now: {exc}") from exc
        try:
            found = os.fstat(root)
            if f"{found.st_dev}:{found.st_ino}" != taken_of:
                raise WorkspaceRejected(
                    f"{path} is no longer the directory the session started on (it was moved "
                    "or replaced), so there is nothing to compare."
                )
            return changes.report(root, store, limits=self.limits)
        finally:
            os.close(root)

    def discard(self, session_id: str) -> None:
        changes.discard(self._store(session_id))

    def sweep(self, live: set[str]) -> None:
        """Remove the snapshots of sessions no longer live (left by a service that died)."""
        if not self.directory.is_dir():
            return
        for store in self.directory.iterdir():
            if store.name not in live:
                shutil.rmtree(store, ignore_errors=True)
