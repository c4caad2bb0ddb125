import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from codestation import changes
from codestation.changes import Changes, FileChange, Limits

PASSWD = Path("/etc/passwd").read_bytes()


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return workspace


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "data" / "snapshots" / "s1"


def held(ws: Path) -> int:
    """The workspace as the service holds it: an O_PATH descriptor."""
    return os.open(ws, os.O_PATH | os.O_DIRECTORY)


def take(ws: Path, store: Path, limits: Limits = Limits()) -> None:
    fd = held(ws)
    try:
        changes.take(fd, store, limits=limits)
    finally:
        os.close(fd)


def report(ws: Path, store: Path, limits: Limits = Limits()) -> Changes:
    fd = held(ws)
    try:
        found = changes.report(fd, store, limits=limits)
    finally:
        os.close(fd)
    json.loads(found.model_dump_json())  # whatever the names, the answer is valid JSON
    return found


def by_path(found: Changes) -> dict[str, FileChange]:
    return {f.path: f for f in found.files}


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def test_files_added_modified_and_deleted_are_listed_sorted_with_diffs(
    ws: Path, store: Path
) -> None:
    write(ws / "keep.txt", "same\n")
    write(ws / "src" / "main.py", "one\ntwo\nthree\n")
    write(ws / "old.txt", "bye\n")
    take(ws, store)
    write(ws / "src" / "main.py", "one\n2\nthree\n")
    (ws / "old.txt").unlink()
    write(ws / "new" / "file.txt", "hello")

    found = report(ws, store)

    assert (found.added, found.modified, found.deleted) == (1, 1, 1)
    assert not found.truncated
    assert not found.partial
    assert [(f.path, f.change) for f in found.files] == [
        ("new/file.txt", "added"),
        ("old.txt", "deleted"),
        ("src/main.py", "modified"),
    ]
    added, deleted, modified = found.files
    assert modified.diff == (
        "--- a/src/main.py\n+++ b/src/main.py\n@@ -1,3 +1,3 @@\n one\n-two\n+2\n three\n"
    )
    assert added.diff == (
        "--- /dev/null\n+++ b/new/file.txt\n@@ -0,0 +1 @@\n+hello\n\\ No newline at end of file\n"
    )
    assert deleted.diff == "--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n"
    assert (modified.size_before, modified.size_after, modified.kind) == (14, 12, "file")
    assert (added.size_before, deleted.size_after) == (None, None)


def test_a_touch_or_a_rewrite_with_the_same_content_is_not_a_change(ws: Path, store: Path) -> None:
    write(ws / "a.txt", "content\n")
    write(ws / "b.txt", "other\n")
    take(ws, store)
    os.utime(ws / "a.txt", ns=(1, 1))
    write(ws / "b.tmp", "other\n")
    os.replace(ws / "b.tmp", ws / "b.txt")  # an editor's save: a new inode
    assert report(ws, store).files == []


def test_a_change_with_the_old_mtime_put_back_is_still_seen(
    ws: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changes, "_RACY_NS", -(10**18))  # as if the files were old
    write(ws / "a.txt", "secret plan A\n")
    take(ws, store)
    before = os.stat(ws / "a.txt")
    write(ws / "a.txt", "secret plan B\n")
    os.utime(ws / "a.txt", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert [f.change for f in report(ws, store).files] == ["modified"]


def test_a_binary_file_is_named_without_a_diff(ws: Path, store: Path) -> None:
    write(ws / "image.png", b"\x89PNG\0\0\x01")
    write(ws / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    take(ws, store)
    write(ws / "image.png", b"\x89PNG\0\0\x02")
    write(ws / "latin1.txt", "th\xe9\n".encode("latin-1"))
    found = report(ws, store).files
    assert [(f.path, f.binary, f.diff) for f in found] == [
        ("image.png", True, None),
        ("latin1.txt", True, None),
    ]


def test_a_file_over_max_file_size_is_compared_by_hash_and_gets_no_diff(
    ws: Path, store: Path
) -> None:
    limits = Limits(max_file_size=1000)
    write(ws / "big.log", "x" * 5000)
    write(ws / "big-touched.log", "y" * 5000)
    take(ws, store, limits)
    write(ws / "big.log", "x" * 4999 + "z")  # same size: only the hash tells
    os.utime(ws / "big-touched.log", ns=(1, 1))
    [big] = report(ws, store, limits).files
    assert (big.path, big.change, big.diff, big.binary) == ("big.log", "modified", None, False)
    assert big.note is not None
    assert "no diff" in big.note
    assert b"x" * 100 not in (store / "content").read_bytes()  # not kept


def test_a_diff_is_cut_at_max_diff_bytes(ws: Path, store: Path) -> None:
    write(ws / "a.txt", "".join(f"line {i}\n" for i in range(1000)))
    take(ws, store)
    write(ws / "a.txt", "".join(f"LINE {i}\n" for i in range(1000)))
    [a] = report(ws, store, Limits(max_diff_bytes=300)).files
    assert a.diff is not None
    assert a.diff_truncated
    assert a.diff.startswith("--- a/a.txt\n+++ b/a.txt\n@@ -1,1000 +1,1000 @@\n-line 0\n")
    assert 250 < len(a.diff.encode()) <= 300


def test_diffs_stop_when_the_report_s_diff_budget_is_used_up(ws: Path, store: Path) -> None:
    for name in "abc":
        write(ws / f"{name}.txt", "old\n" * 20)
    take(ws, store)
    for name in "abc":
        write(ws / f"{name}.txt", "new\n" * 20)
    a, b, c = report(ws, store, Limits(max_total_diff_bytes=400)).files
    assert a.diff is not None
    assert not a.diff_truncated
    assert b.diff is not None
    assert b.diff_truncated
    assert len((a.diff + b.diff).encode()) <= 400
    assert c.diff is None
    assert c.note is not None
    assert "budget" in c.note


def test_the_listing_is_capped_but_the_counts_are_not(ws: Path, store: Path) -> None:
    take(ws, store)
    for i in range(12):
        write(ws / f"f{i:02}.txt", f"{i}\n")
    found = report(ws, store, Limits(max_listed=5))
    assert [f.path for f in found.files] == [f"f{i:02}.txt" for i in range(5)]
    assert found.truncated
    assert found.added == 12


def test_a_symlink_is_reported_by_its_target_and_never_followed(ws: Path, store: Path) -> None:
    os.symlink("/etc/passwd", ws / "was-there")
    take(ws, store)
    os.symlink("/etc/passwd", ws / "leak")
    os.symlink("/etc", ws / "etc")
    found = report(ws, store)
    assert [(f.path, f.kind, f.target, f.diff) for f in found.files] == [
        ("etc", "symlink", "/etc", None),
        ("leak", "symlink", "/etc/passwd", None),
    ]
    assert PASSWD[:20].decode() not in found.model_dump_json()
    assert PASSWD[:20] not in (store / "content").read_bytes()
    assert PASSWD[:20] not in (store / "index.json").read_bytes()


def test_a_file_turned_into_a_symlink_is_modified(ws: Path, store: Path) -> None:
    write(ws / "config", "x = 1\n")
    take(ws, store)
    (ws / "config").unlink()
    os.symlink("/etc/shadow", ws / "config")
    [config] = report(ws, store).files
    assert (config.change, config.kind, config.target) == ("modified", "symlink", "/etc/shadow")
    assert config.note == "was a file"
    assert config.diff is None


def test_a_directory_swapped_for_a_symlink_to_etc_shows_nothing_of_etc(
    ws: Path, store: Path
) -> None:
    write(ws / "sub" / "notes.txt", "mine\n")
    take(ws, store)
    shutil.rmtree(ws / "sub")
    os.symlink("/etc", ws / "sub")
    found = report(ws, store)
    assert [(f.path, f.change, f.kind) for f in found.files] == [
        ("sub", "added", "symlink"),
        ("sub/notes.txt", "deleted", "file"),
    ]
    assert "passwd" not in found.model_dump_json()


def test_a_directory_swapped_for_a_symlink_during_the_walk_is_not_entered(
    ws: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(ws / "sub" / "notes.txt", "mine\n")
    take(ws, store)
    real_open = os.open

    def racing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # The agent wins the race: `sub` is listed as a directory, then swapped before it opens.
        if path == "sub" and (ws / "sub").is_dir() and not (ws / "sub").is_symlink():
            os.rename(ws / "sub", ws / "sub.moved")
            os.symlink("/etc", ws / "sub")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    found = report(ws, store)
    assert found.partial  # what `sub` holds now is unknown: not read, and not called deleted
    assert found.files == []
    assert "passwd" not in found.model_dump_json()


def test_a_file_swapped_for_a_symlink_before_it_is_read_is_not_read(
    ws: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(ws / "a.txt", "mine\n")
    take(ws, store)
    write(ws / "a.txt", "x" * len(PASSWD))  # the size the walk saw is the size of what is read
    real_open = os.open

    def racing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "a.txt" and not (ws / "a.txt").is_symlink():
            (ws / "a.txt").unlink()
            os.symlink("/etc/passwd", ws / "a.txt")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    [a] = report(ws, store).files
    assert (a.change, a.diff) == ("modified", None)
    assert PASSWD[:20].decode() not in a.model_dump_json()


@pytest.mark.timeout(20)
def test_a_fifo_does_not_hang_the_snapshot_or_the_report(ws: Path, store: Path) -> None:
    os.mkfifo(ws / "before")
    write(ws / "becomes-fifo", "x\n")
    take(ws, store)
    os.mkfifo(ws / "after")
    (ws / "becomes-fifo").unlink()
    os.mkfifo(ws / "becomes-fifo")
    found = report(ws, store)
    assert [(f.path, f.change, f.kind) for f in found.files] == [
        ("after", "added", "other"),
        ("becomes-fifo", "modified", "other"),
    ]


@pytest.mark.timeout(20)
def test_a_file_swapped_for_a_fifo_before_it_is_opened_does_not_hang(
    ws: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(ws / "a.txt", "mine\n")
    real_open = os.open

    def racing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "a.txt" and not stat.S_ISFIFO(os.lstat(ws / "a.txt").st_mode):
            (ws / "a.txt").unlink()
            os.mkfifo(ws / "a.txt")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    take(ws, store)
    monkeypatch.undo()
    assert report(ws, store).files == []  # recorded as the FIFO it had become


def test_names_that_are_not_utf8_or_hold_a_newline_are_shown_safely(ws: Path, store: Path) -> None:
    latin1 = Path(os.fsdecode(bytes(ws) + b"/caf\xe9.txt"))
    write(latin1, "old\n")
    take(ws, store)
    write(latin1, "new\n")
    write(ws / "two\nlines.txt", "x\n")
    a, b = report(ws, store).files
    assert (a.path, a.change) == ("caf\\xe9.txt", "modified")
    assert a.diff == '--- "a/caf\\\\xe9.txt"\n+++ "b/caf\\\\xe9.txt"\n@@ -1 +1 @@\n-old\n+new\n'
    assert (b.path, b.change) == ("two\nlines.txt", "added")
    assert b.diff is not None
    assert b.diff.startswith('--- /dev/null\n+++ "b/two\\nlines.txt"\n')


def test_git_directories_are_skipped(ws: Path, store: Path) -> None:
    write(ws / ".git" / "config", "[core]\n")
    write(ws / "vendor" / "lib" / ".git" / "HEAD", "ref: main\n")
    take(ws, store)
    write(ws / ".git" / "config", "[core]\n\tfsmonitor = evil\n")
    write(ws / ".git" / "objects" / "ab" / "cdef", b"\x78\x01")
    write(ws / "vendor" / "lib" / ".git" / "HEAD", "ref: other\n")
    write(ws / "vendor" / "lib" / "x.c", "int x;\n")
    assert [f.path for f in report(ws, store).files] == ["vendor/lib/x.c"]


def test_an_empty_workspace_has_no_changes(ws: Path, store: Path) -> None:
    take(ws, store)
    found = report(ws, store)
    assert (found.files, found.added, found.modified, found.deleted) == ([], 0, 0, 0)
    assert not found.partial
    assert not found.truncated


def test_a_snapshot_over_max_files_is_partial_and_invents_no_additions(
    ws: Path, store: Path
) -> None:
    for d in "abc":
        for i in range(5):
            write(ws / d / f"{i}.txt", f"{i}\n")
    take(ws, store, Limits(max_files=5))  # the three directories, then two files
    found = report(ws, store)
    assert found.partial
    assert found.files == []


def test_a_report_over_max_files_is_partial_and_invents_no_deletions(ws: Path, store: Path) -> None:
    for d in "abc":
        for i in range(5):
            write(ws / d / f"{i}.txt", f"{i}\n")
    take(ws, store)
    for i in range(100):
        write(ws / "flood" / f"{i}.txt", "")
    found = report(ws, store, Limits(max_files=10))
    assert found.partial
    assert found.deleted == 0
    assert found.modified == 0


def test_a_snapshot_over_max_bytes_is_partial(ws: Path, store: Path) -> None:
    for i in range(10):
        write(ws / f"{i}.txt", f"{i}" * 100)
    take(ws, store, Limits(max_bytes=500))
    assert 0 < (store / "content").stat().st_size <= 500
    assert report(ws, store).partial


def test_deep_trees_stop_at_max_depth(ws: Path, store: Path) -> None:
    deep = ws.joinpath(*["d"] * 10)
    write(deep / "f.txt", "x\n")
    take(ws, store, Limits(max_depth=4))
    (deep / "f.txt").unlink()
    found = report(ws, store, Limits(max_depth=4))
    assert found.partial
    assert found.files == []


def test_identical_contents_are_kept_once(ws: Path, store: Path) -> None:
    for i in range(50):
        write(ws / f"copy{i}.txt", "the same text\n")
    take(ws, store)
    assert (store / "content").read_bytes() == b"the same text\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file needs root")
def test_a_hard_link_to_another_user_s_file_is_never_read(
    ws: Path, store: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    write(secret, "the password is swordfish\n")
    os.chown(secret, 4242, 4242)
    os.chown(ws, 1000, 1000)  # the workspace's owner, whom the agent runs as
    take(ws, store)
    os.link(secret, ws / "stolen")
    [stolen] = report(ws, store).files
    assert (stolen.change, stolen.diff) == ("added", None)
    assert stolen.note is not None
    assert "hard link" in stolen.note
    assert "swordfish" not in stolen.model_dump_json()


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file needs root")
def test_a_file_the_workspace_s_owner_may_not_read_is_never_read(ws: Path, store: Path) -> None:
    os.chown(ws, 1000, 1000)  # the workspace's owner, whom the agent runs as
    take(ws, store)
    for name, (uid, gid, mode) in {
        "root-only": (0, 0, 0o600),
        "their-group": (4242, 1000, 0o640),  # the owner's group may read it
        "another-group": (4242, 4242, 0o640),
        "everyone": (4242, 4242, 0o644),
        "own-unreadable": (1000, 1000, 0o200),
    }.items():
        write(ws / name, f"the password is swordfish {name}\n")
        os.chown(ws / name, uid, gid)
        (ws / name).chmod(mode)
    files = {f.path: f for f in report(ws, store).files}
    for name in ("root-only", "another-group", "own-unreadable"):
        assert files[name].diff is None, name
        assert "may not read" in (files[name].note or ""), name
        assert "swordfish" not in files[name].model_dump_json()
    for name in ("their-group", "everyone"):
        assert "swordfish" in (files[name].diff or ""), name


def test_the_store_is_private_and_discard_is_idempotent(ws: Path, store: Path) -> None:
    write(ws / "a.txt", "x\n")
    take(ws, store)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    for name in ("index.json", "content"):
        assert stat.S_IMODE((store / name).stat().st_mode) == 0o600
    changes.discard(store)
    assert not store.exists()
    changes.discard(store)


def test_a_report_without_a_snapshot_raises(ws: Path, store: Path) -> None:
    with pytest.raises(FileNotFoundError):
        report(ws, store)


def test_a_mode_change_is_a_modification(ws: Path, store: Path) -> None:
    write(ws / "run.sh", "echo hi\n")
    os.chmod(ws / "run.sh", 0o644)
    take(ws, store)
    os.chmod(ws / "run.sh", 0o755)
    [run] = report(ws, store).files
    assert (run.change, run.note, run.diff) == ("modified", "mode 644 -> 755", None)
