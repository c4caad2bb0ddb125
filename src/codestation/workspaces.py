"""The rules a directory must meet before an agent may work in it, and the handle that keeps it.

A workspace is resolved once, opened once (every component walked without following a
symlink) and from then on known by that open directory, not by its name: the checks, the owner
the agent runs as and the mount all see the same directory, even if someone swaps the path for
a symlink while the sandbox is being prepared (which can take minutes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from codestation.errors import WorkspaceRejected


@dataclass
class Workspace:
    """An open directory: `fd` (O_PATH) holds it; `path` is where it was when it was checked."""

    path: Path
    fd: int
    uid: int
    gid: int
    device: int
    inode: int

    @property
    def current_path(self) -> str:
        """Where the directory is now (it follows a rename; never a symlink put in its place)."""
        return os.readlink(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
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
    outside it is refused. A directory holding one of codestation's own directories
    (`reserved`: its data, cache, config, installation), or lying inside one, is refused: the
    agent would see other sessions' credentials or could change the code later sessions run.
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
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise WorkspaceRejected(f"workspace {raw!r} does not exist; create it first.") from None
    except (OSError, RuntimeError) as exc:  # permission denied, symlink loop
        raise WorkspaceRejected(f"workspace {raw!r} cannot be resolved: {exc}.") from None
    if not real.is_dir():
        raise WorkspaceRejected(f"workspace {raw!r} is not a directory.")
    shown = f"{raw!r}" if str(real) == raw else f"{raw!r} (really {real})"
    if not any(real == root or real.is_relative_to(root) for root in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        raise WorkspaceRejected(
            f"workspace {shown} is outside the allowed roots ({roots}); choose a directory inside "
            "one of them or add its parent to allowed_roots (CODESTATION_ALLOWED_ROOTS)."
        )
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
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        for part in real.parts[1:]:
            try:
                child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                raise WorkspaceRejected(
                    f"workspace {raw!r} changed while it was being checked (a symlink or a file "
                    "took the place of a directory); start the session again."
                ) from None
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
