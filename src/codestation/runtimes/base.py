"""The contract every runtime keeps: how a session's OpenCode is launched, watched and ended.

A runtime is the only code that talks to its engine (the Docker daemon, bubblewrap, a cluster).
It knows nothing of the store, the API or the state machine: `SessionManager` calls it, records
what it returns and decides what a session's status is.

A session's runtime *state* is a small JSON-able dict the runtime returns from `start` (a
container id, a pid and its start time, a pod name). The manager stores it with the session and
hands it back, with the session id, to every later call, in this process or in the next one
after a restart: nothing a runtime needs to find a session again may live only in memory.
Every method must accept the state `{}`, meaning "`start` may have begun but never returned";
a runtime that can find its sandbox by session id alone (Docker: by name) should do so.

A runtime is built with the settings (`Runtime(settings)`) and connects to nothing until used.

Rules for each method:

- `inside_port(port)`: the port OpenCode listens on inside the sandbox of a session published
  on `port` (what a terminal in the sandbox attaches to).
- `local`: whether sessions run on this host. A local runtime's sessions each take a port of
  the host's range (`spec.port`) and count against the host's memory budget; a remote one's
  (Kubernetes) take neither, and `spec.port` is 0.
- `address(session_id, port, state)`: the host and port codestation reaches the session's
  OpenCode at (its probes, the proxy, terminals, prompts). By default the port published on
  this host. Cheap and synchronous (it is asked for each request), called on the service's
  event loop, while the session starts or runs.
- `url(session_id, port, state)`: where a client reaches OpenCode directly: the session's `url`.
- `enforced(limits)`: the part of `limits` this runtime applies to a session, as JSON (`{}`
  if it can apply none); shown with the session.
- `check()`: raise RuntimeUnavailable, saying how to fix it, if sessions cannot start now.
  Cheap; called at service start-up.
- `prepare(profile, report)`: get what `start` needs for this environment (an image, a binary).
  Idempotent and safe to call concurrently; may take minutes the first time, so it runs before
  the start timeout begins. `report(message)` may be called from any thread.
- `start(spec)`: launch OpenCode so that it will answer on `spec.address:spec.port` with the
  credentials in `spec.env`, and return the state. Return once launched, not once ready: the
  manager probes readiness. If it raises, it must have left nothing behind.
  `spec.workspace` is an open directory: mount *that* directory at /workspace, not whatever its
  path names now (someone may have swapped the path for a symlink since it was checked): by
  its descriptor where the engine can, else by `current_path` (which follows the directory
  through renames). Run `agent.serve_command(...)` as given, inside the sandbox: it starts
  OpenCode only if /workspace is that directory (device and inode), so a swap in the last
  instant before the mount fails the start instead of moving it. The manager closes the
  descriptor.
  `spec.workspace` is None for a sandbox started ahead of need (the warm pool): mount the
  session's slot (`self.slots.make(session_id)`, `slots.py`) at /workspace as a slave of the
  host's mount, and run OpenCode from another working directory (the workspace will cover
  /workspace later; a process keeps the directory it started in).
- `can_bind()`: whether this runtime, here, can start sandboxes ahead of need and `bind`
  a workspace into them later. False unless a runtime says otherwise.
- `bind(session_id, state, workspace)`: make `workspace` the running sandbox's /workspace
  (`self.slots.fill`), then check, from inside the sandbox, that /workspace and each pinned
  path are the very files that were checked (StartFailed if not). Only for a sandbox started
  without a workspace, and only once.
- `poll(session_id, state)`: `None` while the agent runs; an `Exit` once it has ended or cannot
  be found. Before `start` returned, or for a session this runtime never saw, an `Exit`.
- `stop(session_id, state, grace)`: end the agent (SIGTERM, then SIGKILL after `grace`
  seconds), remove everything it left (container, process group), and return the last lines of
  its log, and release its slot if it has one. Idempotent: a session already gone returns "".
  Never touches the workspace.
- `logs(session_id, state, tail)`: the last `tail` lines of the agent's output.
- `follow(session_id, state, tail)`: the last `tail` lines of the agent's output, then the rest
  as it comes, until the agent ends or the caller stops iterating.
- `running_sessions()`: the ids of every session this runtime still holds a sandbox for (running
  or exited) under this data directory, recorded or not, and of every slot left: the manager
  `stop`s those that no live record or pool member knows.
- `ended()`: session ids whose sandbox may just have ended, as the engine reports them, so the
  manager can poll them at once. Runs until cancelled; the manager's periodic `poll` of every
  running session is the backstop, so a runtime without such events yields nothing.
- `close()`: release connections; sessions keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from codestation import slots
from codestation.config import EnvironmentProfile, Limits, Settings
from codestation.errors import StartFailed
from codestation.slots import Slots
from codestation.workspaces import Workspace

State = dict[str, Any]
Report = Callable[[str], None]


@dataclass(frozen=True)
class LaunchSpec:
    session_id: str
    workspace: Workspace | None  # None: started ahead of need, its workspace bound later
    address: str
    port: int
    env: dict[str, str]
    profile: EnvironmentProfile
    limits: Limits
    uid: int
    gid: int


@dataclass(frozen=True)
class Exit:
    """How a session's agent ended, as far as the runtime can tell."""

    reason: str
    code: int | None = None
    oom_killed: bool = False


class Runtime(ABC):
    name: ClassVar[str]
    local: ClassVar[bool] = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = Slots(settings.data_dir / "slots")

    @abstractmethod
    def inside_port(self, port: int) -> int: ...

    def address(self, session_id: str, port: int, state: State) -> tuple[str, int]:
        return (self.settings.local_host, port)

    def url(self, session_id: str, port: int, state: State) -> str:
        return f"http://{self.settings.session_host}:{port}"

    @abstractmethod
    def enforced(self, limits: Limits) -> dict[str, Any]: ...

    @abstractmethod
    async def check(self) -> None: ...

    @abstractmethod
    async def prepare(self, profile: EnvironmentProfile, report: Report) -> None: ...

    @abstractmethod
    async def start(self, spec: LaunchSpec) -> State: ...

    def can_bind(self) -> bool:
        return False

    async def bind(self, session_id: str, state: State, workspace: Workspace) -> None:
        raise StartFailed(f"the {self.name} runtime cannot take a workspace into a running sandbox")

    async def _bind_at(self, session_id: str, root: str, workspace: Workspace) -> None:
        """`bind` for a sandbox whose file system the host sees at `root` (/proc/<pid>/root)."""
        await asyncio.to_thread(self.slots.fill, session_id, workspace)
        await asyncio.to_thread(slots.verify, root, workspace)

    @abstractmethod
    async def poll(self, session_id: str, state: State) -> Exit | None: ...

    @abstractmethod
    async def stop(self, session_id: str, state: State, grace: float) -> str: ...

    @abstractmethod
    async def logs(self, session_id: str, state: State, tail: int) -> str: ...

    @abstractmethod
    def follow(self, session_id: str, state: State, tail: int) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def running_sessions(self) -> set[str]: ...

    async def ended(self) -> AsyncIterator[str]:
        return
        yield  # an async generator that yields nothing

    async def close(self) -> None:
        return None


async def pumped(stream: Any, name: str) -> AsyncIterator[Any]:
    """The items of one of an engine client's blocking streams (a followed log, an event feed), read
    in a thread of its own, since it may stay open for hours; closed when the caller stops.
    The thread waits while the caller is behind: a slow reader is never buffered for."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue(64)
    done = object()
    closed = threading.Event()

    def hand_over(item: Any) -> None:
        if not closed.is_set():
            asyncio.run_coroutine_threadsafe(items.put(item), loop).result()

    def pump() -> None:
        try:
            for item in stream:
                if closed.is_set():
                    return
                hand_over(item)
        except Exception:  # the stream was closed under us, or the engine went away
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: no one is waiting
                hand_over(done)

    threading.Thread(target=pump, name=name, daemon=True).start()
    try:
        while (item := await items.get()) is not done:
            yield item
    finally:
        closed.set()
        stream.close()
        while not items.empty():  # let a hand-over that waits for room finish
            items.get_nowait()
