import os
from pathlib import Path

import pytest

from codestation.errors import WorkspaceRejected
from codestation.workspaces import Workspace, check_owner, open_workspace


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "project").mkdir(parents=True)
    return r


def check(raw: str, root: Path, reserved: list[Path] | None = None) -> Path:
    with open_workspace(raw, [root.resolve()], reserved or [root.parent / "data"]) as ws:
        return ws.path


def test_a_directory_inside_a_root_is_accepted_and_held_open(root: Path) -> None:
    with open_workspace(str(root / "project"), [root], []) as ws:
        assert ws.path == (root / "project").resolve()
        held = os.fstat(ws.fd)
        assert (held.st_dev, held.st_ino) == (ws.device, ws.inode)
        assert ws.current_path == str(root / "project")
    assert ws.fd == -1  # closed on leaving


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("", "empty"),
        ("project", "relative"),
        ("/definitely/not/here", "outside the allowed roots"),
        ("/etc", "outside the allowed roots"),
        ("/tmp/x\x00y", "NUL"),
        ("/tmp/x\ud800", "not valid text"),
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


def test_a_missing_directory_inside_a_root_is_named_missing(root: Path) -> None:
    with pytest.raises(WorkspaceRejected, match="does not exist"):
        check(str(root / "missing"), root)


def test_a_symlink_out_of_the_root_is_resolved_and_rejected(root: Path) -> None:
    link = root / "escape"
    os.symlink("/etc", link)
    with pytest.raises(WorkspaceRejected, match="outside the allowed roots") as refused:
        check(str(link), root)
    assert "/etc" not in str(refused.value)  # where it leads is not told


def test_what_lies_outside_the_roots_gets_one_answer_whatever_it_is(
    root: Path, tmp_path: Path
) -> None:
    """The service may enter directories its caller may not: its answers must not tell what
    is there (a directory, a file, nothing, where a symlink leads)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "dir").mkdir(parents=True)
    (elsewhere / "file").write_text("x")
    os.symlink(elsewhere / "dir", elsewhere / "link")
    os.symlink(elsewhere / "loop", elsewhere / "loop")
    for target in ("dir", "missing", "loop"):
        os.symlink(elsewhere / target, root / f"to-{target}")
    answers = set()
    for raw in [
        *(str(elsewhere / n) for n in ("dir", "file", "missing", "link", "loop", "dir/../file")),
        *(str(root / f"to-{t}") for t in ("dir", "missing", "loop")),
    ]:
        with pytest.raises(WorkspaceRejected) as refused:
            check(raw, root)
        answers.add(str(refused.value).replace(repr(raw), "RAW"))
    assert len(answers) == 1, answers


def test_a_symlink_within_the_root_is_accepted(root: Path) -> None:
    link = root / "alias"
    os.symlink(root / "project", link)
    assert check(str(link), root) == (root / "project").resolve()


@pytest.mark.parametrize("where", ["data", "data/logs", "cache/opencode"])
def test_codestation_s_own_directories_and_what_holds_them_are_rejected(
    tmp_path: Path, where: str
) -> None:
    own = [tmp_path / "home" / "data", tmp_path / "home" / "cache"]
    for d in own:
        (d / "logs").mkdir(parents=True)
        (d / "opencode").mkdir()
    for raw in (tmp_path / "home", tmp_path / "home" / where):
        with pytest.raises(WorkspaceRejected, match="codestation's own directory"):
            check(str(raw), tmp_path, own)


def test_the_held_directory_survives_a_swap_for_a_symlink(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    project = root / "project"
    with open_workspace(str(project), [root], []) as ws:
        project.rename(root / "moved")
        os.symlink(secret, project)
        # What the sandbox will mount: the checked directory where it is now, not the link.
        assert ws.current_path == str(root / "moved")
        assert os.stat(ws.current_path).st_ino == ws.inode


def make(uid: int) -> Workspace:
    return Workspace(Path("/w"), -1, uid, uid, 1, 1)


def test_owner_rule() -> None:
    check_owner(make(4321), "alice", 4321, exempt=False)
    with pytest.raises(WorkspaceRejected, match="belongs to uid 1000, not to you"):
        check_owner(make(1000), "alice", 4321, exempt=False)
    with pytest.raises(WorkspaceRejected, match="belongs to root"):
        check_owner(make(0), "root", 0, exempt=False)  # never root, even root's own
    with pytest.raises(WorkspaceRejected, match="no Unix account"):
        check_owner(make(4321), "alice", None, exempt=False)
    check_owner(make(0), "admin", None, exempt=True)
