"""The rules a directory must meet before an agent may work in it."""

from __future__ import annotations

from pathlib import Path

from codestation.errors import WorkspaceRejected


def validate_workspace(raw: str, allowed_roots: list[Path], data_dir: Path) -> Path:
    """Return the workspace's real path, or raise WorkspaceRejected saying what to fix.

    Symlinks are resolved before the root check, so a link inside an allowed root that points
    outside it is refused. A directory holding codestation's own data directory is refused too:
    the agent would see every session's credentials.
    """
    if not raw or not raw.strip():
        raise WorkspaceRejected("workspace is empty; give the absolute path of a directory.")
    if "\x00" in raw:
        raise WorkspaceRejected("workspace contains a NUL byte; give a plain absolute path.")
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
    if not any(real == root or real.is_relative_to(root) for root in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        shown = f"{raw!r}" if str(real) == raw else f"{raw!r} (really {real})"
        raise WorkspaceRejected(
            f"workspace {shown} is outside the allowed roots ({roots}); choose a directory inside "
            "one of them or add its parent to allowed_roots (CODESTATION_ALLOWED_ROOTS)."
        )
    data = data_dir.expanduser().resolve()
    if data == real or data.is_relative_to(real):
        raise WorkspaceRejected(
            f"workspace {raw!r} contains codestation's data directory ({data}); choose a "
            "directory that does not, so agents cannot read other sessions' credentials."
        )
    return real
