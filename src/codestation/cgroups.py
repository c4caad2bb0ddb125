"""A control group per bubblewrap sandbox: its memory, CPU and process limits, and whether the
kernel killed something in it for want of memory.

Docker makes these itself; a bwrap sandbox is a process tree of the host, so codestation makes
one cgroup per session, next to its own: `<own cgroup>/codestation/<session id>` in each of the
memory, cpu and pids hierarchies (cgroup v1, as on hosts where those controllers are mounted
one by one), or in the unified hierarchy (cgroup v2), whichever has all three. The sandbox
enters it before bwrap runs (`enter_command`), so nothing in it is ever outside.

- v1: `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes` (no swap), `cpu.cfs_quota_us`
  over a 100 ms period, `pids.max` (threads count). An OOM kill shows in `memory.oom_control`'s
  `oom_kill`, which counts this cgroup alone.
- v2: `memory.max`, `memory.swap.max = 0`, `memory.oom.group = 1`, `cpu.max`, `pids.max`; OOM
  kills in `memory.events.local`. The service's cgroup must have the three controllers
  delegated (systemd: `Delegate=yes`); if it has not, limits are not applied and say so.

Only root can do this; elsewhere `Cgroups.find()` is None and sessions run unlimited (their
`limits` show `{}`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from codestation.config import Limits, size_bytes

CONTROLLERS = ("memory", "cpu", "pids")
PERIOD_US = 100_000


@dataclass(frozen=True)
class Cgroups:
    """Where this host keeps the cgroups of codestation's sandboxes: a parent directory per
    controller (v1) or one (v2)."""

    version: int
    parents: tuple[Path, ...]

    @classmethod
    def find(cls) -> Cgroups | None:
        """The cgroups usable here, or None (not root, or no memory, cpu and pids)."""
        if os.geteuid() != 0:
            return None
        mounts: dict[str, Path] = {}
        unified: Path | None = None
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            kind, _, options = right.split(" ", 2)
            mountpoint = Path(left.split()[4])
            if kind == "cgroup":
                for option in options.split(","):
                    if option in CONTROLLERS:
                        mounts[option] = mountpoint
            elif kind == "cgroup2":
                unified = mountpoint
        own = _own_paths()
        if all(c in mounts for c in CONTROLLERS):
            parents = tuple(mounts[c] / own[c].lstrip("/") / "codestation" for c in CONTROLLERS)
            return cls(1, parents)
        if unified is not None:
            base = unified / own.get("", "/").lstrip("/")
            found = cls(2, (base / "codestation",))
            try:  # the service's own cgroup must hand the controllers down: try it once
                enabled = (base / "cgroup.controllers").read_text().split()
                if all(c in enabled for c in CONTROLLERS):
                    found._delegate()
                    return found
            except OSError:  # EBUSY: it holds processes itself (not delegated): no limits
                return None
        return None

    def create(self, session_id: str, limits: Limits) -> list[Path]:
        """Make the session's cgroups with `limits` in them; their directories."""
        made = [parent / session_id for parent in self.parents]
        try:
            if self.version == 2:
                self._delegate()
            for path in made:
                path.mkdir(parents=True, exist_ok=True)
            self._limit(made, limits)
        except BaseException:
            remove(made)
            raise
        return made

    def _delegate(self) -> None:
        """v2 lets a cgroup hand controllers to its children only if it holds no process
        itself: the parent `codestation` holds none, and enables them for each session's."""
        parent = self.parents[0]
        parent.mkdir(exist_ok=True)
        wanted = " ".join(f"+{c}" for c in CONTROLLERS)
        _write(parent.parent / "cgroup.subtree_control", wanted)
        _write(parent / "cgroup.subtree_control", wanted)

    def _limit(self, made: list[Path], limits: Limits) -> None:
        memory = size_bytes(limits.memory) if limits.memory else None
        quota = int(limits.cpus * PERIOD_US) if limits.cpus else None
        if self.version == 1:
            mem, cpu, pids = made
            if memory is not None:
                _write(mem / "memory.limit_in_bytes", str(memory))
                if (mem / "memory.memsw.limit_in_bytes").exists():  # no swap beyond it
                    _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            if quota is not None:
                _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(max(quota, 1000)))
            if limits.pids is not None:
                _write(pids / "pids.max", str(limits.pids))
            return
        (group,) = made
        if memory is not None:
            _write(group / "memory.max", str(memory))
            _write(group / "memory.swap.max", "0")
            _write(group / "memory.oom.group", "1")
        if quota is not None:
            _write(group / "cpu.max", f"{max(quota, 1000)} {PERIOD_US}")
        if limits.pids is not None:
            _write(group / "pids.max", str(limits.pids))


def enter_command(made: list[Path], command: list[str]) -> list[str]:
    """`command`, run from a shell that first moves itself into the cgroups `made` (and so
    everything it will start): no sandboxed code runs outside them, and no Python code runs
    between fork and exec in a threaded service."""
    procs = ":".join(str(path / "cgroup.procs") for path in made)
    script = 'IFS=:; for f in $0; do echo $$ > "$f" || exit 125; done; unset IFS; exec "$@"'
    return ["sh", "-c", script, procs, *command]


def oom_killed(made: list[Path]) -> bool:
    """Whether the kernel killed a process of these cgroups for want of memory."""
    for path in made:
        for name in ("memory.oom_control", "memory.events.local"):
            with contextlib.suppress(OSError):
                for line in (path / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
    return False


def remove(made: list[Path], seconds: float = 2.0) -> None:
    """Remove the cgroups, once empty: the sandbox's last process may be a moment behind
    bwrap. Whatever still runs in them after `seconds` is killed."""
    deadline = time.monotonic() + seconds
    for path in made:
        while path.exists():
            try:
                path.rmdir()
            except FileNotFoundError:
                break
            except OSError:  # busy: not empty yet
                if time.monotonic() > deadline:
                    _kill_all(path)
                time.sleep(0.01)
                if time.monotonic() > deadline + 5:
                    break


def _kill_all(path: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def _own_paths() -> dict[str, str]:
    """This process's cgroup in each hierarchy: controller -> path ('' for v2)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
