"""`codestation doctor`: what this host can do for sessions, and how to fix what it cannot.

Each check is a `Finding`: what was looked at, whether it is fine, what was seen, and what to
do where it is not. It looks and never changes anything: no image is built, no OpenCode
fetched, no directory made. A session can start when every finding it depends on (`needed`)
is fine: the runtime sessions would use, the data directory, a free port of the range where
that runtime publishes on this host, and OpenCode or the means to fetch it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import docker

from codestation.cgroups import Cgroups
from codestation.config import Settings
from codestation.errors import CodestationError
from codestation.image import image_tag
from codestation.ports import port_is_free
from codestation.runtimes import Runtime, choose_runtime, make_runtimes


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    seen: str
    fix: str = ""
    needed: bool = False  # whether a session's start depends on it


def can_start(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings if f.needed)


async def examine(settings: Settings) -> list[Finding]:
    runtimes = make_runtimes(settings)
    try:
        findings = [await _runtime(name, runtime) for name, runtime in runtimes.items()]
        try:
            chosen = await choose_runtime(settings, runtimes)
        except CodestationError as exc:
            findings.append(Finding("sessions run in", False, str(exc), _RUNTIME_FIX, True))
            chosen = None
        else:
            how = "chosen automatically" if settings.runtime == "auto" else "as configured"
            findings.append(Finding("sessions run in", True, f"{chosen} ({how})", needed=True))
        findings += [_namespaces(), _cgroups(settings), _data_dir(settings), _cache(settings)]
        if chosen is None or runtimes[chosen].local:
            findings.append(_ports(settings))
        findings.append(_opencode(settings))
        if "docker" in runtimes and chosen == "docker":
            findings.append(await _image(settings))
        return findings
    finally:
        for runtime in runtimes.values():
            await runtime.close()


_RUNTIME_FIX = "start a Docker engine, or install bubblewrap (`sudo apt-get install bubblewrap`)"


async def _runtime(name: str, runtime: Runtime) -> Finding:
    try:
        await runtime.check()
    except CodestationError as exc:
        return Finding(f"runtime {name}", False, str(exc))
    return Finding(f"runtime {name}", True, "works")


def _namespaces() -> Finding:
    """Unprivileged user namespaces: what bubblewrap needs when not run as root."""
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    most = Path("/proc/sys/user/max_user_namespaces")
    if clone.is_file() and clone.read_text().strip() == "0":
        return Finding("user namespaces", False, "unprivileged ones are off",
                       "sysctl kernel.unprivileged_userns_clone=1 (bubblewrap as a non-root "
                       "user needs them)")  # fmt: skip
    if most.is_file() and most.read_text().strip() == "0":
        return Finding("user namespaces", False, "user.max_user_namespaces is 0",
                       "sysctl user.max_user_namespaces=15000")  # fmt: skip
    return Finding("user namespaces", True, "available")


def _cgroups(settings: Settings) -> Finding:
    """Which limits a bubblewrap session gets (Docker applies them all itself)."""
    found = Cgroups.find()
    wanted = {k: v for k, v in settings.limits.model_dump().items() if v is not None}
    if found is None:
        reason = "not root" if os.geteuid() != 0 else "no memory, cpu and pids controllers"
        applied = ", ".join(k for k in ("tmp",) if k in wanted) or "none"
        return Finding("cgroups", False,
                       f"{reason}: bubblewrap sessions get only {applied} of their limits",
                       "run codestation as root with cgroups v1 or v2 (memory, cpu, pids) for "
                       "bubblewrap's limits; Docker sessions get them all anyway")  # fmt: skip
    applied = ", ".join(wanted) or "none"
    return Finding("cgroups", True, f"v{found.version}: bubblewrap sessions get {applied}")


def _data_dir(settings: Settings) -> Finding:
    path = settings.data_dir
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return Finding("data directory", False, f"{existing} is not a directory",
                       f"set data_dir to a directory (now {path})", True)  # fmt: skip
    if not os.access(existing, os.W_OK | os.X_OK):
        return Finding("data directory", False, f"{existing} is not writable here",
                       f"make {existing} writable by uid {os.geteuid()}, or set data_dir",
                       True)  # fmt: skip
    if existing != path:
        return Finding("data directory", True, f"{path} (made at the first start)", needed=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Finding("data directory", False,
                       f"{path} is mode {mode:o}: others may read the store's passwords",
                       f"chmod 700 {path}", True)  # fmt: skip
    return Finding("data directory", True, f"{path} (mode {mode:o})", needed=True)


def _cache(settings: Settings) -> Finding:
    """Whoever may write the cache chooses what every sandbox runs: OpenCode's binary, and the
    configuration directory (its plugins) mounted into each."""
    me = os.geteuid()
    top = settings.cache_dir / "opencode" / settings.opencode_version
    paths = [settings.cache_dir, settings.cache_dir / "opencode", top]
    for folder, dirs, files in os.walk(top):
        paths += [Path(folder, name) for name in (*dirs, *files)]
    for path in paths:
        try:
            found = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(found.st_mode):
            continue
        mode = stat.S_IMODE(found.st_mode)
        if found.st_uid not in (0, me) or mode & 0o022:
            return Finding(
                "cache directory", False,
                f"{path} belongs to uid {found.st_uid}, mode {mode:o}: whoever may write it "
                "chooses what every sandbox runs",
                f"chown -R {me} {settings.cache_dir} && chmod -R go-w {settings.cache_dir}",
            )  # fmt: skip
    seen = f"{settings.cache_dir} (only its owner and root write it)"
    return Finding("cache directory", True, seen)


def _ports(settings: Settings) -> Finding:
    start, end = settings.port_range_start, settings.port_range_end
    free = sum(port_is_free(settings.publish_address, p) for p in range(start, end + 1))
    seen = f"{free} of {end - start + 1} free in {start}-{end} on {settings.publish_address}"
    if free == 0:
        return Finding("ports", False, seen,
                       "stop what holds them, or set port_range_start and port_range_end to a "
                       "free range", True)  # fmt: skip
    return Finding("ports", True, seen, needed=True)


def _opencode(settings: Settings) -> Finding:
    if settings.opencode_binary is not None:
        usable = os.access(settings.opencode_binary, os.X_OK)
        return Finding("OpenCode", usable, str(settings.opencode_binary),
                       "" if usable else "set opencode_binary to an executable file",
                       True)  # fmt: skip
    cached = settings.cache_dir / "opencode" / settings.opencode_version / "opencode"
    if cached.is_file():
        return Finding("OpenCode", True, f"{settings.opencode_version} at {cached}", needed=True)
    if shutil.which("npm") is not None:
        return Finding("OpenCode", True,
                       f"{settings.opencode_version} is fetched from npm at the first start "
                       "(`codestation prepare` does it now)", needed=True)  # fmt: skip
    return Finding("OpenCode", False, f"{settings.opencode_version} is not here, nor npm",
                   f"install npm, or set opencode_binary to an OpenCode "
                   f"{settings.opencode_version} binary", True)  # fmt: skip


async def _image(settings: Settings) -> Finding:
    tag = image_tag(settings)

    def present() -> bool:
        client = docker.from_env()
        try:
            client.images.get(tag)
            return True
        except docker.errors.ImageNotFound:
            return False
        finally:
            client.close()

    try:
        have = await asyncio.to_thread(present)
    except docker.errors.DockerException as exc:
        return Finding("sandbox image", False, f"cannot ask the engine: {exc}")
    if have:
        return Finding("sandbox image", True, tag)
    return Finding("sandbox image", True,
                   f"{tag} is built at the first start (minutes; `codestation prepare` builds "
                   "it now)")  # fmt: skip
