"""Slots: how a workspace is handed to a sandbox that is already running (the warm pool).

A sandbox started ahead of need has no workspace yet. It gets a *slot* instead: an empty
directory under the data directory, made a shared mount on the host, that the sandbox mounts
at /workspace as a slave (Docker: `rslave` propagation; bubblewrap's mounts are slaves of the
host's). When a start claims the sandbox, the workspace is mounted onto the slot on the host,
and the mount propagates into the sandbox: /workspace is then the project, while OpenCode
runs on.

Everything is mounted by descriptor (`open_tree` clones the very directory the checks
opened, `move_mount` puts it on the slot), never by a path someone could swap. The paths a
session pins (`.git`, its `config` and `hooks`) are cloned the same way and set read-only
*before* they are attached: a read-only flag set afterwards would not propagate into the
sandbox. Releasing a slot only unmounts and removes the empty directory: never a file of
the workspace.

Mounting needs root (CAP_SYS_ADMIN): `supported()` says whether this process can. The new
mount calls need Linux 5.12 (`mount_setattr`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import struct
import threading
from pathlib import Path

from codestation.errors import StartFailed
from codestation.workspaces import Workspace, open_beneath

# Linux's mount calls. The numbers are the same on every architecture (since 5.1, new calls
# share one table).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_MS_BIND = 0x1000
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _checked(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _mount(source: str | None, target: str, flags: int) -> None:
    _checked(
        _libc.mount(
            source.encode() if source else None, target.encode(), None, ctypes.c_ulong(flags), None
        ),
        f"mount {target}",
    )


def _clone(fd: int, *, recursive: bool, read_only: bool) -> int:
    """A detached copy of the mount tree at the open file `fd`: never set-uid or device files
    (as bubblewrap's own binds), read-only if asked."""
    flags = _AT_EMPTY_PATH | _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
    tree = _checked(
        _libc.syscall(_SYS_OPEN_TREE, fd, b"", flags | (_AT_RECURSIVE if recursive else 0)),
        "open_tree",
    )
    wanted = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | (_MOUNT_ATTR_RDONLY if read_only else 0)
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", wanted, 0, 0, 0))
    try:
        _checked(
            _libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, attr, 32),
            "mount_setattr",
        )
    except BaseException:
        os.close(tree)
        raise
    return tree


def _attach(tree: int, target: int) -> None:
    """Put the detached tree `tree` on the open file `target`; it propagates to the slaves."""
    try:
        flags = _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH
        _checked(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", target, b"", flags), "move_mount")
    finally:
        os.close(tree)


def supported() -> bool:
    """Whether this process may mount (root): else sandboxes cannot be started ahead."""
    return os.geteuid() == 0


class Slots:
    """The slots of one data directory: `<data_dir>/slots/<session id>`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # One lock per slot: a release (a stop) never runs beside a fill of the same slot.
        self._locks: collections.defaultdict[str, threading.Lock] = collections.defaultdict(
            threading.Lock
        )

    def path(self, session_id: str) -> Path:
        return self.directory / session_id

    def make(self, session_id: str) -> Path:
        """An empty slot for `session_id`, a shared mount of its own (idempotent)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        slot = self.path(session_id)
        slot.mkdir(mode=0o755, exist_ok=True)
        if not _mounted(slot):
            _mount(str(slot), str(slot), _MS_BIND)
        _mount(None, str(slot), _MS_SHARED)
        return slot

    def fill(self, session_id: str, workspace: Workspace) -> None:
        """Mount `workspace` on the session's slot, then each pinned path over itself,
        read-only where it should be (StartFailed if a path is not what was pinned)."""
        with self._locks[session_id]:
            self._fill(session_id, workspace)

    def _fill(self, session_id: str, workspace: Workspace) -> None:
        slot = self.path(session_id)
        top = os.open(slot, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _attach(_clone(workspace.fd, recursive=True, read_only=False), top)
        finally:
            os.close(top)
        for pin in workspace.pinned:  # parents first: each lands on what the last attached
            try:
                target = open_beneath(slot, pin.relative.split("/"))
            except OSError:
                raise StartFailed(
                    f"{pin.relative} in the workspace was removed or replaced while the session "
                    "started; start it again."
                ) from None
            try:
                found = os.fstat(target)
                if (found.st_dev, found.st_ino) != (pin.device, pin.inode):
                    raise StartFailed(
                        f"{pin.relative} in the workspace was replaced while the session "
                        "started; start it again."
                    )
                _attach(_clone(pin.fd, recursive=False, read_only=pin.read_only), target)
            finally:
                os.close(target)

    def release(self, session_id: str) -> None:
        """Unmount everything on the slot and remove its (empty) directory. Idempotent."""
        with self._locks[session_id]:
            self._release(session_id)
        self._locks.pop(session_id, None)

    def _release(self, session_id: str) -> None:
        slot = self.path(session_id)
        # Each unmount lifts the top mount (with all under it): the workspace, then the
        # slot's own bind. A directory that is not a mount point ends the loop.
        for _ in range(8):
            if _libc.umount2(str(slot).encode(), _MNT_DETACH | _UMOUNT_NOFOLLOW) < 0:
                break
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(slot)  # empty once unmounted; a non-empty one raises, and stays

    def ids(self) -> set[str]:
        """The sessions that have a slot (a service that died may have left some)."""
        if not self.directory.is_dir():
            return set()
        return {slot.name for slot in self.directory.iterdir()}


def verify(root: str, workspace: Workspace) -> None:
    """Check, through `root` (the sandbox's file system as the host sees it, e.g.
    /proc/<pid>/root), that /workspace and each pinned path are the files that were checked:
    the workspace guard of a cold start, for a workspace handed over later."""
    for path, wanted in workspace.identities().items():
        try:
            found = os.stat(f"{root}{path}", follow_symlinks=False)
            got = f"{found.st_dev}:{found.st_ino}"
        except OSError as exc:
            got = f"unreadable ({exc.strerror})"
        if got != wanted:
            raise StartFailed(
                f"{path} in the sandbox is not the workspace that was checked ({got}, not "
                f"{wanted}); start the session again."
            )


def _mounted(path: Path) -> bool:
    """Whether `path` is a mount point (bind mounts included, which st_dev cannot tell)."""
    wanted = str(path)
    with open("/proc/self/mountinfo") as table:
        return any(_unescaped(line.split()[4]) == wanted for line in table)


def _unescaped(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
