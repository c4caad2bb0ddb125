"""SessionManager: the only code that changes a session's state.

Every public method that finds a session takes the `Caller` first: a session belongs to the
user who started it, and anyone else (but an admin) is told it does not exist, exactly as for
an unknown id. The manager's own loops (watching, culling, re-adopting) work on all sessions
through the private methods.

It validates a request, leases a port and records the session as `starting` before it answers;
a background task then prepares the runtime, launches OpenCode and probes it until it answers
(`running`) or the start fails (`failed`, with the reason and the last log lines, and the
sandbox removed). Every write goes through the store; every engine call through the runtime.

Concurrency: each session has a lock. Whoever changes a session re-reads it under that lock,
so a stop that lands during a start wins cleanly: the start task is cancelled, whatever it had
launched is recorded first, and the stop removes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import pwd
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

from codestation import agent, pool, prompts
from codestation.changes import Changes
from codestation.config import Limits, Settings, size_bytes
from codestation.errors import (
    AtCapacity,
    BadRequest,
    CodestationError,
    Forbidden,
    NoFreePort,
    NotRunning,
    RuntimeUnavailable,
    SessionNotFound,
    StartFailed,
    TooManySessions,
    TooManyStreams,
    UnknownEnvironment,
)
from codestation.identity import Caller
from codestation.metrics import Metrics, Now
from codestation.pool import Pool
from codestation.ports import PortAllocator
from codestation.runtimes import LaunchSpec, Runtime, State, choose_runtime
from codestation.sessions import Session, Status, new_session_id, now
from codestation.snapshots import Snapshots
from codestation.store import Full, LimitReached, Quota, Store
from codestation.workspaces import Workspace, check_owner, open_workspace

log = logging.getLogger("codestation")

T = TypeVar("T")

ACTIVITY_TIMEOUT = 10.0  # seconds an agent has to say whether it is busy
EVENTS_BUFFERED = 256  # changes a subscriber may fall behind by before it is dropped
AGENT_INTERVAL = 3.0  # seconds between looks at whether each agent is working
# Seconds a start that took a pool member waits for the claim before it answers: a claim
# takes milliseconds (a snapshot of a large workspace may take longer; it then answers
# `starting`, as a cold start does).
CLAIM_WAIT = 2.0


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtimes: dict[str, Runtime],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.store = store
        self.runtimes = runtimes
        self.default_runtime = ""  # chosen by `open`
        self.memory_budget = _memory_budget(settings)
        self.ports = PortAllocator(
            store, settings.port_range_start, settings.port_range_end, settings.publish_address
        )
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._launches: dict[str, asyncio.Task[None]] = {}
        self._prepare_lock = asyncio.Lock()
        self._http = httpx.AsyncClient()
        # Prompts and event streams may last as long as a turn: no shared pool limit.
        self._agent_http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))
        self.busy: dict[str, bool] = {}  # whether each running session's agent is working
        self.snapshots = Snapshots(settings.data_dir / "snapshots")
        self._was_busy: dict[str, bool] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._touched: dict[str, datetime] = {}
        self._unpollable: set[str] = set()
        self._stopping: set[str] = set()  # ids inside `_stop` right now
        self._sweep: set[str] = set()  # runtimes that may hold sandboxes no record knows
        self._subscribers: dict[asyncio.Queue[tuple[str, Session | None]], Caller] = {}
        self._streams: collections.Counter[str] = collections.Counter()
        self.pool = Pool(settings, runtimes, store, self.ports, self.memory_budget,
                         starting=lambda: len(self._launches))  # fmt: skip

    # -- lifecycle of the manager itself ---------------------------------------------------

    async def open(self) -> None:
        """Choose the default runtime, then bring the store in line with what really runs."""
        self.default_runtime = await choose_runtime(self.settings, self.runtimes)
        await self.reconcile()
        self._want_pools()
        self.pool.open()
        self._loops = [
            asyncio.create_task(self._every(self.settings.watch_interval, self.watch)),
            asyncio.create_task(self._every(self.settings.cull_interval, self.cull)),
            asyncio.create_task(self._every(AGENT_INTERVAL, self.observe)),
            *(asyncio.create_task(self._follow_ends(r)) for r in self.runtimes.values()),
        ]

    async def close(self) -> None:
        """Stop watching. Sessions keep running and are re-adopted at the next `open`, unless
        `stop_on_shutdown` is set."""
        if self.settings.stop_on_shutdown:
            await asyncio.gather(
                *(self._stop(s.id, "shutdown") for s in self.store.list(live_only=True))
            )
        tasks = [*self._launches.values(), *self._loops]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.pool.close()
        await self._http.aclose()
        await self._agent_http.aclose()
        for runtime in self.runtimes.values():
            await runtime.close()

    async def _runtime(self, name: str) -> Runtime:
        """The runtime called `name`, if it answers now (else RuntimeUnavailable)."""
        runtime = self.runtimes[name]
        await runtime.check()
        return runtime

    async def reconcile(self) -> None:
        live = self.store.list(live_only=True)
        answering = set()
        for name in self.runtimes:
            try:
                await self._runtime(name)
                answering.add(name)
            except RuntimeUnavailable as exc:
                stuck = sum(1 for s in live if s.runtime == name)
                if stuck:
                    log.warning("%d session(s) in %s left as they are: %s", stuck, name, exc)
                self._sweep.add(name)  # once it answers again
        await _each(
            [s for s in live if s.runtime in answering], self._readopt, "cannot re-adopt session"
        )
        removed = 0
        for name in answering:
            removed += await self._remove_orphans(name)
        self.snapshots.sweep({s.id for s in self.store.list(live_only=True)})
        if live or removed:
            log.info(
                "reconciled %d live session(s); removed %d orphan sandbox(es)", len(live), removed
            )

    async def _remove_orphans(self, name: str) -> int:
        """Remove the sandboxes of runtime `name` that no live record knows; how many."""
        runtime = self.runtimes[name]
        held = await runtime.running_sessions()
        # After listing: none missed.
        known = {s.id for s in self.store.list(live_only=True)} | self.pool.ids()
        orphans = sorted(held - known)
        failed = await _each(
            orphans,
            lambda sid: runtime.stop(sid, {}, self.settings.stop_timeout),
            f"cannot remove orphan sandbox of {name}",
        )
        if failed:
            self._sweep.add(name)  # `watch` tries again
        return len(orphans) - failed

    async def _every(self, seconds: float, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await work()
            except Exception:  # a loop that dies would watch nothing; log and go on
                log.exception("%s failed; trying again in %g s", work.__name__, seconds)

    async def _follow_ends(self, runtime: Runtime) -> None:
        """Poll a session the moment its runtime says its sandbox ended (sooner than `watch`,
        which is the backstop); reconnect to the runtime's events whenever they break off."""
        while True:
            try:
                async for session_id in runtime.ended():
                    session = self.store.get(session_id)
                    if session is not None and session.status is Status.RUNNING:
                        await self._notice_end(session)
            except Exception as exc:  # the engine went away: the poll covers until it is back
                log.debug("%s events broke off (%s); reconnecting", runtime.name, exc)
            await asyncio.sleep(1)

    async def _notice_end(self, session: Session) -> None:
        exit_ = await self.runtimes[session.runtime].poll(session.id, session.runtime_state)
        if exit_ is not None:
            await self._fail(session.id, f"OpenCode stopped unexpectedly: {exit_.reason}")

    def running(self) -> list[Session]:
        return [s for s in self.store.list(live_only=True) if s.status is Status.RUNNING]

    async def watch(self) -> None:
        """Notice running sessions whose agent died (it crashed, was killed, ran out of memory),
        and finish what an engine outage interrupted: stops, starts, and orphaned sandboxes."""
        await self._resume_interrupted()
        running = self.running()
        results = await asyncio.gather(
            *(self._notice_end(s) for s in running), return_exceptions=True
        )
        for session, result in zip(running, results, strict=True):
            # Say once that a session cannot be polled (its engine is down), not every second.
            if isinstance(result, Exception) and session.id not in self._unpollable:
                log.warning("cannot poll session %s: %s", session.id, result)
                self._unpollable.add(session.id)
            elif not isinstance(result, Exception):
                self._unpollable.discard(session.id)

    async def _resume_interrupted(self) -> None:
        """A stop that met an unreachable engine is retried until it ends; a start that this
        process is not carrying on (its engine was down when codestation started) is re-adopted;
        sandboxes a failed session could not remove are swept once their engine answers."""
        stuck = [
            s
            for s in self.store.list(live_only=True)
            if (s.status is Status.STOPPING and s.id not in self._stopping)
            or (s.status is Status.STARTING and s.id not in self._launches)
        ]
        for session in stuck:
            try:
                if session.status is Status.STOPPING:
                    await self._stop(session.id, session.reason or "requested")
                else:
                    await self._runtime(session.runtime)
                    await self._readopt(session)
            except RuntimeUnavailable:
                pass  # still down: the next round tries again
            except Exception:
                log.exception("session %s: cannot finish its %s", session.id, session.status)
        for name in sorted(self._sweep):
            self._sweep.discard(name)  # added again if some remain
            try:
                await self._runtime(name)
                await self._remove_orphans(name)
            except RuntimeUnavailable:
                self._sweep.add(name)

    def touch(self, session: Session) -> None:
        """Count activity on the session: an API call about it, traffic through the proxy,
        terminal input. Kept in memory (it can come many times a second), saved by `cull`."""
        self._touched[session.id] = now()

    async def observe(self) -> None:
        """Note whether each running session's agent is working, and tell subscribers when
        that changes (the sessions page shows it)."""
        running = self.running()
        answers = await asyncio.gather(
            *(
                asyncio.wait_for(
                    agent.is_busy(self._http, self.agent_url(s), s.password), ACTIVITY_TIMEOUT
                )
                for s in running
            ),
            return_exceptions=True,  # one agent's trickle or failure leaves the others be
        )
        self.busy = {
            s.id: busy for s, busy in zip(running, answers, strict=True) if isinstance(busy, bool)
        }
        for session in running:
            busy = self.busy.get(session.id)
            if busy is not None and busy != self._was_busy.get(session.id):
                self._publish("session", session)
        self._was_busy = dict(self.busy)

    async def cull(self) -> None:
        """Stop running sessions idle longer than their idle_timeout or older than their
        max_age. Activity is the latest of: API calls about the session, the agent working or
        its shell running (asked of OpenCode), and the last change to its OpenCode sessions."""
        running = self.running()
        touched, self._touched = self._touched, {}
        # Each agent gets a bounded time to answer: one that trickles its reply (it controls
        # its OpenCode) must not hold up the round, and so everyone's culling.
        seen = await asyncio.gather(
            *(
                asyncio.wait_for(
                    agent.last_activity(self._http, self.agent_url(s), s.password),
                    ACTIVITY_TIMEOUT,
                )
                for s in running
            ),
            return_exceptions=True,
        )
        for session, agent_seen in zip(running, seen, strict=True):
            try:
                await self._cull_one(session, touched.get(session.id), agent_seen)
            except Exception:  # one session must not keep the others from being culled
                log.exception("session %s: cannot check it for culling", session.id)

    async def _cull_one(
        self,
        session: Session,
        touched: datetime | None,
        agent_seen: datetime | BaseException | None,
    ) -> None:
        if isinstance(agent_seen, BaseException):
            log.warning("session %s: cannot ask its agent for activity: %r", session.id, agent_seen)
            agent_seen = None
        times = (session.last_activity, touched, agent_seen)
        latest = max((t for t in times if t is not None), default=None)
        if latest is not None and latest != session.last_activity:
            session = await self._record_activity(session.id, latest)
        why = session.due(now())
        if why is not None:
            log.info("session %s: stopping, %s", session.id, why.replace("_", " "))
            self.metrics.culls.labels(why).inc()
            with contextlib.suppress(RuntimeUnavailable):  # stopped once its engine is back
                await self._stop(session.id, why)

    async def _readopt(self, session: Session) -> None:
        if session.status is Status.STOPPING:
            await self._stop(session.id, session.reason or "requested")
            return
        runtime = self.runtimes[session.runtime]
        if session.status is Status.STARTING and session.started_from == "pool":
            # The claim was cut off: whether its workspace was bound cannot be told for sure.
            await self._fail(session.id, "codestation stopped while the session took its "
                             "pre-started sandbox; start it again.")  # fmt: skip
            return
        exit_ = await runtime.poll(session.id, session.runtime_state)
        if exit_ is None and session.status is Status.STARTING:
            resume = self._launch(runtime, session.id, resume=session.runtime_state)
            self._spawn(session.id, resume)
        elif exit_ is not None:
            await self._fail(session.id, f"lost while codestation was down: {exit_.reason}")

    # -- reading ---------------------------------------------------------------------------

    def get(self, caller: Caller, session_id: str) -> Session:
        """The session, if `caller` may see it; else SessionNotFound, as for an unknown id."""
        session = self.store.get(session_id)
        if session is None or not caller.sees(session.owner):
            raise SessionNotFound(
                f"there is no session {session_id!r}; list yours with GET /api/v1/code/sessions."
            )
        return session

    def sessions(self, caller: Caller) -> list[Session]:
        return [s for s in self.store.list() if caller.sees(s.owner)]

    def _load(self, session_id: str) -> Session:
        session = self.store.get(session_id)
        if session is None:
            raise SessionNotFound(f"there is no session {session_id!r}.")
        return session

    def url(self, session: Session) -> str:
        runtime = self.runtimes.get(session.runtime)
        if runtime is None:  # a record of a runtime this service does not run (any more)
            return f"http://{self.settings.session_host}:{session.port}"
        return runtime.url(session.id, session.port, session.runtime_state)

    def web_url(self, session: Session) -> str:
        return self.settings.web_url(session.id)

    def opencode_url(self, session: Session) -> str:
        return f"{self.settings.service_url}/api/v1/code/session/{session.id}/opencode"

    def _running(self, caller: Caller, session_id: str, why: str) -> Session:
        """`caller`'s session if it runs (NotRunning, saying `why` it must, if not); an API
        call about it, so activity."""
        session = self.get(caller, session_id)
        if session.status is not Status.RUNNING:
            raise NotRunning(f"session {session_id} is {session.status}; {why}")
        self.touch(session)
        return session

    def agent(self, caller: Caller, session_id: str) -> prompts.Agent:
        """How to reach the running session's OpenCode, for work `caller` asks of it."""
        session = self._running(caller, session_id, "its agent cannot take work: start a new "
                                "session (POST /api/v1/code/start).")  # fmt: skip
        return prompts.Agent(session.id, self.agent_url(session), session.password,
                             self._agent_http)  # fmt: skip

    def agent_address(self, session: Session) -> tuple[str, int]:
        """Where codestation itself reaches the session's OpenCode."""
        runtime = self.runtimes.get(session.runtime)
        if runtime is None:  # a record of a runtime this service does not run (any more)
            return (self.settings.local_host, session.port)
        return runtime.address(session.id, session.port, session.runtime_state)

    def agent_url(self, session: Session) -> str:
        host, port = self.agent_address(session)
        bare = ":" in host and not host.startswith("[")  # an IPv6 address, not yet bracketed
        return f"http://{f'[{host}]' if bare else host}:{port}"

    async def agent_events(self, caller: Caller, session_id: str) -> AsyncGenerator[bytes, None]:
        """The agent's own event stream (OpenCode's, for /workspace), as it comes, until the
        session stops or its OpenCode ends the stream."""
        upstream = prompts.events(self.agent(caller, session_id))
        pending: asyncio.Future[bytes] | None = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(upstream))
                done, _ = await asyncio.wait({pending}, timeout=1.0)
                if not done:
                    found = self.store.get(session_id)
                    if found is None or found.status is not Status.RUNNING:
                        return
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield chunk
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await upstream.aclose()

    async def changes(self, caller: Caller, session_id: str) -> Changes:
        """What changed in the running session's workspace since it started."""
        session = self._running(caller, session_id, "what changed is kept only while it runs "
                                "(its snapshot goes when it stops).")  # fmt: skip
        return await self.snapshots.report(session_id, session.workspace)

    async def logs(self, caller: Caller, session_id: str, tail: int) -> str:
        session = self.get(caller, session_id)
        if session.status.live:
            runtime = self.runtimes[session.runtime]
            return await runtime.logs(session.id, session.runtime_state, tail)
        lines = (session.log_tail or "").splitlines(keepends=True)
        return "".join(lines[-tail:])

    async def follow(self, caller: Caller, session_id: str, tail: int) -> AsyncIterator[bytes]:
        session = self.get(caller, session_id)
        if not session.status.live:
            yield (await self.logs(caller, session_id, tail)).encode()
            return
        runtime = self.runtimes[session.runtime]
        async for chunk in runtime.follow(session.id, session.runtime_state, tail):
            yield chunk

    # -- starting --------------------------------------------------------------------------

    async def start(
        self,
        caller: Caller,
        workspace: str,
        environment: str = "default",
        *,
        idle_timeout: float | None = None,
        max_age: float | None = None,
    ) -> Session:
        """Record a new `starting` session of `caller`'s and launch it in the background."""
        began = time.perf_counter()
        profile = self.settings.environments.get(environment)
        if profile is None:
            names = ", ".join(sorted(self.settings.environments))
            raise UnknownEnvironment(
                f"environment {environment!r} is not configured; choose one of: {names}."
            )
        idle = _bounded(
            "idle_timeout",
            idle_timeout,
            profile.idle_timeout,
            self.settings.idle_timeout,
            environment,
        )
        age = _bounded("max_age", max_age, profile.max_age, self.settings.max_age, environment)
        limits = profile.limits or self.settings.limits
        secret_values = agent.secret_values(profile, environment)
        runtime = await self._runtime(profile.runtime or self.default_runtime)
        opened = open_workspace(
            workspace, self.settings.roots_for(caller.user), self.settings.reserved_dirs
        )
        member = None
        try:
            check_owner(
                opened,
                caller.user,
                self._uid_of(caller.user),
                exempt=caller.admin and self.settings.admin_any_owner,
            )
            if not profile.git_writable:
                opened.pin_git()
            if profile.pool:  # only once the caller may start sessions as this owner
                key = pool.Key(environment, runtime.name, opened.uid, opened.gid)
                self.pool.want(key)
                member = self.pool.take(key, pool.fingerprint(profile, secret_values))
            record = functools.partial(self._record_start, caller, opened, runtime, environment,
                                       idle, age, limits)  # fmt: skip
            try:
                session = record(member)
            except NoFreePort:
                if member is not None or not await self.pool.make_room():
                    raise
                session = record(None)  # the port a pool member held
        except BaseException:
            if member is not None:
                self.pool.give_back(member)
            opened.close()
            raise
        self._publish("session", session)
        self.pool.fit()  # members give way at once to the room this session takes
        phases = {"admission": time.perf_counter() - began}
        spec = LaunchSpec(
            session_id=session.id,
            workspace=opened,
            address=self.settings.publish_address,
            port=session.port,
            env=agent.agent_env(session.password, profile, secret_values),
            profile=profile,
            limits=limits,
            uid=opened.uid,
            gid=opened.gid,
        )
        if member is not None:
            self.pool.claimed(member)
            task = self._spawn(session.id, self._claim(runtime, spec, phases))
        else:
            task = self._spawn(
                session.id, self._launch(runtime, session.id, spec=spec, phases=phases)
            )
        # Even a launch cancelled before it began must let go of the directory.
        task.add_done_callback(lambda _: opened.close())
        log.info("session %s of %s starting (%s) in %s%s for %s",
                 session.id, caller.user, session.started_from, runtime.name,
                 f" on port {session.port}" if session.port else "", opened.path,
                 extra={"session": session.id, "user": session.owner})  # fmt: skip
        if member is not None:
            await asyncio.wait({task}, timeout=CLAIM_WAIT)  # never cancels it
            return self._load(session.id)
        return session

    def _want_pools(self) -> None:
        """Fill the pools of the kinds of session started lately (before this service ran)."""
        recent = sorted(self.store.list(), key=lambda s: s.created_at, reverse=True)[:50]
        for session in recent:
            profile = self.settings.environments.get(session.environment)
            if profile is None or not profile.pool or session.runtime not in self.runtimes:
                continue
            try:
                owner = session.workspace.lstat()  # a symlink put there says nothing
            except OSError:
                continue
            self.pool.want(pool.Key(session.environment, session.runtime,
                                    owner.st_uid, owner.st_gid))  # fmt: skip

    def _record_start(
        self,
        caller: Caller,
        workspace: Workspace,
        runtime: Runtime,
        environment: str,
        idle: float,
        age: float,
        limits: Limits,
        member: pool.Member | None,
    ) -> Session:
        """Record a new `starting` session: a pool member's id, port, password and sandbox,
        or a fresh id and password and the first port that can be had."""
        most = self.settings.max_sessions(caller.user)
        quota = Quota(
            per_owner=most, sessions=self.settings.max_live_sessions, memory=self.memory_budget
        )
        memory = size_bytes(limits.memory) if limits.memory and runtime.local else 0
        if memory > self.memory_budget:
            raise BadRequest(
                f"environment {environment!r} asks for {limits.memory} of memory per session, "
                f"more than the whole memory budget ({_gib(self.memory_budget)}); lower its "
                "limits.memory or raise memory_budget."
            )

        def new(port: int) -> Session:
            return Session(
                id=member.id if member else new_session_id(),
                status=Status.STARTING,
                runtime=runtime.name,
                workspace=workspace.path,
                environment=environment,
                port=port,
                username=agent.USERNAME,
                password=member.password if member else SecretStr(secrets.token_urlsafe(24)),
                created_at=now(),
                step="taking a pre-started sandbox" if member else "queued",
                runtime_state=member.state if member else {},
                idle_timeout=idle,
                max_age=age,
                limits=runtime.enforced(limits),
                owner=caller.user,
                memory=memory,
                started_from="pool" if member else "cold",
            )

        try:
            if member is None and not runtime.local:
                session = new(0)  # no port of this host's: it runs elsewhere
                self.store.create(session, quota)
                return session
            if member is None:
                return self.ports.lease(new, quota)
            session = new(member.port)
            self.store.create(session, quota)  # its port is the member's, held for it
            return session
        except LimitReached:
            raise TooManySessions(
                f"you have {most} live sessions, as many as you may; stop one "
                "(POST /api/v1/code/session/<id>/stop) before starting another."
            ) from None
        except Full as full:
            if full.what == "sessions":
                said = f"{full.used} sessions are live, as many as it may run (max_live_sessions)"
            else:
                said = (
                    f"live sessions reserve {_gib(full.used)} of its {_gib(full.most)} memory "
                    f"budget and this one would take {limits.memory} more (memory_budget)"
                )
            raise AtCapacity(
                f"this host is full: {said}. Stop a session, or try again later."
            ) from None

    def capacity(self) -> dict[str, Any]:
        """What the service may run, what its live sessions take of it, what the pool holds."""
        live, reserved = self.store.usage()
        return {
            "sessions": live,
            "max_sessions": self.settings.max_live_sessions,
            "memory_reserved": reserved,
            "memory_budget": self.memory_budget,
            "pool_ready": self.pool.ready(),
        }

    def census(self, terminals: int) -> Now:
        """What is, for the metrics: sessions by status and runtime, capacity, the pool."""
        _, reserved = self.store.usage()
        return Now(
            sessions=self.store.census(),
            pool_ready=sum(self.pool.ready().values()),
            max_sessions=self.settings.max_live_sessions,
            memory_reserved=reserved,
            memory_budget=self.memory_budget,
            terminals=terminals,
            event_streams=self._streams.total(),
        )

    def _uid_of(self, user: str) -> int | None:
        """The Unix uid whose workspaces `user` may start sessions on."""
        configured = self.settings.user(user).uid
        if configured is not None:
            return configured
        try:
            return pwd.getpwnam(user).pw_uid
        except KeyError:
            return None

    def _spawn(self, session_id: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._launches[session_id] = task
        task.add_done_callback(lambda _: self._launches.pop(session_id, None))
        return task

    async def _launch(
        self,
        runtime: Runtime,
        session_id: str,
        *,
        spec: LaunchSpec | None = None,
        resume: State | None = None,
        phases: dict[str, float] | None = None,
    ) -> None:
        """Launch (or, after a restart, wait again for) a session's sandbox until OpenCode
        answers. `phases` gathers how long each step took (seconds), kept on the session."""
        phases = phases if phases is not None else {}
        try:
            if spec is not None:
                assert spec.workspace is not None  # a cold start's
                # Taken while the sandbox is prepared: the agent does nothing before a prompt.
                taking = _timed(
                    phases, "snapshot", self.snapshots.take(spec.session_id, spec.workspace)
                )
                snapshot = asyncio.ensure_future(taking)
                try:
                    state = await self._launch_sandbox(runtime, spec, phases)
                finally:
                    await asyncio.shield(snapshot)
            else:
                assert resume is not None
                state = resume
            await self._step(session_id, "waiting for OpenCode")
            await _timed(phases, "boot", self._wait_ready(runtime, session_id, state))
            await self._now_running(session_id, phases)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._start_failed(session_id, exc)

    async def _claim(self, runtime: Runtime, spec: LaunchSpec, phases: dict[str, float]) -> None:
        """Make a pool member's sandbox the session's: bind its workspace into it, check its
        OpenCode still answers, take the snapshot `changes` compares with. A member that stopped
        answering since the pool last looked (it does every few seconds) is removed and the
        session starts cold, as `spec` says."""
        session_id, workspace = spec.session_id, spec.workspace
        assert workspace is not None
        try:
            session = self._load(session_id)
            bind = asyncio.ensure_future(
                _timed(phases, "bind", runtime.bind(session_id, session.runtime_state, workspace))
            )
            try:
                await asyncio.shield(bind)
            except asyncio.CancelledError:
                # Stopped mid-bind: the mount finishes (it uses the workspace's descriptors,
                # closed once this task ends) before the stop removes the sandbox and its slot.
                await asyncio.wait({bind})
                raise
            except Exception:
                if await self._answers(session):
                    raise  # the member works: what failed is the workspace's
                await self._cold_instead(runtime, spec, phases)
                return
            if not await self._answers(session):
                await self._cold_instead(runtime, spec, phases)
                return
            await _timed(phases, "snapshot", self.snapshots.take(session_id, workspace))
            await self._now_running(session_id, phases)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._start_failed(session_id, exc)

    async def _answers(self, session: Session) -> bool:
        url = self.agent_url(session)
        return await agent.is_healthy(self._http, url, session.password, agent.PROBE_TIMEOUT)

    async def _cold_instead(
        self, runtime: Runtime, spec: LaunchSpec, phases: dict[str, float]
    ) -> None:
        """A claimed member no longer answers: remove what is left of it, then start cold."""
        session = self._load(spec.session_id)
        log.info("session %s: its pool member no longer answers; starting cold", session.id)
        await runtime.stop(session.id, session.runtime_state, 0)
        await self._change(
            session.id, lambda s: s.with_changes(started_from="cold", runtime_state={})
        )
        phases.pop("bind", None)
        await self._launch(runtime, session.id, spec=spec, phases=phases)

    async def _now_running(self, session_id: str, phases: dict[str, float]) -> None:
        took = {name: round(seconds, 4) for name, seconds in phases.items()}
        session = await self._change(
            session_id,
            lambda s: (
                s.advance(Status.RUNNING, step=None, phases=took)
                if s.status is Status.STARTING
                else s
            ),
        )
        if session.status is Status.RUNNING and session.started_at is not None:
            took_all = (session.started_at - session.created_at).total_seconds()
            self.metrics.starts.labels(session.runtime, session.started_from).observe(took_all)
        log.info("session %s running at %s", session_id, self.url(session),
                 extra={"session": session_id, "user": session.owner})  # fmt: skip

    async def _start_failed(self, session_id: str, exc: Exception) -> None:
        if not isinstance(exc, CodestationError):
            log.exception("session %s: unexpected error while starting", session_id)
        reason = str(exc) if isinstance(exc, CodestationError) else f"internal error: {exc!r}"
        code = exc.code if isinstance(exc, CodestationError) else "internal_error"
        runtime = session.runtime if (session := self.store.get(session_id)) else ""
        self.metrics.start_failures.labels(runtime, code).inc()
        await self._fail(session_id, reason, exc.log_tail if isinstance(exc, StartFailed) else "")

    async def _launch_sandbox(
        self, runtime: Runtime, spec: LaunchSpec, phases: dict[str, float]
    ) -> State:
        await self._step(spec.session_id, "preparing the sandbox")
        async with self._prepare_lock:
            await _timed(phases, "prepare", runtime.prepare(
                spec.profile, lambda line: log.info("prepare %s: %s", spec.session_id, line)
            ))  # fmt: skip
        await self._step(spec.session_id, "launching OpenCode")
        launch = asyncio.ensure_future(_timed(phases, "sandbox", runtime.start(spec)))
        try:
            state = await asyncio.shield(launch)
        except asyncio.CancelledError:
            # Stopped mid-launch: let the launch finish and record it, so the stop removes it.
            await asyncio.wait({launch})
            if not launch.cancelled() and launch.exception() is None:
                await self._record_state(spec.session_id, launch.result())
            raise
        await self._record_state(spec.session_id, state)
        return state

    async def _wait_ready(self, runtime: Runtime, session_id: str, state: State) -> None:
        session = self._load(session_id)

        async def ended() -> str | None:
            exit_ = await runtime.poll(session_id, state)
            return exit_.reason if exit_ else None

        await agent.wait_ready(self._http, self.agent_url(session), session.password,
                               self.settings.start_timeout, ended)  # fmt: skip

    async def _fail(self, session_id: str, reason: str, log_tail: str = "") -> None:
        """Mark a starting or running session failed, remove what is left of its sandbox, and
        keep the reason and the last lines of its log."""
        async with self._locks[session_id]:
            session = self._load(session_id)
            if session.status not in (Status.STARTING, Status.RUNNING):
                return  # a stop took over
            runtime = self.runtimes[session.runtime]
            try:
                tail = await runtime.stop(session_id, session.runtime_state, 0) or log_tail
            except RuntimeUnavailable as exc:
                # The session has failed either way; its sandbox goes once the engine is back.
                self._sweep.add(session.runtime)
                tail = ""
                reason = f"{reason} (its sandbox is removed once the engine answers: {exc})"
            error = reason if not tail else f"{reason}\n--- last log lines ---\n{tail.rstrip()}"
            self._save(
                session.advance(Status.FAILED, error=error, log_tail=tail or None, step=None)
            )
        self.snapshots.discard(session_id)
        log.warning("session %s failed: %s", session_id, reason,
                    extra={"session": session_id, "user": session.owner})  # fmt: skip

    # -- stopping --------------------------------------------------------------------------

    async def stop(self, caller: Caller, session_id: str) -> Session:
        """Stop one of `caller`'s sessions and remove its sandbox. Idempotent."""
        self.get(caller, session_id)
        return await self._stop(session_id, "requested")

    async def stop_all(self, caller: Caller, *, everyone: bool = False) -> list[Session]:
        """Stop `caller`'s live sessions; an admin may stop `everyone`'s."""
        if everyone and not caller.admin:
            raise Forbidden("only an admin may stop everyone's sessions; leave out all=true.")
        live = [s for s in self.store.list(live_only=True) if everyone or s.owner == caller.user]
        results = await asyncio.gather(
            *(self._stop(s.id, "requested") for s in live), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, RuntimeUnavailable):
                raise result
        # A session whose engine is down is listed as it is: stopping, until the engine is back.
        return [
            r if isinstance(r, Session) else self._load(s.id)
            for s, r in zip(live, results, strict=True)
        ]

    async def delete(self, caller: Caller, session_id: str) -> None:
        """Stop one of `caller`'s sessions and forget it."""
        self.get(caller, session_id)
        session = await self._stop(session_id, "requested")
        async with self._locks[session_id]:
            self.store.delete(session_id)
        self._publish("deleted", session)
        self._locks.pop(session_id, None)

    async def _stop(self, session_id: str, reason: str) -> Session:
        """Stop a session and remove its sandbox. Idempotent; safe to call concurrently.

        `reason` says why: requested, idle, max_age or shutdown. If the runtime's engine does
        not answer, the session stays `stopping` (RuntimeUnavailable): `watch` stops it once
        the engine is back."""
        self._stopping.add(session_id)
        try:
            return await self._stop_now(session_id, reason)
        finally:
            self._stopping.discard(session_id)

    async def _stop_now(self, session_id: str, reason: str) -> Session:
        async with self._locks[session_id]:
            session = self._load(session_id)
            if not session.status.live:
                return session
            if session.status is not Status.STOPPING:
                self._save(session.advance(Status.STOPPING, step="stopping", reason=reason))
            launch = self._launches.get(session_id)
        if launch is not None:
            launch.cancel()
            await asyncio.gather(launch, return_exceptions=True)
        async with self._locks[session_id]:
            session = self._load(session_id)
            if not session.status.live:
                return session  # a concurrent stop finished first
            runtime = self.runtimes.get(session.runtime)
            if runtime is None:  # recorded by another version: nothing here can remove it
                log.warning("session %s: its runtime %r is unknown here; forgetting its sandbox",
                            session_id, session.runtime)  # fmt: skip
                session = session.advance(Status.STOPPED, step=None)
                self._save(session)
                return session
            try:
                tail = await runtime.stop(
                    session_id, session.runtime_state, self.settings.stop_timeout
                )
            except RuntimeUnavailable as exc:
                log.warning("session %s: stop waits for its engine: %s", session_id, exc)
                raise RuntimeUnavailable(
                    f"{exc} Session {session_id} is marked stopping and is stopped as soon as "
                    "the engine answers again."
                ) from exc
            session = session.advance(Status.STOPPED, log_tail=tail or session.log_tail, step=None)
            self._save(session)
        self.snapshots.discard(session_id)
        log.info("session %s stopped", session_id,
                 extra={"session": session_id, "user": session.owner})  # fmt: skip
        return session

    # -- changes, as a stream -------------------------------------------------------------

    def open_stream(self, caller: Caller) -> Callable[[], None]:
        """Count one more long-lived stream of `caller`'s (an event stream, a followed log),
        or raise TooManyStreams; call what it returns to let it go (twice is harmless)."""
        if self._streams[caller.user] >= self.settings.max_streams_per_user:
            raise TooManyStreams(
                f"you have {self._streams[caller.user]} event streams and followed logs open, "
                "as many as you may (max_streams_per_user); close one (a tab, a `logs -f`)."
            )
        if self._streams.total() >= self.settings.max_streams:
            raise TooManyStreams(
                f"{self._streams.total()} event streams and followed logs are open, as many as "
                "this service holds (max_streams); try again later."
            )
        self._streams[caller.user] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._streams[caller.user] -= 1
                if self._streams[caller.user] <= 0:
                    del self._streams[caller.user]

        return release

    def subscribe(self, caller: Caller) -> asyncio.Queue[tuple[str, Session | None]]:
        """A queue of every change to a session `caller` may see, from now on: ("session",
        the session as saved) or ("deleted", the session as it was). A subscriber that falls
        `EVENTS_BUFFERED` changes behind is dropped: its queue then holds ("dropped", None)
        alone, and it should start again from a fresh list. Give it back with `unsubscribe`."""
        queue: asyncio.Queue[tuple[str, Session | None]] = asyncio.Queue(EVENTS_BUFFERED)
        self._subscribers[queue] = caller
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, Session | None]]) -> None:
        self._subscribers.pop(queue, None)

    def _publish(self, kind: str, session: Session) -> None:
        for queue, caller in list(self._subscribers.items()):
            if not caller.sees(session.owner):
                continue
            try:
                queue.put_nowait((kind, session))
            except asyncio.QueueFull:  # a slow reader: drop it rather than hold all it missed
                self.unsubscribe(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(("dropped", None))

    def _save(self, session: Session) -> None:
        self.store.save(session)
        self._publish("session", session)

    # -- small writes ----------------------------------------------------------------------

    async def _change(self, session_id: str, change: Callable[[Session], Session]) -> Session:
        async with self._locks[session_id]:
            current = self._load(session_id)
            updated = change(current)
            if updated is not current:
                self._save(updated)
            return updated

    async def _step(self, session_id: str, step: str) -> None:
        await self._change(
            session_id,
            lambda s: s.with_changes(step=step) if s.status is Status.STARTING else s,
        )

    async def _record_activity(self, session_id: str, at: datetime) -> Session:
        return await self._change(
            session_id, lambda s: s.with_changes(last_activity=max(at, s.last_activity or at))
        )

    async def _record_state(self, session_id: str, state: State) -> None:
        await self._change(session_id, lambda s: s.with_changes(runtime_state=state))


async def _timed(phases: dict[str, float], name: str, work: Awaitable[T]) -> T:
    """`work`'s result, its duration noted in `phases` under `name`."""
    began = time.perf_counter()
    try:
        return await work
    finally:
        phases[name] = time.perf_counter() - began


async def _each(items: Iterable[T], work: Callable[[T], Awaitable[object]], failure: str) -> int:
    """`work` on every item at once; one that fails is logged and does not stop the others.
    How many failed."""
    items = list(items)
    results = await asyncio.gather(*(work(item) for item in items), return_exceptions=True)
    failed = 0
    for item, result in zip(items, results, strict=True):
        if isinstance(result, Exception):
            failed += 1
            log.warning("%s %s: %s", failure, getattr(item, "id", item), result)
    return failed


def _memory_budget(settings: Settings) -> int:
    """`memory_budget`, or else the host's memory less `memory_reserve`."""
    if settings.memory_budget is not None:
        return size_bytes(settings.memory_budget)
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    return max(total - size_bytes(settings.memory_reserve), 0)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def _bounded(
    name: str, asked: float | None, profile: float | None, service: float, environment: str
) -> float:
    """The session's `name`: what was asked, if the environment's limit allows it."""
    limit = service if profile is None else profile
    if asked is None:
        return limit
    if limit and asked > limit:
        raise BadRequest(
            f"{name} may be at most {limit:g} s in environment {environment!r}; "
            "ask for less, or leave it out to get the most."
        )
    return asked
