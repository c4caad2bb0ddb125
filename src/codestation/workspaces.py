"""The rules a directory must meet before an agent may work in it, and the handle that keeps it.

A workspace is resolved once, opened once (every component walked without following a
symlink) and from then on known by that open directory, not by its name: the checks, the owner
the agent runs as and the mount all see the same directory, even if someone swaps the path for
a symlink while the sandbox is being prepared (which can take minutes).

A git repository's `.git/config` and `.git/hooks` say what the user's own git runs, on the
host, at their next `git status`: `core.fsmonitor`, hooks. So they are *pinned*: held open
like the workspace, and mounted read-only over themselves in the sandbox, with the `.git`
directory mounted over itself too (a mount point cannot be renamed or removed, so the agent
cannot put a fresh `.git` in its place). The agent can still commit: objects, refs and the
index stay writable.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from codestation.errors import WorkspaceRejected


@dataclass
class Pinned:
    """A path inside the workspace that the sandbox mounts over itself, held open (O_PATH)."""

    relative: str  # e.g. ".git/config"
    fd: int
    device: int
    inode: int
    read_only: bool

    @property
    def current_path(self) -> str:
        return os.readlink(f"/proc/self/fd/{self.fd}")


@dataclass
class Workspace:
    """An open directory: `fd` (O_PATH) holds it; `path` is where it was when it was checked.
    `pinned`: what inside it the sandbox mounts over itself, parents first."""

    path: Path
    fd: int
    uid: int
    gid: int
    device: int
    inode: int
    pinned: list[Pinned] = field(default_factory=list)

    @property
    def current_path(self) -> str:
        """Where the directory is now (it follows a rename; never a symlink put in its place)."""
        return os.readlink(f"/proc/self/fd/{self.fd}")

    def identities(self) -> dict[str, str]:
        """`device:inode` of /workspace and of each pinned path, as the sandbox must see them."""
        ids = {"/workspace": f"{self.device}:{self.inode}"}
        for pin in self.pinned:
            ids[f"/workspace/{pin.relative}"] = f"{pin.device}:{pin.inode}"
        return ids

    def pin_git(self) -> None:
        """Pin `.git` (a directory, or the file a worktree has), its `config` and `hooks`.
        Whatever is missing, or is a symlink, is left alone (a symlink is not followed)."""
        git = self._open(self.fd, ".git", read_only=False)
        if git is None:
            return
        if not stat.S_ISDIR(os.fstat(git.fd).st_mode):
            git.read_only = True  # `gitdir: ...`: what it points to lies outside the sandbox
            return
        for name in ("config", "hooks"):
            self._open(git.fd, name, read_only=True, under=".git/")

    def _open(self, parent: int, name: str, *, read_only: bool, under: str = "") -> Pinned | None:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent)
        except FileNotFoundError:
            return None
        info = os.fstat(fd)
        if stat.S_ISLNK(info.st_mode):
            os.close(fd)
            return None
        pin = Pinned(under + name, fd, info.st_dev, info.st_ino, read_only)
        self.pinned.append(pin)
        return pin

    def close(self) -> None:
        for pin in self.pinned:
            os.close(pin.fd)
        self.pinned = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_workspace(raw: str, allowed_roots: list[Path], reserved: list[Path]) -> Workspace:
    """Check `raw` and open it, or raise WorkspaceRejected saying what to fix.

    Symlinks are resolved before the root check, so a link inside an allowed root that points
    outside it is refused. Whatever lies outside the roots gets one answer, whether it exists,
    is a file or a directory: the service may see directories its callers may not enter (as
    root, or with CAP_DAC_READ_SEARCH), and its errors must not map them. A directory holding
    one of codestation's own directories (`reserved`: its data, cache, config, installation), or
    lying inside one, is refused: the agent would see other sessions' credentials or could
    change the code later sessions run.
    """
    if not raw or not raw.strip():
        raise WorkspaceRejected("workspace is empty; give the absolute path of a directory.")
    if "\x00" in raw:
        raise WorkspaceRejected("workspace contains a NUL byte; give a plain absolute path.")
    try:
        raw.encode()
    except UnicodeEncodeError:  # a lone surrogate: no file system name can hold it
        raise WorkspaceRejected(
            "workspace is not valid text; give a plain absolute path."
        ) from None
    path = Path(raw)
    if not path.is_absolute():
        raise WorkspaceRejected(
            f"workspace {raw!r} is relative; give an absolute path such as /home/me/project."
        )
    try:
        real = path.resolve()  # where it leads, whether or not that exists
    except (OSError, RuntimeError):  # a symlink loop
        real = None
    if real is None or not any(real == r or real.is_relative_to(r) for r in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise WorkspaceRejected(
            f"workspace {raw!r} is outside the allowed roots ({roots}) once its symlinks are "
            "followed; choose a directory inside one of them or add its parent to "
            "allowed_roots (CODESTATION_ALLOWED_ROOTS)."
        )
    try:
        found = real.stat()
    except FileNotFoundError:
        raise WorkspaceRejected(f"workspace {raw!r} does not exist; create it first.") from None
    except OSError as exc:  # permission denied
        raise WorkspaceRejected(f"workspace {raw!r} cannot be read: {exc.strerror}.") from None
    if not stat.S_ISDIR(found.st_mode):
        raise WorkspaceRejected(f"workspace {raw!r} is not a directory.")
    shown = f"{raw!r}" if str(real) == raw else f"{raw!r} (really {real})"
    for own in reserved:
        if own == real or own.is_relative_to(real) or real.is_relative_to(own):
            kind = "lies inside" if real.is_relative_to(own) and own != real else "holds"
            raise WorkspaceRejected(
                f"workspace {shown} {kind} codestation's own directory {own}; choose a project "
                "directory apart from codestation's data, cache, configuration and installation."
            )
    fd = _open_no_symlinks(real, raw)
    info = os.fstat(fd)
    return Workspace(real, fd, info.st_uid, info.st_gid, info.st_dev, info.st_ino)


def _open_no_symlinks(real: Path, raw: str) -> int:
    """Open `real` component by component, refusing any symlink: what the checks above saw by
    name is then the directory held, even if a component was swapped in the meantime."""
    try:
        return open_beneath(Path("/"), real.parts[1:], os.O_DIRECTORY)
    except OSError:
        raise WorkspaceRejected(
            f"workspace {raw!r} changed while it was being checked (a symlink or a file took "
            "the place of a directory); start the session again."
        ) from None


def open_beneath(start: Path, parts: Iterable[str], flags: int = 0) -> int:
    """The directory `start`, then each of `parts` beneath it, opened (O_PATH) one component
    at a time and never through a symlink, `flags` added to each of `parts` (O_DIRECTORY:
    directories only). OSError (ELOOP, ENOTDIR, ENOENT) where a component is not as wanted."""
    fd = os.open(start, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts:
            child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_owner(workspace: Workspace, user: str, uid: int | None, *, exempt: bool) -> None:
    """Refuse a workspace its requester does not own: the agent runs as the workspace's owner,
    so owning it is what makes starting an agent there harmless. Root's directories are
    refused the same way, so no request can make an agent run as root. `exempt`: an admin."""
    if exempt:
        return
    if uid is None:
        raise WorkspaceRejected(
            f"user {user!r} has no Unix account to own workspaces; an admin can map one with "
            f"[users.{user}] uid = <uid> in codestation's configuration."
        )
    if workspace.uid != uid or workspace.uid == 0:
        owner = "root" if workspace.uid == 0 else f"uid {workspace.uid}"
        raise WorkspaceRejected(
            f"workspace {str(workspace.path)!r} belongs to {owner}, not to you (uid {uid}); the "
            "agent would run as its owner. Choose a directory of your own, or ask an admin."
        )
