"""The bubblewrap runtime: OpenCode on the host, inside a bwrap sandbox. No daemon needed.

What the agent sees: /usr and /etc read-only, the OpenCode binary read-only at
/opt/opencode/bin/opencode, the workspace read-write at /workspace (its working directory),
a private /tmp of `limits.tmp` bytes (also its HOME), its own /proc and /dev. Nothing else
of the host: not the user's home, not other workspaces, not codestation's data directory.
It has its own PID, IPC and UTS namespaces and no new privileges (bwrap sets
PR_SET_NO_NEW_PRIVS). Unlike Docker it shares the host's network: OpenCode listens on the
publish address and the leased port itself.

It runs as the workspace owner's uid:gid, with no capabilities, when the service runs as root
(bwrap sets up the mounts as root, `setpriv` inside switches user); else as the service's own
user, in a user namespace bwrap makes. As root, the sandbox also runs in cgroups of its own
(`cgroups.py`) that hold it to `limits` (memory, cpus, pids); an OOM kill fails the session
saying so, as Docker's does.

Sessions outlive the service: bwrap is started in a session of its own, and its pid and
start time are kept (in the state and in `run/<id>.json` under the data directory), so the
next service re-adopts it, or ends it; bwrap writes its exit status to `run/<id>.status`,
which tells how a session ended even when the service that started it is gone. OpenCode's
output goes to `logs/<id>.log`, which the sandbox writes in append mode: once it passes
`log_max_size`, `poll` moves its content to `logs/<id>.log.1` and empties it, and the
sandbox's next line lands at its new end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from codestation import agent, cgroups, network, slots
from codestation.cgroups import Cgroups
from codestation.config import EnvironmentProfile, Limits, Settings, size_bytes
from codestation.errors import RuntimeUnavailable, StartFailed
from codestation.ports import port_is_free
from codestation.runtimes.base import Exit, LaunchSpec, Report, Runtime, State
from codestation.workspaces import Workspace

BINARY_INSIDE = "/opt/opencode/bin/opencode"
PATH_INSIDE = "/opt/opencode/bin:/usr/local/bin:/usr/bin:/bin"


def _start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): with the pid, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[19])


def _group_runs(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs. Zombies do not count: where nothing
    reaps the sandbox (its parent, the service, is gone, and pid 1 here may not reap), an ended
    sandbox can linger as zombies that `killpg(pgid, 0)` still finds."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _child_pid(status_path: Path, seconds: float = 10) -> int:
    """The pid of the sandbox's init (in the host's PID namespace), from the first line bwrap
    writes to its status file once the sandbox's namespaces exist."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            first = status_path.read_text().split("\n", 1)
            if len(first) > 1:
                return int(json.loads(first[0])["child-pid"])
        time.sleep(0.005)
    raise StartFailed(f"bubblewrap did not make the sandbox within {seconds:g} s")


def _wait_for_loopback(pid: int, seconds: float = 10) -> None:
    """Wait until bwrap has set up the loopback of the sandbox's network namespace (its
    127.0.0.1 routed): pasta configuring the namespace meanwhile makes bwrap's own setup fail
    ("loopback: Failed RTM_NEWADDR")."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "127.0.0.1" in Path(f"/proc/{pid}/net/fib_trie").read_text():
                return
        except OSError:  # the sandbox ended already: its exit says why
            raise StartFailed("the sandbox ended while its network was being set up") from None
        time.sleep(0.002)
    raise StartFailed(f"the sandbox's loopback was not up within {seconds:g} s")


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of the log at `path`, its rotated part included."""
    kept: collections.deque[str] = collections.deque(maxlen=lines)
    for part in (path.with_name(path.name + ".1"), path):
        try:
            with part.open("r", errors="replace") as f:
                kept.extend(f)
        except FileNotFoundError:
            continue
    return "".join(kept)


def _rotate(path: Path, most: int) -> None:
    """Past `most` bytes, move the log's last `most` bytes to `<log>.1` (replacing the one
    before) and empty it. The writer appends, so it goes on at the new end; a line written
    between the copy and the truncation is lost, as with logrotate's copytruncate."""
    try:
        with path.open("rb") as log:
            size = os.fstat(log.fileno()).st_size
            if size <= most:
                return
            log.seek(size - most)
            log.readline()  # from a line's start
            path.with_name(path.name + ".1").write_bytes(log.read(most))
        os.truncate(path, 0)
    except FileNotFoundError:
        return


class BwrapRuntime(Runtime):
    name = "bwrap"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.run_dir = settings.data_dir / "run"
        self.log_dir = settings.data_dir / "logs"
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._sandboxes_work = False  # proved once by `check`; the kernel does not change
        self._cgroups: Cgroups | None = Cgroups.find()
        self._forwarders: dict[str, subprocess.Popen[bytes]] = {}

    def _bwrap(self) -> str:
        found = shutil.which("bwrap")
        if found is None:
            raise RuntimeUnavailable(
                "bubblewrap is not installed; install it (`sudo apt-get install bubblewrap`) "
                "or start a Docker engine."
            )
        return found

    def inside_port(self, port: int) -> int:
        return port  # the host's network: it listens on the leased port itself

    def enforced(self, limits: Limits) -> dict[str, Any]:
        applied = {"tmp": limits.tmp} if limits.tmp else {}
        if self._cgroups is None:
            return applied  # not root, or no cgroup controllers: documented
        wanted = {"memory": limits.memory, "cpus": limits.cpus, "pids": limits.pids}
        return {**{k: v for k, v in wanted.items() if v is not None}, **applied}

    async def check(self) -> None:
        bwrap = self._bwrap()
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            raise RuntimeUnavailable(
                "setpriv (util-linux) is needed to run sessions as the workspace owner; "
                "install util-linux."
            )
        if self._sandboxes_work:
            return
        probe = await asyncio.to_thread(
            subprocess.run,
            [bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--", "true"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0:
            raise RuntimeUnavailable(
                f"bubblewrap cannot create a sandbox here ({probe.stderr.strip()}); allow "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) "
                "or start a Docker engine."
            )
        self._sandboxes_work = True

    async def prepare(self, profile: EnvironmentProfile, report: Report) -> None:
        if profile.image is not None:
            raise StartFailed(
                f"this environment names the image {profile.image}, which only the Docker "
                "runtime can run; set its runtime to docker or remove the image."
            )
        report("installing OpenCode")
        await asyncio.to_thread(agent.opencode_binary, self.settings)
        await asyncio.to_thread(agent.opencode_config, self.settings)

    def _workspace_args(self, spec: LaunchSpec) -> list[str]:
        if spec.workspace is None:  # ahead of need: the slot (bwrap's mounts are the host's slaves)
            return ["--bind", str(self.slots.path(spec.session_id)), "/workspace"]
        # By its descriptor: the directory that was checked, whatever its path names now.
        return [
            "--bind-fd", str(spec.workspace.fd), "/workspace",
            *(arg for pin in spec.workspace.pinned for arg in (
                "--ro-bind-fd" if pin.read_only else "--bind-fd", str(pin.fd),
                f"/workspace/{pin.relative}",
            )),
        ]  # fmt: skip

    def _argv(self, spec: LaunchSpec, binary: Path, config: Path, status_fd: int) -> list[str]:
        argv = [self._bwrap(), "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            if host.is_symlink():  # merged /usr: /bin -> usr/bin
                argv += ["--symlink", os.readlink(host), f"/{top}"]
            elif host.is_dir():
                argv += ["--ro-bind", str(host), f"/{top}"]
        argv += [
            "--perms", "0755", "--dir", "/opt",
            "--perms", "0755", "--dir", "/opt/opencode",
            "--perms", "0755", "--dir", "/opt/opencode/bin",
            "--ro-bind", str(binary), BINARY_INSIDE,
            *self._workspace_args(spec),
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777",
            *(["--size", str(size_bytes(spec.limits.tmp))] if spec.limits.tmp else []),
            "--tmpfs", "/tmp",
            # OpenCode's global configuration, shared read-only (see `agent.opencode_config`);
            # the rest of ~/.config the agent's tools may write.
            "--perms", "1777", "--dir", "/tmp/.config",
            "--ro-bind", str(config), agent.CONFIG_INSIDE,
            # Not /workspace in a slot's sandbox: the workspace covers it later, and a process
            # keeps the directory it started in.
            "--chdir", "/workspace" if spec.workspace is not None else "/tmp",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            *(["--unshare-net"] if spec.profile.network != "full" else []),
            "--hostname", f"codestation-{spec.session_id}",
            "--json-status-fd", str(status_fd),
            "--remount-ro", "/",  # the sandbox's own root too: only /workspace and /tmp write
        ]  # fmt: skip
        # In a network of its own, OpenCode listens on the sandbox's loopback and pasta forwards
        # the leased port to it; else on the host's network, on the publish address itself.
        address = spec.address if spec.profile.network == "full" else "127.0.0.1"
        command = agent.serve_command(address, spec.port, spec.workspace, BINARY_INSIDE)
        if os.geteuid() != 0:
            # Unprivileged: bwrap makes a user namespace; the agent is the service's own user.
            return [*argv, "--", *command]
        # As root, bwrap makes no user namespace and would leave the agent every capability:
        # drop them all but what setpriv needs to become the workspace's owner, which then
        # leaves it none (and an empty bounding set). A root-owned workspace keeps uid 0, bare.
        argv += ["--cap-drop", "ALL"]
        if spec.uid == 0:
            return [*argv, "--", *command]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        setpriv = [
            "setpriv", f"--reuid={spec.uid}", f"--regid={spec.gid}", "--clear-groups",
            "--bounding-set=-all", "--inh-caps=-all", "--",
        ]  # fmt: skip
        return [*argv, "--", *setpriv, *command]

    async def start(self, spec: LaunchSpec) -> State:
        binary = await asyncio.to_thread(agent.opencode_binary, self.settings)
        config = await asyncio.to_thread(agent.opencode_config, self.settings)
        return await asyncio.to_thread(self._start, spec, binary, config)

    def _start(self, spec: LaunchSpec, binary: Path, config: Path) -> State:
        for d in (self.run_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = self.log_dir / f"{spec.session_id}.log"
        status_path = self.run_dir / f"{spec.session_id}.status"
        # Credentials go through the environment, never the command line (`ps` shows that).
        env = {
            "PATH": PATH_INSIDE,
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
            **spec.env,
        }
        if spec.workspace is None:
            self.slots.make(spec.session_id)
        held = (spec.workspace.fd, *(p.fd for p in spec.workspace.pinned)) if spec.workspace else ()
        made = self._cgroups.create(spec.session_id, spec.limits) if self._cgroups else []
        with log_path.open("ab") as log, status_path.open("wb") as status:
            argv = self._argv(spec, binary, config, status.fileno())
            try:
                child = subprocess.Popen(
                    cgroups.enter_command(made, argv) if made else argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd="/",
                    pass_fds=(status.fileno(), *held),
                    start_new_session=True,  # outlives the service; one group to signal
                )
            except OSError as exc:
                cgroups.remove(made)
                self.slots.release(spec.session_id)
                raise StartFailed(f"bubblewrap could not be started: {exc}") from exc
        started = _start_time(child.pid)
        state: State = {"pid": child.pid, "start_time": started, "cgroups": list(map(str, made))}
        self._children[spec.session_id] = child
        record = self.run_dir / f"{spec.session_id}.json"
        record.write_text(json.dumps(state))
        if spec.profile.network != "full":
            try:
                state["pasta"] = self._connect(spec, status_path, log_path)
            except BaseException:
                if child.poll() is not None:
                    # The sandbox ended first (the workspace guard, say): its exit and log
                    # tell why, as they do for a sandbox with no network of its own.
                    return state
                self._signal(child.pid, signal.SIGKILL)
                child.wait()
                cgroups.remove(made)
                record.unlink(missing_ok=True)
                self.slots.release(spec.session_id)
                raise
            record.write_text(json.dumps(state))
        return state

    def _connect(self, spec: LaunchSpec, status_path: Path, log_path: Path) -> State:
        """Give the sandbox's own network namespace its rules (`network.py`), then pasta: the
        leased port on the host's loopback forwarded to OpenCode inside, and, for `egress`,
        a way out through the host's sockets that the rules keep off the host and private
        ranges. The rules come first, so there is no moment without them.

        pasta, not slirp4netns: it forwards a port by its command line (no control socket),
        splices loopback connections without copying, and quits nothing by itself: it is
        ended with the sandbox. Debian 12's pasta drops to `nobody` before it opens the
        namespace, which it may then not enter; `--runas 0` keeps root (pasta still sandboxes
        itself, with seccomp and empty namespaces of its own)."""
        pid = _child_pid(status_path)
        _wait_for_loopback(pid)
        for version in (4, 6):
            table = [
                "*filter",
                # In: its loopback and answers to its own connections, nothing unsolicited.
                "-A INPUT -i lo -j ACCEPT",
                "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                f"-A INPUT -p tcp --dport {spec.port} -j ACCEPT",  # OpenCode, through pasta
                "-A INPUT -j DROP",
                "-A OUTPUT -o lo -j ACCEPT",  # its own OpenCode, the terminal's attach
                *network.rules(
                    "OUTPUT", spec.profile.network, spec.profile.allow, version=version,
                    also_blocked=network.host_addresses(), passed="ACCEPT",
                    udp_to_resolvers_only=True,
                ),
                "COMMIT",
            ]  # fmt: skip
            network.restore(table, version=version, netns_pid=pid)
        pasta = shutil.which("pasta")
        if pasta is None:
            raise StartFailed(
                "pasta (Debian package passt) is needed to reach a bubblewrap sandbox in a "
                "network of its own; install it, or set the environment's network to full."
            )
        port = spec.port
        # Opened here, by the service, and handed over: pasta opening /proc/<pid>/ns/net
        # itself is refused at moments (it keeps too few capabilities for the ptrace access
        # check that path makes), while its own descriptor's path never is.
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        with log_path.open("ab") as log, contextlib.ExitStack() as held:
            held.callback(os.close, netns)
            forward = subprocess.Popen(
                [
                    pasta, "--runas", "0", "--foreground", "--quiet", "--config-net",
                    "-t", f"{spec.address}/{port}:{port}", "-u", "none", "-T", "none", "-U", "none",
                    "--no-map-gw", "--netns", f"/proc/self/fd/{netns}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(netns,),
                start_new_session=True,
            )  # fmt: skip
        self._forwarders[spec.session_id] = forward
        # Listening once the leased port is bound; if pasta ends first, its error is in the log.
        deadline = time.monotonic() + 10
        while port_is_free(spec.address, port):
            if forward.poll() is not None or time.monotonic() > deadline:
                forward.kill()
                forward.wait()
                raise StartFailed(
                    f"pasta could not forward port {port} to the sandbox (exit status "
                    f"{forward.returncode}); its message is in the session's log."
                )
            time.sleep(0.005)
        return {"pid": forward.pid, "start_time": _start_time(forward.pid)}

    def _state(self, session_id: str, state: State) -> State:
        if state.get("pid"):
            return state
        try:  # a launch whose state never reached the store
            recorded: State = json.loads((self.run_dir / f"{session_id}.json").read_text())
        except (OSError, ValueError):
            return {}
        return recorded

    def _alive(self, session_id: str, state: State) -> bool:
        """Whether anything of the sandbox still runs: bwrap, or what it started.

        bwrap leads a process group of its own. It may die before OpenCode (SIGTERM kills it
        at once, while OpenCode takes a second or two), so the group is what counts. The
        kernel keeps a pid from reuse while its group has members; once the leader's pid names
        a process started at another time, the group is long gone.
        """
        pid = state.get("pid")
        if not isinstance(pid, int):
            return False
        child = self._children.get(session_id)
        if child is not None:
            child.poll()  # reap it, so a dead bwrap does not linger as a zombie in the group
        started = _start_time(pid)
        if started is not None:  # the leader runs (bwrap): the sandbox does, if it is ours
            return bool(started == state.get("start_time"))
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        return _group_runs(pid)  # bwrap is gone or a zombie: does anything else still run?

    async def poll(self, session_id: str, state: State) -> Exit | None:
        state = self._state(session_id, state)
        if not state:
            return Exit(reason="its sandbox was never started")
        if self._alive(session_id, state):
            pasta = state.get("pasta") or {}
            if pasta and _start_time(pasta.get("pid", 0)) != pasta.get("start_time"):
                return Exit(reason="its network forwarder (pasta) ended; see its log")
            # Called every watch_interval while the session runs: the time to keep its log small.
            _rotate(self.log_dir / f"{session_id}.log", size_bytes(self.settings.log_max_size))
            return None
        child = self._children.get(session_id)
        code = child.returncode if child is not None else self._exit_code(session_id)
        oom = cgroups.oom_killed([Path(p) for p in state.get("cgroups", [])])
        said = " (out of memory)" if oom else ""
        if code is None:
            return Exit(reason=f"its process is gone{said}", oom_killed=oom)
        if code < 0:
            return Exit(f"OpenCode was killed by signal {-code}{said}", 128 - code, oom)
        return Exit(reason=f"OpenCode exited with status {code}{said}", code=code, oom_killed=oom)

    def _exit_code(self, session_id: str) -> int | None:
        try:
            lines = (self.run_dir / f"{session_id}.status").read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if "exit-code" in record:
                    return int(record["exit-code"])
        return None

    async def stop(self, session_id: str, state: State, grace: float) -> str:
        state = self._state(session_id, state)
        if state and self._alive(session_id, state):
            pid = int(state["pid"])
            self._signal(pid, signal.SIGTERM)
            if not await self._gone(session_id, state, grace):
                self._signal(pid, signal.SIGKILL)
                await self._gone(session_id, state, 30)
        child = self._children.pop(session_id, None)
        if child is not None:
            child.wait()
        self._end_forwarder(session_id, state)
        await asyncio.to_thread(cgroups.remove, [Path(p) for p in state.get("cgroups", [])])
        await asyncio.to_thread(self.slots.release, session_id)
        log_path = self.log_dir / f"{session_id}.log"
        tail = _tail(log_path, self.settings.log_tail_lines)
        for path in (
            log_path,
            log_path.with_name(log_path.name + ".1"),
            self.run_dir / f"{session_id}.json",
            self.run_dir / f"{session_id}.status",
        ):
            path.unlink(missing_ok=True)
        return tail

    async def _gone(self, session_id: str, state: State, seconds: float) -> bool:
        """Wait up to `seconds` for the sandbox to end; whether it did."""
        for _ in range(max(1, round(seconds / 0.05))):
            if not self._alive(session_id, state):
                return True
            await asyncio.sleep(0.05)
        return not self._alive(session_id, state)

    def _end_forwarder(self, session_id: str, state: State) -> None:
        """End the session's pasta, if it has one: it does not end with the sandbox."""
        forward = self._forwarders.pop(session_id, None)
        recorded = state.get("pasta") or {}
        pid = recorded.get("pid")
        if isinstance(pid, int) and _start_time(pid) == recorded.get("start_time"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if forward is not None:
            try:
                forward.wait(5)
            except subprocess.TimeoutExpired:
                forward.kill()
                forward.wait()

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        # The whole group: bwrap, its init in the new PID namespace, OpenCode and its tools.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    async def logs(self, session_id: str, state: State, tail: int) -> str:
        return await asyncio.to_thread(_tail, self.log_dir / f"{session_id}.log", tail)

    async def follow(self, session_id: str, state: State, tail: int) -> AsyncIterator[bytes]:
        state = self._state(session_id, state)
        path = self.log_dir / f"{session_id}.log"
        yield (await self.logs(session_id, state, tail)).encode()
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(0, os.SEEK_END)
            while True:
                chunk = f.read(65536)
                if chunk:
                    yield chunk
                    continue
                if os.fstat(f.fileno()).st_size < f.tell():
                    f.seek(0)  # rotated: what comes next is at the start again
                    continue
                if not state or not self._alive(session_id, state):
                    return
                await asyncio.sleep(0.25)

    async def running_sessions(self) -> set[str]:
        return {record.stem for record in self.run_dir.glob("*.json")} | self.slots.ids()

    def can_bind(self) -> bool:
        return slots.supported()

    async def bind(self, session_id: str, state: State, workspace: Workspace) -> None:
        state = self._state(session_id, state)
        if not state or not self._alive(session_id, state):
            raise StartFailed("the session's sandbox is not running")
        pid = await asyncio.to_thread(_child_pid, self.run_dir / f"{session_id}.status", 5)
        await self._bind_at(session_id, f"/proc/{pid}/root", workspace)
