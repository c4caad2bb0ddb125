"""The warm pool: sandboxes started ahead of need, so that a start takes one in milliseconds.

An environment with `pool = N` keeps N sandboxes started and healthy for each kind of session
it has seen start: its runtime and the uid:gid its agent runs as (a sandbox's user is fixed
when it starts), since this service started or lately before it. A member is not a session:
no record, no owner, nothing anyone was shown. It holds a port (reserved here, in memory), a
password of its own that no one has seen, and a sandbox with an empty slot at /workspace
(`slots.py`).

A start that a member fits *takes* it: the member's id, port, password and sandbox become the
new session's, and the manager binds the workspace into the running sandbox
(`Runtime.bind`). A member is handed out once, never again; a start that finds none goes cold.

Room: members use only spare room. The pool fills while live sessions and members together
stay within `max_live_sessions` and the memory budget, and a port of the range stays free
beside the member's; when sessions grow into the room members hold, members are stopped, and
a start that finds no free port has one made (`make_room`).

Filling: one member at a time, and only while no session is being started (OpenCode's start
is CPU-bound: a member must not slow a person's start). A member whose environment's secrets
changed since it started is stopped and replaced (`fingerprint`); one whose sandbox ended is
dropped. Members are stopped when the service stops; those a dead service left are orphans
that the next start removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr

from codestation import agent
from codestation.config import EnvironmentProfile, Settings, size_bytes
from codestation.errors import CodestationError
from codestation.ports import PortAllocator
from codestation.runtimes import LaunchSpec, Runtime, State
from codestation.sessions import new_session_id
from codestation.store import Store

log = logging.getLogger("codestation")

ROUND = 2.0  # seconds between looks at the pool when nothing wakes it


@dataclass(frozen=True)
class Key:
    """What makes sessions differ, as far as a sandbox started ahead can tell."""

    environment: str
    runtime: str
    uid: int
    gid: int


@dataclass
class Member:
    id: str  # the id of the session that takes it
    key: Key
    port: int
    password: SecretStr
    fingerprint: str
    memory: int
    state: State = field(default_factory=dict)


def fingerprint(profile: EnvironmentProfile, secret_values: dict[str, SecretStr]) -> str:
    """What a member was started with: its environment's profile and secrets' values (hashed;
    kept in memory only). A start whose fingerprint differs does not take it."""
    digest = hashlib.sha256(profile.model_dump_json().encode())
    for name in sorted(secret_values):
        digest.update(f"\0{name}\0{secret_values[name].get_secret_value()}".encode())
    return digest.hexdigest()


class Pool:
    def __init__(
        self,
        settings: Settings,
        runtimes: dict[str, Runtime],
        store: Store,
        ports: PortAllocator,
        memory_budget: int,
        starting: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.runtimes = runtimes
        self.store = store
        self.ports = ports
        self.memory_budget = memory_budget
        self._starting_sessions = starting  # how many sessions are being started now
        self._ready: dict[Key, list[Member]] = {}
        self._filling: dict[str, Member] = {}
        self._wanted: set[Key] = set()
        self._said: set[str] = set()  # reasons a key cannot be filled, logged once each
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stops: set[asyncio.Task[None]] = set()  # members being stopped
        self._http = httpx.AsyncClient()

    # -- what the manager asks -------------------------------------------------------------

    def want(self, key: Key) -> None:
        """Keep the pool of `key` full from now on (if its environment has one)."""
        if self.settings.environments[key.environment].pool and key not in self._wanted:
            self._wanted.add(key)
            self._wake.set()

    def take(self, key: Key, current: str) -> Member | None:
        """A ready member of `key` started with the `current` fingerprint, now no longer the
        pool's; None if there is none. Give it to `claimed` once a session holds its port, or
        back with `give_back` if the start failed before."""
        members = self._ready.get(key, [])
        while members:
            member = members.pop(0)
            if member.fingerprint == current:
                self._wake.set()  # refill
                return member
            self._retire(member, "its environment's secrets changed")
        return None

    def give_back(self, member: Member) -> None:
        self._ready.setdefault(member.key, []).insert(0, member)

    def claimed(self, member: Member) -> None:
        """`member` is a session now: its port is leased in the store."""
        self.ports.release(member.port)

    def ids(self) -> set[str]:
        """The session ids of every member, ready or being started: not orphans."""
        return {m.id for m in self._members()} | set(self._filling)

    def ready(self) -> dict[str, int]:
        """How many members are ready, by environment."""
        counts: dict[str, int] = {}
        for member in self._members():
            counts[member.key.environment] = counts.get(member.key.environment, 0) + 1
        return counts

    async def make_room(self) -> bool:
        """Stop a member to free its port and room for a start; whether there was one."""
        for members in self._ready.values():
            if members:
                await self._stop(members.pop())
                self._wake.set()
                return True
        return False

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop filling, and stop every member: a member is nobody's session."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        members = [*self._members(), *self._filling.values()]
        self._ready.clear()
        self._filling.clear()
        await asyncio.gather(
            *(self._stop(m) for m in members), *self._stops, return_exceptions=True
        )
        await self._http.aclose()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ROUND)
            self._wake.clear()
            try:
                await self._round()
            except Exception:  # a pool that stops filling must not take the service down
                log.exception("warm pool: a round failed; trying again in %g s", ROUND)

    async def _round(self) -> None:
        await self._drop_ended()
        self.fit()
        if self._starting_sessions():
            return  # a person's start comes first; the pool fills after
        for key in sorted(self._wanted, key=lambda k: len(self._ready.get(k, []))):
            profile = self.settings.environments[key.environment]
            if len(self._ready.get(key, [])) < profile.pool and await self._fill(key, profile):
                self._wake.set()  # one at a time; the next round fills the next
                return

    # -- members ---------------------------------------------------------------------------

    def _members(self) -> list[Member]:
        return [m for members in self._ready.values() for m in members]

    async def _fill(self, key: Key, profile: EnvironmentProfile) -> bool:
        """Start one member of `key`; whether one was started."""
        runtime = self.runtimes[key.runtime]
        limits = profile.limits or self.settings.limits
        memory = size_bytes(limits.memory) if limits.memory else 0
        try:
            await runtime.check()
            if not runtime.can_bind():
                raise CodestationError(
                    f"the {runtime.name} runtime cannot start sandboxes ahead here (codestation "
                    "must run as root to mount a workspace into a running sandbox)"
                )
            secret_values = agent.secret_values(profile, key.environment)
        except CodestationError as exc:
            self._say(f"{key.environment}: {exc}")
            return False
        port = self._room(memory)
        if port is None:
            return False
        password = SecretStr(secrets.token_urlsafe(24))
        member = Member(
            new_session_id(), key, port, password, fingerprint(profile, secret_values), memory
        )
        self.ports.reserve(port)
        self._filling[member.id] = member
        url = f"http://{self.settings.local_host}:{port}"
        try:
            await runtime.prepare(profile, lambda line: log.info("warm pool: %s", line))
            member.state = await runtime.start(
                LaunchSpec(
                    session_id=member.id,
                    workspace=None,
                    address=self.settings.publish_address,
                    port=port,
                    env=agent.agent_env(password, profile, secret_values),
                    profile=profile,
                    limits=limits,
                    uid=key.uid,
                    gid=key.gid,
                )
            )

            async def ended() -> str | None:
                exit_ = await runtime.poll(member.id, member.state)
                return exit_.reason if exit_ else None

            await agent.wait_ready(self._http, url, password, self.settings.start_timeout, ended)
            await agent.warm_up(self._http, url, password)
        except Exception as exc:
            self._filling.pop(member.id, None)
            await self._stop(member)
            self._say(f"{key.environment}: a sandbox could not be started ahead: {exc}")
            return False
        if self._filling.pop(member.id, None) is None:
            return False  # closed meanwhile: `close` stopped it
        self._ready.setdefault(key, []).append(member)
        self._said.clear()
        log.info("warm pool: %s ready for %s (%s, uid %d)",
                 member.id, key.environment, key.runtime, key.uid)  # fmt: skip
        return True

    def _room(self, memory: int) -> int | None:
        """A port for one more member, if the pool may take room for it now."""
        live, reserved = self.store.usage()
        members = self._members()
        if live + len(members) + 1 > self.settings.max_live_sessions:
            return None
        if reserved + sum(m.memory for m in members) + memory > self.memory_budget:
            return None
        free = self.ports.candidates()
        port, spare = next(free, None), next(free, None)
        return port if spare is not None else None  # one stays free for a start

    def fit(self) -> None:
        """Stop members while sessions and members together pass the service's room."""
        live, reserved = self.store.usage()
        while members := self._members():
            over_count = live + len(members) > self.settings.max_live_sessions
            over_memory = reserved + sum(m.memory for m in members) > self.memory_budget
            if not (over_count or over_memory):
                return
            self._retire(members[-1], "sessions need its room")

    async def _drop_ended(self) -> None:
        members = self._members()
        found = await asyncio.gather(
            *(self.runtimes[m.key.runtime].poll(m.id, m.state) for m in members),
            return_exceptions=True,
        )
        for member, exit_ in zip(members, found, strict=True):
            if exit_ is not None and not isinstance(exit_, BaseException):
                self._retire(member, f"its sandbox ended: {exit_.reason}")
        current: dict[Key, str | None] = {}
        for member in self._members():
            if member.key not in current:
                profile = self.settings.environments[member.key.environment]
                try:
                    values = agent.secret_values(profile, member.key.environment)
                    current[member.key] = fingerprint(profile, values)
                except CodestationError:
                    current[member.key] = None
            if current[member.key] != member.fingerprint:
                self._retire(member, "its environment's secrets changed")

    def _retire(self, member: Member, why: str) -> None:
        """Take `member` out of the pool and stop it in the background."""
        members = self._ready.get(member.key, [])
        if member not in members:
            return  # taken by a start meanwhile: a session's now, not the pool's to stop
        members.remove(member)
        log.info("warm pool: stopping %s: %s", member.id, why)
        task = asyncio.create_task(self._stop(member))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _stop(self, member: Member) -> None:
        try:
            await self.runtimes[member.key.runtime].stop(member.id, member.state, 0)
        except Exception as exc:  # an orphan now: the next reconcile removes it
            log.warning("warm pool: cannot stop %s: %s", member.id, exc)
        finally:
            self.ports.release(member.port)

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("warm pool: %s", message)
