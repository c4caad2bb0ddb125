"""The Docker runtime: one container per session, from the sandbox image.

The workspace is bind-mounted read-write at /workspace and OpenCode runs there as the
workspace owner's uid:gid (so what the agent writes belongs to the user), with every capability
dropped and no new privileges. Port 8080 inside is published on the leased host port. The
container is named `codestation-<session id>` and labelled, so a session can be found again
after a restart even if its state was never recorded.

Networks (`network.py` says what each environment's `network` allows): `full` sessions sit
on Docker's default bridge. `none` and `egress` sessions sit on a bridge of codestation's
(`codestation-none`, `codestation-egress-<hash of allow>`) with inter-container traffic off,
whose traffic the host's firewall filters: a chain per bridge in DOCKER-USER (what leaves
for elsewhere) and CS-HOST in INPUT (nothing reaches the host itself, but answers to its own
connections: the published port). The port stays published on the host's loopback.

The Docker SDK is synchronous; calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from codestation import agent, network, slots
from codestation.config import EnvironmentProfile, Limits, Settings
from codestation.errors import RuntimeUnavailable, StartFailed
from codestation.image import ensure_image, image_tag
from codestation.runtimes.base import Exit, LaunchSpec, Report, Runtime, State, pumped
from codestation.workspaces import Workspace

LABEL_MANAGED = "codestation.managed"
LABEL_SESSION = "codestation.session"
LABEL_DATA_DIR = "codestation.data-dir"

T = TypeVar("T")
HOST_CHAIN = "CS-HOST"


def container_name(session_id: str) -> str:
    return f"codestation-{session_id}"


class DockerRuntime(Runtime):
    name = "docker"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._client: docker.DockerClient | None = None
        self._network_lock = threading.Lock()
        self._filled: set[str] = set()  # firewall chains written by this process

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                # Enough pooled connections for concurrent starts, each in its own thread.
                self._client = docker.DockerClient.from_env(max_pool_size=32)
            except docker.errors.DockerException as exc:
                raise RuntimeUnavailable(self._unreachable(exc)) from exc
        return self._client

    @staticmethod
    def _unreachable(exc: Exception) -> str:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return (
            f"the Docker engine at {where} does not answer ({exc}); start it "
            "(`sudo systemctl start docker`, or `sudo dockerd &`) or point DOCKER_HOST at one."
        )

    async def _call(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`work(*args, **kwargs)` in a worker thread; an engine that does not answer is
        RuntimeUnavailable, whatever call met it."""
        try:
            return await asyncio.to_thread(work, *args, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise RuntimeUnavailable(self._unreachable(exc)) from exc
        except docker.errors.DockerException as exc:
            if isinstance(exc, docker.errors.APIError):
                raise
            raise RuntimeUnavailable(self._unreachable(exc)) from exc

    def inside_port(self, port: int) -> int:
        return agent.CONTAINER_PORT

    def enforced(self, limits: Limits) -> dict[str, Any]:
        return {k: v for k, v in limits.model_dump().items() if v is not None}

    async def check(self) -> None:
        try:
            await self._call(lambda: self.client.ping())
        except (docker.errors.APIError, OSError) as exc:
            raise RuntimeUnavailable(self._unreachable(exc)) from exc

    def image_for(self, profile: EnvironmentProfile) -> str:
        return profile.image or image_tag(self.settings)

    async def prepare(self, profile: EnvironmentProfile, report: Report) -> None:
        await asyncio.to_thread(agent.opencode_config, self.settings)
        image = profile.image
        if image is None:
            await self._call(lambda: ensure_image(self.client, self.settings, report))
            return
        try:
            await self._call(lambda: self.client.images.get(image))
        except docker.errors.ImageNotFound:
            report(f"pulling {image}")
            try:
                await self._call(lambda: self.client.images.pull(image))
            except docker.errors.APIError as exc:
                raise StartFailed(
                    f"image {profile.image} is not on this host and cannot be pulled "
                    f"({exc.explanation or exc}); build or load it, or fix the environment's image."
                ) from exc

    async def start(self, spec: LaunchSpec) -> State:
        return await self._call(self._start, spec)

    def _network(self, profile: EnvironmentProfile) -> dict[str, Any]:
        """`containers.run` arguments that put a session on its environment's network,
        making the bridge and its firewall rules first if need be."""
        if profile.network == "full":
            return {}
        if profile.network == "none":
            name, bridge, chain = "codestation-none", "cs-none", "CS-NONE"
        else:
            key = hashlib.sha256(",".join(sorted(map(str, profile.allow))).encode()).hexdigest()
            name, bridge, chain = (
                f"codestation-egress-{key[:8]}",
                f"cs-eg-{key[:8]}",
                f"CS-EG-{key[:8]}",
            )
        with self._network_lock:
            if chain not in self._filled:
                network.restore(
                    [
                        "*filter", f":{chain} - [0:0]", f":{HOST_CHAIN} - [0:0]",
                        *network.rules(chain, profile.network, profile.allow, version=4),
                        *network.rules(HOST_CHAIN, "none", [], version=4, passed="ACCEPT"),
                        "COMMIT",
                    ],
                    version=4,
                )  # fmt: skip
                self._filled.add(chain)
            # Checked at every start: a reboot or a firewall reload drops them.
            _jump("DOCKER-USER", bridge, chain)
            _jump("INPUT", bridge, HOST_CHAIN)
            try:
                self.client.networks.get(name)
            except docker.errors.NotFound:
                try:
                    self.client.networks.create(
                        name,
                        driver="bridge",
                        check_duplicate=True,
                        options={
                            "com.docker.network.bridge.name": bridge,
                            "com.docker.network.bridge.enable_icc": "false",
                            "com.docker.network.bridge.enable_ip_masquerade": "true",
                        },
                        labels={LABEL_MANAGED: "true"},
                    )
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: another service made it meanwhile
                        raise
        # With no DNS server reachable, a lookup fails in a second rather than ten.
        return {
            "network": name,
            **({"dns_opt": ["timeout:1", "attempts:1"]} if profile.network == "none" else {}),
        }

    def _start(self, spec: LaunchSpec) -> State:
        name = container_name(spec.session_id)
        networking = self._network(spec.profile)
        workspace = spec.workspace
        if workspace is None:  # ahead of need: the slot, whose mounts reach in (rslave)
            slot = self.slots.make(spec.session_id)
            mounts = [Mount("/workspace", str(slot), type="bind", propagation="rslave")]
        else:
            # Where the checked directory is now (it follows a rename, never a symlink put in
            # its place); the engine mounts by path, so the command's guard checks it got that
            # directory. A Mount, unlike `volumes`, never creates a missing source.
            mounts = [
                Mount("/workspace", workspace.current_path, type="bind"),
                *(
                    Mount(
                        f"/workspace/{pin.relative}",
                        pin.current_path,
                        type="bind",
                        read_only=pin.read_only,
                    )
                    for pin in workspace.pinned
                ),
            ]
        # OpenCode's global configuration, shared read-only (see `agent.opencode_config`).
        config = agent.opencode_config(self.settings)
        mounts.append(Mount(agent.CONFIG_INSIDE, str(config), type="bind", read_only=True))
        try:
            container: Container = self.client.containers.run(
                self.image_for(spec.profile),
                command=agent.serve_command("0.0.0.0", agent.CONTAINER_PORT, workspace),
                name=name,
                detach=True,
                init=True,
                user=f"{spec.uid}:{spec.gid}",
                # Not /workspace in a slot's sandbox: the workspace covers it later, and a
                # process keeps the directory it started in.
                working_dir="/workspace" if workspace is not None else "/tmp",
                environment={"HOME": "/tmp", **spec.env},
                mounts=mounts,
                ports={f"{agent.CONTAINER_PORT}/tcp": (spec.address, spec.port)},
                labels={
                    LABEL_MANAGED: "true",
                    LABEL_SESSION: spec.session_id,
                    LABEL_DATA_DIR: str(self.settings.data_dir),
                },
                log_config=LogConfig(
                    type=LogConfig.types.JSON,
                    config={"max-size": self.settings.log_max_size, "max-file": "2"},
                ),
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                **networking,
                **_limits(spec.limits),
            )
        except docker.errors.APIError as exc:
            self._remove(name)  # `run` creates before it starts; a failed start leaves one
            self.slots.release(spec.session_id)
            raise StartFailed(
                f"Docker could not start the session's container: {exc.explanation or exc}"
            ) from exc
        return {"container_id": container.id, "container_name": name}

    def can_bind(self) -> bool:
        return slots.supported()

    async def bind(self, session_id: str, state: State, workspace: Workspace) -> None:
        container = await self._call(self._container, session_id, state)
        pid = container.attrs["State"].get("Pid") if container is not None else None
        if not pid:
            raise StartFailed("the session's container is not running")
        await self._bind_at(session_id, f"/proc/{pid}/root", workspace)

    def _container(self, session_id: str, state: State) -> Container | None:
        for ref in (state.get("container_id"), container_name(session_id)):
            if not ref:
                continue
            try:
                return self.client.containers.get(ref)
            except docker.errors.NotFound:
                continue
        return None

    def _remove(self, ref: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(ref, force=True, v=True)

    async def poll(self, session_id: str, state: State) -> Exit | None:
        return await self._call(self._poll, session_id, state)

    def _poll(self, session_id: str, state: State) -> Exit | None:
        container = self._container(session_id, state)
        if container is None:
            return Exit(reason="its container is gone")
        info: dict[str, Any] = container.attrs["State"]
        if info.get("Running"):
            return None
        code = info.get("ExitCode")
        oom = bool(info.get("OOMKilled"))
        reason = f"OpenCode exited with status {code}" + (" (out of memory)" if oom else "")
        if info.get("Error"):
            reason += f": {info['Error']}"
        return Exit(reason=reason, code=code, oom_killed=oom)

    async def stop(self, session_id: str, state: State, grace: float) -> str:
        return await self._call(self._stop, session_id, state, grace)

    def _stop(self, session_id: str, state: State, grace: float) -> str:
        container = self._container(session_id, state)
        tail = ""
        if container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                container.stop(timeout=int(max(grace, 0)))
            tail = self._tail(container, self.settings.log_tail_lines)
            self._remove(container.id or container_name(session_id))
        self.slots.release(session_id)  # once nothing in the sandbox holds it
        return tail

    @staticmethod
    def _tail(container: Container, lines: int) -> str:
        try:
            raw: bytes = container.logs(stdout=True, stderr=True, tail=lines)
        except docker.errors.NotFound:
            return ""
        return raw.decode("utf-8", "replace")

    async def logs(self, session_id: str, state: State, tail: int) -> str:
        container = await self._call(self._container, session_id, state)
        if container is None:
            return ""
        return await self._call(self._tail, container, tail)

    async def follow(self, session_id: str, state: State, tail: int) -> AsyncIterator[bytes]:
        container = await self._call(self._container, session_id, state)
        if container is None:
            return
        stream = await self._call(
            container.logs, stdout=True, stderr=True, stream=True, follow=True, tail=tail
        )
        async for chunk in pumped(stream, f"logs-{session_id}"):
            yield chunk

    async def ended(self) -> AsyncIterator[str]:
        filters = {
            "type": "container",
            "event": "die",
            "label": [f"{LABEL_MANAGED}=true", f"{LABEL_DATA_DIR}={self.settings.data_dir}"],
        }
        stream = await self._call(lambda: self.client.events(decode=True, filters=filters))
        async for event in pumped(stream, "docker-events"):
            session_id = event.get("Actor", {}).get("Attributes", {}).get(LABEL_SESSION)
            if session_id:
                yield session_id

    async def running_sessions(self) -> set[str]:
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_DATA_DIR}={self.settings.data_dir}"]
        containers = await self._call(
            lambda: self.client.containers.list(all=True, filters={"label": labels})
        )
        held = {c.labels[LABEL_SESSION] for c in containers if LABEL_SESSION in c.labels}
        return held | self.slots.ids()

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _jump(chain: str, bridge: str, target: str) -> None:
    """Make sure `chain` sends what comes in on `bridge` to `target`, first of all."""
    rule = [chain, "-i", bridge, "-j", target]
    if subprocess.run(["iptables", "-w", "-C", *rule], capture_output=True).returncode == 0:
        return
    added = subprocess.run(
        ["iptables", "-w", "-I", chain, "1", "-i", bridge, "-j", target],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        raise StartFailed(
            f"the firewall rule that keeps sessions off the host could not be added "
            f"({added.stderr.strip()}); codestation must run as root for network none or "
            "egress, or set the environment's network to full (unsafe)."
        )


def _limits(limits: Limits) -> dict[str, Any]:
    """`limits` as arguments of `containers.run`; memory includes swap, so it is a hard cap."""
    args: dict[str, Any] = {}
    if limits.memory is not None:
        args["mem_limit"] = args["memswap_limit"] = limits.memory
    if limits.cpus is not None:
        args["nano_cpus"] = int(limits.cpus * 1e9)
    if limits.pids is not None:
        args["pids_limit"] = limits.pids
    tmpfs = {"/tmp/.config": "rw,nosuid,nodev,mode=1777,size=16m"}  # writable around OpenCode's
    if limits.tmp is not None:  # else /tmp is the container's own layer: disk, unbounded
        tmpfs["/tmp"] = f"rw,exec,nosuid,nodev,mode=1777,size={limits.tmp}"
    args["tmpfs"] = tmpfs
    return args
