"""Slots, with real mounts (the tests run as root, as the warm pool needs): a workspace lands
on a slot by descriptor, its pinned paths read-only, and releasing the slot leaves every file
of the workspace as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codestation import slots
from codestation.errors import StartFailed
from codestation.slots import Slots
from codestation.workspaces import open_workspace


@pytest.fixture
def project(tmp_path: Path) -> Path:
    ws = tmp_path / "project"
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "config").write_text("[core]\n")
    (ws / "README.md").write_text("# a project\n")
    return ws


def test_a_workspace_lands_on_its_slot_with_its_git_paths_read_only(
    tmp_path: Path, project: Path
) -> None:
    store = Slots(tmp_path / "slots")
    slot = store.make("cs-one")
    assert os.listdir(slot) == []
    with open_workspace(str(project), [tmp_path], []) as ws:
        ws.pin_git()
        store.fill("cs-one", ws)
        assert sorted(os.listdir(slot)) == [".git", "README.md"]
        (slot / "new.txt").write_text("written through the slot")
        with pytest.raises(OSError, match="Read-only"):
            (slot / ".git" / "config").write_text("[core]\n\tfsmonitor = evil\n")
        with pytest.raises(OSError, match="Read-only"):
            (slot / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\n")
        (slot / ".git" / "description").write_text("the rest of .git stays writable")
    store.release("cs-one")
    assert not slot.exists()
    assert (project / "new.txt").read_text() == "written through the slot"
    assert (project / ".git" / "config").read_text() == "[core]\n"
    assert (project / "README.md").read_text() == "# a project\n"
    assert store.ids() == set()


def test_verify_refuses_a_sandbox_whose_workspace_is_another_directory(
    tmp_path: Path, project: Path
) -> None:
    other = tmp_path / "other"
    (other / "workspace").mkdir(parents=True)
    with open_workspace(str(project), [tmp_path], []) as ws:
        with pytest.raises(StartFailed, match="not the workspace that was checked"):
            slots.verify(str(other), ws)
        root = tmp_path / "root"
        root.mkdir()
        (root / "workspace").symlink_to(project)  # the same directory, through a symlink
        with pytest.raises(StartFailed):
            slots.verify(str(root), ws)


def test_a_pinned_path_swapped_before_the_fill_fails_it(tmp_path: Path, project: Path) -> None:
    store = Slots(tmp_path / "slots")
    store.make("cs-two")
    with open_workspace(str(project), [tmp_path], []) as ws:
        ws.pin_git()
        (project / ".git" / "config").rename(project / ".git" / "config.old")
        (project / ".git" / "config").write_text("[core]\n\tfsmonitor = evil\n")
        with pytest.raises(StartFailed, match="replaced"):
            store.fill("cs-two", ws)
    store.release("cs-two")
    assert (project / ".git" / "config.old").read_text() == "[core]\n"


def test_release_is_idempotent_and_never_removes_a_directory_with_files(tmp_path: Path) -> None:
    store = Slots(tmp_path / "slots")
    store.release("cs-none")  # nothing there
    slot = store.make("cs-three")
    store.release("cs-three")
    store.release("cs-three")
    assert not slot.exists()
    (tmp_path / "slots" / "cs-four").mkdir()
    (tmp_path / "slots" / "cs-four" / "kept.txt").write_text("x")
    with pytest.raises(OSError, match="not empty"):
        store.release("cs-four")
    assert (tmp_path / "slots" / "cs-four" / "kept.txt").exists()


def test_mountinfo_paths_are_unescaped() -> None:
    assert slots._unescaped(r"/data/my\040dir/slots/cs-1") == "/data/my dir/slots/cs-1"
