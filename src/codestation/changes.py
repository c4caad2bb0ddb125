"""What changed in a workspace since its session started: a snapshot at the start, a report later.

Works on any directory, git repository or not, and runs nothing from it (no git, so none of its
hooks or config). `take` walks the workspace and writes, to a store directory of the service's
(0700, files 0600), `index.json`, a manifest of every entry, and `content`, the small files'
contents, each distinct one once (sha256). `report` walks again and compares: files and symlinks
added, modified and deleted, with a unified diff (`diffs.py`) for text files. Directories are
not listed: one swapped for a symlink shows as its files deleted and the symlink added. Entries
named `.git` are skipped at any depth: git's internals, or a nested repository's, are not work.

The service runs as root and whatever writes the workspace may be hostile, so:

- No path is resolved from the top. Each directory is opened O_NOFOLLOW relative to its
  parent's descriptor and listed through its own, so a directory swapped for a symlink mid-walk
  fails to open instead of leading into /etc. Symlinks are recorded by their target text, never
  followed. Files are opened O_NOFOLLOW|O_NONBLOCK (a FIFO cannot block us) and read only if
  fstat on the open descriptor says they are regular files.
- A file with several links, not owned by the workspace's owner, is never read: it may be a hard
  link to a file the agent could not read itself, such as /etc/shadow. Nor is a file whose mode
  bits do not let the workspace's owner read it (put there by root or another user): the
  service can read it, the person asking for the changes could not.
- Everything is capped (`Limits`). A walk that hits a cap records the directories it could not
  list and says `partial`; nothing under them is reported added (snapshot) or deleted (report).

A file whose size, mtime, ctime and inode are unchanged is taken as unchanged without reading
it: unlike mtime, ctime cannot be set back by the agent. A file stamped within `_RACY_NS` of the
snapshot is compared by content anyway, as a change in the same clock tick would leave its
stamps alike (git's "racily clean" entries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BufferedWriter
from pathlib import Path
from typing import Literal, NamedTuple, cast

from pydantic import BaseModel

from codestation import diffs

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_RACY_NS = 2_000_000_000  # the coarsest timestamps we cater for: 1 s (ext3), 2 s (FAT)
_CHANGING = "no diff: it changed while being read"
_BIG = "no diff: larger than Limits.max_file_size"

Kind = Literal["file", "symlink", "other"]
Change = Literal["added", "modified", "deleted"]


@dataclass(frozen=True)
class Limits:
    max_files: int = 100_000  # entries per walk, directories included
    max_path_bytes: int = 32 << 20  # the sum of relative path lengths per walk
    max_depth: int = 64  # each level holds a descriptor open
    max_file_size: int = 1 << 20  # larger files are hashed, not kept, and get no diff
    max_bytes: int = 256 << 20  # contents kept by a snapshot; contents read by a report
    max_hash_bytes: int = 1 << 30  # larger files hashed, by a snapshot; by a report
    max_diff_bytes: int = 256 << 10  # per file
    max_total_diff_bytes: int = 4 << 20
    max_listed: int = 1000


class FileChange(BaseModel):
    path: str  # relative; bytes that are not UTF-8 are shown as \xNN
    change: Change
    kind: Kind  # now, or before for a deleted entry
    binary: bool = False
    size_before: int | None = None
    size_after: int | None = None
    target: str | None = None  # a symlink's, never followed
    diff: str | None = None
    diff_truncated: bool = False
    note: str | None = None  # why there is no diff; a change of type, mode or target


class Changes(BaseModel):
    files: list[FileChange]  # sorted by path; at most `Limits.max_listed`
    added: int
    modified: int
    deleted: int
    truncated: bool  # more files changed than are listed
    partial: bool  # a cap was hit: some changes may be missing, or listed without a diff
    since: datetime  # when the snapshot was taken


class _Entry(NamedTuple):
    kind: str  # "dir" or a Kind
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    sha: str | None = None  # of a file's content, if it was read or hashed
    offset: int = -1  # of its content in the blob; -1: not kept
    target: str | None = None

    @classmethod
    def of(cls, st: os.stat_result) -> _Entry:
        mode = st.st_mode
        kind = "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else "other"
        return cls(kind, stat.S_IMODE(mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class _Omitted(Exception):
    """Why a file's content cannot be had; the message becomes the note."""


def take(root_fd: int, store: Path, *, limits: Limits = Limits()) -> None:
    """Snapshot the directory open as `root_fd` (O_PATH will do) into `store`, replacing any
    earlier snapshot there. Blocking: run it in a thread, and not during a `report`."""
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    (store / "index.json").unlink(missing_ok=True)  # a report meanwhile finds none, not a mix
    taken_ns = time.time_ns()
    with _private(store / "content") as blob:
        walk = _Walk(root_fd, limits, blob)
    saved = {"taken_ns": taken_ns, "partial": walk.partial, "unlisted": sorted(walk.unlisted)}
    with _private(store / "index.tmp") as index:
        index.write(json.dumps({**saved, "entries": walk.entries}).encode())
    os.replace(store / "index.tmp", store / "index.json")


def report(root_fd: int, store: Path, *, limits: Limits = Limits()) -> Changes:
    """What changed in `root_fd` since `take` wrote `store` (entries named `.git` aside);
    FileNotFoundError if it did not. Blocking: run it in a thread."""
    return _Report(root_fd, store, limits).run()


def discard(store: Path) -> None:
    """Delete a snapshot, if there is one."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(store)


class _Walk:
    """One pass over the tree; with `blob`, the small files' contents are written to it."""

    def __init__(self, root_fd: int, limits: Limits, blob: BufferedWriter | None = None) -> None:
        self.limits, self.blob = limits, blob
        self.entries: dict[str, _Entry] = {}
        self.unlisted: set[str] = set()  # directories whose entries are not all known
        self.path_bytes = self.kept = self.hashed = 0
        self.kept_at: dict[str, int] = {}  # sha256 -> offset in the blob
        self.skipped = False  # a file neither kept nor hashed for want of budget
        fd = os.open(".", _DIR, dir_fd=root_fd)
        try:
            root = os.fstat(fd)
            self.owner: tuple[int, int] = (root.st_uid, root.st_gid)
            self._list(fd, "", 0)
        finally:
            os.close(fd)

    @property
    def partial(self) -> bool:
        return bool(self.unlisted) or self.skipped

    def _full(self) -> bool:
        limits = self.limits
        return len(self.entries) >= limits.max_files or self.path_bytes >= limits.max_path_bytes

    def _list(self, fd: int, where: str, depth: int) -> None:
        subdirs = []
        with os.scandir(fd) as listing:
            for item in listing:
                path = f"{where}/{item.name}" if where else item.name
                if item.name == ".git":
                    continue
                if self._full():
                    self.unlisted.add(where)
                    break
                self.path_bytes += len(path)
                try:
                    if item.is_dir(follow_symlinks=False):
                        subdirs.append(item.name)
                        self.entries[path] = _Entry("dir")
                    elif self.blob is not None and item.is_file(follow_symlinks=False):
                        self.entries[path] = self._keep(self.blob, fd, item.name)
                    else:
                        entry = _Entry.of(item.stat(follow_symlinks=False))
                        if entry.kind == "symlink":
                            entry = entry._replace(target=os.readlink(item.name, dir_fd=fd))
                        self.entries[path] = entry
                except FileNotFoundError:
                    continue  # gone already: as if it had never been there
                except OSError:  # ELOOP: swapped for a symlink under us
                    self.unlisted.add(where)
        for name in subdirs:
            path = f"{where}/{name}" if where else name
            if depth >= self.limits.max_depth or self._full():
                self.unlisted.add(path)
                continue
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except OSError:  # gone, or no longer a directory
                self.unlisted.add(path)
                continue
            try:
                self._list(child, path, depth + 1)
            finally:
                os.close(child)

    def _keep(self, blob: BufferedWriter, dir_fd: int, name: str) -> _Entry:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            entry, size, limits = _Entry.of(st), st.st_size, self.limits
            if _refusal(st, self.owner):
                return entry
            if size > limits.max_file_size:
                if self.hashed + size > limits.max_hash_bytes:
                    self.skipped = True
                    return entry
                self.hashed += size
                return entry._replace(sha=_hash(fd, size))
            if self.kept + size > limits.max_bytes:
                self.skipped = True
                return entry
            data = b"".join(_chunks(fd, size + 1))
            if len(data) != size:
                return entry  # being written as we read: its stat will differ later
            sha = hashlib.sha256(data).hexdigest()
            if sha not in self.kept_at:
                self.kept_at[sha] = self.kept
                self.kept += blob.write(data)
            return entry._replace(sha=sha, offset=self.kept_at[sha])
        finally:
            os.close(fd)


class _Report:
    """A snapshot against a fresh walk, with the budgets for what the report reads."""

    def __init__(self, root_fd: int, store: Path, limits: Limits) -> None:
        saved = json.loads((store / "index.json").read_bytes())
        self.old = {path: _Entry(*row) for path, row in saved["entries"].items()}
        self.old_unlisted = set(saved["unlisted"])
        self.taken_ns: int = saved["taken_ns"]
        self.root_fd, self.limits, self.store = root_fd, limits, store
        self.walk = _Walk(root_fd, limits)
        self.partial: bool = saved["partial"] or self.walk.partial
        self.read_left, self.hash_left = limits.max_bytes, limits.max_hash_bytes
        self.diff_left = limits.max_total_diff_bytes

    def run(self) -> Changes:
        found = sorted(self._compare(), key=lambda change: _shown(change[0]))
        listed = found[: self.limits.max_listed]
        self.blob = os.open(self.store / "content", os.O_RDONLY | os.O_CLOEXEC)
        try:
            files = [self._describe(*change) for change in listed]
        finally:
            os.close(self.blob)
        changes = [change for _, change, _, _ in found]
        return Changes(
            files=files,
            added=changes.count("added"),
            modified=changes.count("modified"),
            deleted=changes.count("deleted"),
            truncated=len(found) > len(listed),
            partial=self.partial,
            since=datetime.fromtimestamp(self.taken_ns / 1e9, UTC),
        )

    def _compare(self) -> Iterator[tuple[str, Change, _Entry | None, _Entry | None]]:
        old, new = self.old, self.walk.entries
        for path, now in new.items():
            before = old.get(path)
            if now.kind == "dir":
                continue
            if before is None or before.kind == "dir":
                if _covers(old, self.old_unlisted, path):
                    yield path, "added", None, now
            elif self._differs(path, before, now):
                yield path, "modified", before, now
        for path, was in old.items():
            gone = path not in new or new[path].kind == "dir"
            if was.kind != "dir" and gone and _covers(new, self.walk.unlisted, path):
                yield path, "deleted", was, None

    def _differs(self, path: str, before: _Entry, now: _Entry) -> bool:
        if before[:3] != now[:3] or before.target != now.target:  # kind, mode, size
            return True
        racy = max(before.mtime_ns, before.ctime_ns) >= self.taken_ns - _RACY_NS
        same = before[3:6] == now[3:6]  # mtime, ctime, inode
        if before.kind != "file" or (same and (not racy or before.sha is None)):
            return False
        try:
            return before.sha is None or self._digest(path, now.size) != before.sha
        except _Omitted:
            return True  # cannot tell: rather a change too many (its note says why) than hidden

    def _describe(
        self, path: str, change: Change, before: _Entry | None, now: _Entry | None
    ) -> FileChange:
        entry = now or before
        assert entry is not None
        shown = _shown(path)
        out = FileChange(
            path=shown,
            change=change,
            kind=cast(Kind, entry.kind),
            size_before=before.size if before else None,
            size_after=now.size if now else None,
            target=_shown(entry.target) if entry.target is not None else None,
        )
        if before and now and before.kind != now.kind:
            out.note = f"was a {before.kind}"
        elif before and now and before.target != now.target:
            out.note = f"target was {_shown(before.target or '')}"
        elif before and now and before.mode != now.mode:
            out.note = f"mode {before.mode:o} -> {now.mode:o}"
        if entry.kind != "file":
            return out
        was_file = before is not None and before.kind == "file"
        try:
            a = diffs.lines(self._kept(before) if before and was_file else b"")
            b = diffs.lines(self._current(path, now.size) if now else b"")
        except _Omitted as why:
            out.note = str(why)
            return out
        if a is None or b is None:
            out.binary = True
        elif self.diff_left <= 0:
            out.note = "no diff: the report's diff budget is used up"
        else:
            old_name, new_name = f"a/{shown}" if was_file else None, f"b/{shown}" if now else None
            cap = min(self.limits.max_diff_bytes, self.diff_left)
            diff, out.diff_truncated = diffs.unified(a, b, old_name, new_name, cap)
            cut_by_total = out.diff_truncated and cap == self.diff_left
            self.diff_left -= cap if cut_by_total else len(diff.encode())
            out.diff = diff or None
        return out

    def _kept(self, before: _Entry) -> bytes:
        if before.offset >= 0:
            return os.pread(self.blob, before.size, before.offset)
        big = before.size > self.limits.max_file_size
        raise _Omitted(_BIG if big else "no diff: its content at the start was not kept")

    def _current(self, path: str, size: int) -> bytes:
        if size > self.limits.max_file_size:
            raise _Omitted(_BIG)
        if size > self.read_left:
            raise _Omitted("no diff: the report's read budget is used up")
        fd = self._open(path)
        try:
            data = b"".join(_chunks(fd, size + 1))
        finally:
            os.close(fd)
        self.read_left -= len(data)
        if len(data) != size:
            raise _Omitted(_CHANGING)
        return data

    def _digest(self, path: str, size: int) -> str:
        if size <= self.limits.max_file_size:
            return hashlib.sha256(self._current(path, size)).hexdigest()
        if size > self.hash_left:
            raise _Omitted("not compared: the report's hashing budget is used up")
        self.hash_left -= size
        fd = self._open(path)
        try:
            return _hash(fd, size)
        finally:
            os.close(fd)

    def _open(self, path: str) -> int:
        """A regular file of the workspace, opened with no symlink followed on the way."""
        *parents, name = path.split("/")
        fd = os.open(".", _DIR, dir_fd=self.root_fd)
        try:
            for parent in parents:
                fd, above = os.open(parent, _DIR, dir_fd=fd), fd
                os.close(above)
            file = os.open(name, _FILE, dir_fd=fd)
        except OSError:
            raise _Omitted(_CHANGING) from None
        finally:
            os.close(fd)
        refusal = _refusal(os.fstat(file), self.walk.owner)
        if refusal:
            os.close(file)
            raise _Omitted(refusal)
        return file


def _covers(entries: dict[str, _Entry], unlisted: set[str], path: str) -> bool:
    """Whether the walk that found `entries` would have found `path`, had it been there."""
    parent = path.rpartition("/")[0]
    while parent:
        entry = entries.get(parent)
        if entry is not None:  # a file in a directory's place rules out what was under it
            return entry.kind != "dir" or parent not in unlisted
        parent = parent.rpartition("/")[0]
    return "" not in unlisted


def _refusal(st: os.stat_result, owner: tuple[int, int]) -> str | None:
    """Why a file opened in the workspace must not be read, if it must not. `owner`: the
    workspace's uid and gid, whom the agent runs as."""
    if not stat.S_ISREG(st.st_mode):
        return _CHANGING
    uid, gid = owner
    if st.st_nlink > 1 and st.st_uid != uid:
        return "not read: a hard link to a file of another owner"
    # By its mode bits, as the kernel would judge the workspace's owner (its other groups
    # unknown here: a file only they open is shown without its content).
    if st.st_uid == uid:
        readable = st.st_mode & stat.S_IRUSR
    elif st.st_gid == gid:
        readable = st.st_mode & stat.S_IRGRP
    else:
        readable = st.st_mode & stat.S_IROTH
    if not readable:
        return "not read: the workspace's owner may not read it"
    return None


def _private(path: Path) -> BufferedWriter:
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb")


def _chunks(fd: int, limit: int) -> Iterator[bytes]:
    while limit > 0 and (chunk := os.read(fd, min(limit, 1 << 20))):
        yield chunk
        limit -= len(chunk)


def _hash(fd: int, size: int) -> str:
    sha = hashlib.sha256()
    for chunk in _chunks(fd, size):
        sha.update(chunk)
    return sha.hexdigest()


def _shown(name: str) -> str:
    """A name as JSON-safe text: bytes that are not UTF-8 become \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
