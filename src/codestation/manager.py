"""SessionManager: the only code that changes a session's state.

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
import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx

from codestation import agent
from codestation.config import Settings
from codestation.errors import (
    AgentExited,
    CodestationError,
    SessionNotFound,
    StartTimeout,
    UnknownEnvironment,
)
from codestation.ports import PortAllocator
from codestation.runtimes.base import LaunchSpec, Runtime, State
from codestation.sessions import Session, Status, new_session_id, now
from codestation.store import Store
from codestation.workspaces import validate_workspace

log = logging.getLogger("codestation")

PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 1.0


class SessionManager:
    def __init__(self, settings: Settings, store: Store, runtime: Runtime) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.ports = PortAllocator(
            store, settings.port_range_start, settings.port_range_end, settings.publish_address
        )
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._launches: dict[str, asyncio.Task[None]] = {}
        self._prepare_lock = asyncio.Lock()
        self._http = httpx.AsyncClient()

    # -- lifecycle of the manager itself ---------------------------------------------------

    async def open(self) -> None:
        """Check the runtime answers, then bring the store in line with what really runs."""
        await self.runtime.check()
        await self.reconcile()

    async def close(self) -> None:
        """Stop watching; sessions keep running and are re-adopted at the next `open`."""
        tasks = list(self._launches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()
        await self.runtime.close()

    async def reconcile(self) -> None:
        live = self.store.list(live_only=True)
        await asyncio.gather(*(self._readopt(s) for s in live))
        known = {s.id for s in self.store.list(live_only=True)}
        orphans = await self.runtime.running_sessions() - known
        await asyncio.gather(
            *(self.runtime.stop(sid, {}, self.settings.stop_timeout) for sid in orphans)
        )
        if live or orphans:
            log.info(
                "reconciled %d live session(s); removed %d orphan sandbox(es)",
                len(live), len(orphans),
            )  # fmt: skip

    async def _readopt(self, session: Session) -> None:
        if session.status is Status.STOPPING:
            await self.stop(session.id)
            return
        exit_ = await self.runtime.poll(session.id, session.runtime_state)
        if exit_ is None and session.status is Status.STARTING:
            self._spawn(session.id, self._launch(session.id, resume=session.runtime_state))
        elif exit_ is not None:
            tail = await self.runtime.stop(
                session.id, session.runtime_state, self.settings.stop_timeout
            )
            await self._change(
                session.id,
                lambda s: s.advance(
                    Status.FAILED,
                    error=f"lost while codestation was down: {exit_.reason}",
                    log_tail=tail or s.log_tail,
                    step=None,
                ),
            )

    # -- reading ---------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        session = self.store.get(session_id)
        if session is None:
            raise SessionNotFound(
                f"there is no session {session_id!r}; list them with GET /api/v1/code/sessions."
            )
        return session

    def sessions(self) -> list[Session]:
        return self.store.list()

    def url(self, session: Session) -> str:
        return f"http://{self.settings.session_host}:{session.port}"

    async def logs(self, session_id: str, tail: int) -> str:
        session = self.get(session_id)
        if session.status.live:
            return await self.runtime.logs(session.id, session.runtime_state, tail)
        lines = (session.log_tail or "").splitlines(keepends=True)
        return "".join(lines[-tail:])

    async def follow(self, session_id: str, tail: int) -> AsyncIterator[bytes]:
        session = self.get(session_id)
        if not session.status.live:
            yield (await self.logs(session_id, tail)).encode()
            return
        async for chunk in self.runtime.follow(session.id, session.runtime_state, tail):
            yield chunk

    # -- starting --------------------------------------------------------------------------

    async def start(self, workspace: str, environment: str = "default") -> Session:
        """Record a new `starting` session and launch it in the background."""
        profile = self.settings.environments.get(environment)
        if profile is None:
            names = ", ".join(sorted(self.settings.environments))
            raise UnknownEnvironment(
                f"environment {environment!r} is not configured; choose one of: {names}."
            )
        path = validate_workspace(workspace, self.settings.allowed_roots, self.settings.data_dir)
        owner = path.stat()
        password = secrets.token_urlsafe(24)
        session_id = new_session_id()
        session = self.ports.lease(
            lambda port: Session(
                id=session_id,
                status=Status.STARTING,
                runtime=self.runtime.name,
                workspace=path,
                environment=environment,
                port=port,
                username=agent.USERNAME,
                password=password,
                created_at=now(),
                step="queued",
            )
        )
        spec = LaunchSpec(
            session_id=session.id,
            workspace=path,
            address=self.settings.publish_address,
            port=session.port,
            env=agent.agent_env(password, profile),
            profile=profile,
            uid=owner.st_uid,
            gid=owner.st_gid,
        )
        self._spawn(session.id, self._launch(session.id, spec=spec))
        log.info("session %s starting on port %d for %s", session.id, session.port, path)
        return session

    def _spawn(self, session_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._launches[session_id] = task
        task.add_done_callback(lambda _: self._launches.pop(session_id, None))

    async def _launch(
        self, session_id: str, *, spec: LaunchSpec | None = None, resume: State | None = None
    ) -> None:
        try:
            if spec is not None:
                state = await self._launch_sandbox(spec)
            else:
                assert resume is not None
                state = resume
            await self._step(session_id, "waiting for OpenCode")
            await self._wait_ready(session_id, state)
            session = await self._change(
                session_id,
                lambda s: (
                    s.advance(Status.RUNNING, step=None) if s.status is Status.STARTING else s
                ),
            )
            log.info("session %s running at %s", session_id, self.url(session))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, CodestationError):
                log.exception("session %s: unexpected error while starting", session_id)
            reason = str(exc) if isinstance(exc, CodestationError) else f"internal error: {exc!r}"
            await self._fail(session_id, reason)

    async def _launch_sandbox(self, spec: LaunchSpec) -> State:
        await self._step(spec.session_id, "preparing the sandbox")
        async with self._prepare_lock:
            await self.runtime.prepare(
                spec.profile, lambda line: log.info("prepare %s: %s", spec.session_id, line)
            )
        await self._step(spec.session_id, "launching OpenCode")
        launch = asyncio.ensure_future(self.runtime.start(spec))
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

    async def _wait_ready(self, session_id: str, state: State) -> None:
        session = self.get(session_id)
        host = self.settings.publish_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        url = f"http://{host}:{session.port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        while True:
            remaining = deadline - loop.time()
            timeout = max(0.05, min(PROBE_TIMEOUT, remaining))
            if await agent.is_healthy(self._http, url, session.password, timeout):
                return
            exit_ = await self.runtime.poll(session_id, state)
            if exit_ is not None:
                raise AgentExited(f"OpenCode ended before it was ready: {exit_.reason}")
            if loop.time() >= deadline:
                raise StartTimeout(
                    f"OpenCode did not answer {url}/global/health within "
                    f"{self.settings.start_timeout:g} s (start_timeout)"
                )
            await asyncio.sleep(PROBE_INTERVAL)

    async def _fail(self, session_id: str, reason: str) -> None:
        async with self._locks[session_id]:
            session = self.get(session_id)
            if session.status is not Status.STARTING:
                return  # a stop took over
            tail = await self.runtime.stop(session_id, session.runtime_state, 0)
            error = reason if not tail else f"{reason}\n--- last log lines ---\n{tail.rstrip()}"
            self.store.save(
                session.advance(Status.FAILED, error=error, log_tail=tail or None, step=None)
            )
        log.warning("session %s failed: %s", session_id, reason)

    # -- stopping --------------------------------------------------------------------------

    async def stop(self, session_id: str) -> Session:
        """Stop a session and remove its sandbox. Idempotent; safe to call concurrently."""
        async with self._locks[session_id]:
            session = self.get(session_id)
            if not session.status.live:
                return session
            if session.status is not Status.STOPPING:
                self.store.save(session.advance(Status.STOPPING, step="stopping"))
            launch = self._launches.get(session_id)
        if launch is not None:
            launch.cancel()
            await asyncio.gather(launch, return_exceptions=True)
        async with self._locks[session_id]:
            session = self.get(session_id)
            if not session.status.live:
                return session  # a concurrent stop finished first
            tail = await self.runtime.stop(
                session_id, session.runtime_state, self.settings.stop_timeout
            )
            session = session.advance(Status.STOPPED, log_tail=tail or session.log_tail, step=None)
            self.store.save(session)
        log.info("session %s stopped", session_id)
        return session

    async def stop_all(self) -> list[Session]:
        live = self.store.list(live_only=True)
        return list(await asyncio.gather(*(self.stop(s.id) for s in live)))

    async def delete(self, session_id: str) -> None:
        await self.stop(session_id)
        async with self._locks[session_id]:
            self.store.delete(session_id)
        self._locks.pop(session_id, None)

    # -- small writes ----------------------------------------------------------------------

    async def _change(self, session_id: str, change: Callable[[Session], Session]) -> Session:
        async with self._locks[session_id]:
            current = self.get(session_id)
            updated = change(current)
            if updated is not current:
                self.store.save(updated)
            return updated

    async def _step(self, session_id: str, step: str) -> None:
        await self._change(
            session_id,
            lambda s: s.with_changes(step=step) if s.status is Status.STARTING else s,
        )

    async def _record_state(self, session_id: str, state: State) -> None:
        await self._change(session_id, lambda s: s.with_changes(runtime_state=state))
