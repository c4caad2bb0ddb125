import os
from pathlib import Path

import pytest

from codestation.errors import WorkspaceRejected
from codestation.workspaces import validate_workspace


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "project").mkdir(parents=True)
    return r


def check(raw: str, root: Path) -> Path:
    return validate_workspace(raw, [root.resolve()], root.parent / "data")


def test_a_directory_inside_a_root_is_accepted(root: Path) -> None:
    assert check(str(root / "project"), root) == (root / "project").resolve()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("", "empty"),
        ("project", "relative"),
        ("/definitely/not/here", "does not exist"),
        ("/etc", "outside the allowed roots"),
        ("/tmp/x\x00y", "NUL"),
    ],
)
def test_bad_paths_are_rejected_with_the_reason(root: Path, raw: str, says: str) -> None:
    with pytest.raises(WorkspaceRejected, match=says):
        check(raw, root)


def test_a_file_is_not_a_workspace(root: Path) -> None:
    f = root / "file.txt"
    f.write_text("x")
    with pytest.raises(WorkspaceRejected, match="not a directory"):
        check(str(f), root)


def test_a_symlink_out_of_the_root_is_resolved_and_rejected(root: Path) -> None:
    link = root / "escape"
    os.symlink("/etc", link)
    with pytest.raises(WorkspaceRejected, match=r"really /etc"):
        check(str(link), root)


def test_a_symlink_within_the_root_is_accepted(root: Path) -> None:
    link = root / "alias"
    os.symlink(root / "project", link)
    assert check(str(link), root) == (root / "project").resolve()


def test_a_workspace_holding_the_data_directory_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "home" / ".local" / "share" / "codestation"
    data.mkdir(parents=True)
    with pytest.raises(WorkspaceRejected, match="data directory"):
        validate_workspace(str(tmp_path / "home"), [tmp_path.resolve()], data)
