"""The Kubernetes runtime: one Pod per session, from the sandbox image, in one namespace.

The Pod runs `opencode serve` (behind the workspace guard) as the workspace owner's uid:gid,
with every capability dropped, no privilege escalation and a read-only root file system; /tmp
(also HOME) is an emptyDir, held in memory and bounded when `limits.tmp` is set. Its
environment, the session's password among it, comes from a Secret of its own through
`envFrom`: the Pod's spec holds none of it. No service account token is mounted, no service
links are injected. `limits` become the container's requests and limits (Kubernetes has no
per-Pod process limit: `pids` is the node's business).

Workspaces (`[environments.<name>.kubernetes]`): a hostPath of the workspace's own path (one
node, the machine codestation checks workspaces on), or a subPath of a PersistentVolumeClaim
of many workspaces that codestation sees mounted at `root`.

codestation reaches OpenCode at the Pod's IP, port 8080, where it can route to Pod IPs (it
runs in the cluster, or on a node), else through the API server's port-forward
(`portforward.py`; `kubernetes_reach` chooses). The API server's Pod proxy would not do: it
strips the Authorization header OpenCode needs. Readiness is codestation's own probe, as for
the other runtimes: a probe in the Pod's spec would have to carry the password.

Pods are labelled with the session id and the service's id (random, kept in its data
directory), which is how they are found again after a restart. A watch of those Pods
(`ended`) tells the manager at once when one ends; `poll` reads the Pod and says why: its
container's end (OOMKilled; an exit code), an eviction, a deletion, a lost node.

The official client is synchronous; calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from codestation import agent, network
from codestation.config import EnvironmentProfile, KubernetesStorage, Limits, Settings, size_bytes
from codestation.errors import RuntimeUnavailable, StartFailed
from codestation.image import image_tag
from codestation.runtimes.base import Exit, LaunchSpec, Report, Runtime, State, pumped
from codestation.runtimes.portforward import PortForwards
from codestation.workspaces import Workspace

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_SESSION = "codestation.dev/session"
LABEL_SERVICE = "codestation.dev/service"
LABEL_NETWORK = "codestation.dev/network"
CONTAINER = "opencode"
# How long `start` waits for the Pod to be given an IP (scheduled, its sandbox made).
PLACED_TIMEOUT = 60.0
SERVICE_ID_FILE = "kubernetes-service"
# How long after its grace period the kubelet may take to confirm a Pod's end, and then how
# long a Pod removed by force may take to go.
CONFIRM_TIMEOUT = 10.0
GONE_TIMEOUT = 30.0
# How long any one call may wait for the API server (a watch: beyond its own end), so that a
# server that took the connection and never answers fails the call instead of holding a thread.
CALL = 30.0
# The most of a log's last lines read at once.
TAIL_BYTES = 64 * 1024
# Transport failures of the client: the API server is unreachable or went away.
UNREACHABLE = (urllib3.exceptions.HTTPError, OSError)

T = TypeVar("T")


def object_name(session_id: str) -> str:
    """The session's Pod and Secret."""
    return f"codestation-{session_id}"


class KubernetesRuntime(Runtime):
    name = "kubernetes"
    local = False  # the cluster places and bounds its Pods: no host port, no host memory

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._core: k8s.CoreV1Api | None = None
        self.namespace = settings.kubernetes_namespace
        self._service: str | None = None
        # Its own threads: a slow API server, or many stops waiting for their Pods, must not
        # hold up the other runtimes' calls (asyncio's default pool is shared and small).
        self._threads = concurrent.futures.ThreadPoolExecutor(32, "kubernetes")
        self.forwards = PortForwards(
            lambda: self.core.api_client.configuration,
            self.namespace,
            agent.CONTAINER_PORT,
            self._threads,
        )
        self._in_cluster = False  # whether it runs in the cluster, by its Pod's account

    @property
    def service(self) -> str:
        """This service's id on the cluster, made once and kept in its data directory: the
        label of its Pods. Random, since data directories on two machines may share a path
        and a namespace, and each service removes the Pods of its own no record knows."""
        if self._service is None:
            path = self.settings.data_dir / SERVICE_ID_FILE
            try:
                self._service = path.read_text().strip()
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                made = secrets.token_hex(8)
                try:
                    with path.open("x") as file:  # two starting at once: one id
                        file.write(made)
                except FileExistsError:
                    made = path.read_text().strip()
                self._service = made
        return self._service

    @property
    def selector(self) -> str:
        return f"{LABEL_MANAGED}=codestation,{LABEL_SERVICE}={self.service}"

    @property
    def core(self) -> k8s.CoreV1Api:
        if self._core is None:
            self._core = k8s.CoreV1Api(self._api_client())
        return self._core

    @property
    def networking(self) -> k8s.NetworkingV1Api:
        return k8s.NetworkingV1Api(self.core.api_client)

    def _api_client(self) -> k8s.ApiClient:
        if self.settings.kubernetes_config is not None:
            return k8s_config.new_client_from_config(
                config_file=str(self.settings.kubernetes_config)
            )
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            return k8s_config.new_client_from_config()  # $KUBECONFIG, else ~/.kube/config
        self._in_cluster = True
        return k8s.ApiClient(configuration)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a worker thread. A cluster that cannot be reached, is not
        configured or refuses (but for 404, which callers read as "gone") is
        RuntimeUnavailable, whatever call met it: never an error of the client's own."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, lambda: fn(*args, **kwargs))
        except k8s_config.ConfigException as exc:
            raise RuntimeUnavailable(f"no cluster for the kubernetes runtime: {exc}") from exc
        except UNREACHABLE as exc:
            raise RuntimeUnavailable(f"the cluster's API server does not answer: {exc}") from exc
        except ApiException as exc:
            if exc.status == 404:
                raise
            raise RuntimeUnavailable(f"the cluster refused: {_api_message(exc)}") from exc

    def inside_port(self, port: int) -> int:
        return agent.CONTAINER_PORT

    def address(self, session_id: str, port: int, state: State) -> tuple[str, int]:
        ip = state.get("ip")
        # A start cut off before it said where its Pod is (a restart) is reached by name.
        if not ip or state.get("reach") == "port-forward":
            return self.forwards.address(object_name(session_id))
        return (str(ip), agent.CONTAINER_PORT)

    def url(self, session_id: str, port: int, state: State) -> str:
        host, inside = self.address(session_id, port, state)
        return f"http://{f'[{host}]' if ':' in host else host}:{inside}"

    def enforced(self, limits: Limits) -> dict[str, Any]:
        return {k: v for k, v in limits.model_dump().items() if v is not None and k != "pids"}

    async def check(self) -> None:
        await self._call(self._list_one)

    def _list_one(self) -> None:
        try:
            core = self.core
        except k8s_config.ConfigException as exc:
            raise RuntimeUnavailable(
                f"no cluster to run sessions in ({exc}): set kubernetes_config to a kubeconfig, "
                "or run codestation in the cluster."
            ) from exc
        try:
            core.list_namespaced_pod(self.namespace, limit=1, _request_timeout=10)
        except ApiException as exc:
            raise RuntimeUnavailable(
                f"the cluster refused to list Pods in namespace {self.namespace} "
                f"({_api_message(exc)}); give codestation's account the rights of "
                "deploy/kubernetes's Role there."
            ) from exc

    def image_for(self, profile: EnvironmentProfile) -> str:
        return profile.image or image_tag(self.settings)

    async def prepare(self, profile: EnvironmentProfile, report: Report) -> None:
        # The nodes pull the image themselves (or have it: `scripts/kubernetes.sh` loads it).
        await self._call(self.image_for, profile)

    async def start(self, spec: LaunchSpec) -> State:
        if spec.workspace is None:
            raise StartFailed("the kubernetes runtime starts no sandboxes ahead of need")
        return await self._call(self._start, spec, spec.workspace)

    def _start(self, spec: LaunchSpec, workspace: Workspace) -> State:
        name = object_name(spec.session_id)
        labels = {
            LABEL_MANAGED: "codestation",
            LABEL_SERVICE: self.service,
            LABEL_SESSION: spec.session_id,
        }
        storage = spec.profile.kubernetes
        policy = network_policy(spec.profile, self.service)
        if policy is not None and policy.spec is not None:
            labels.update(policy.spec.pod_selector.match_labels or {})
        volumes, mounts = self._workspace(storage, workspace)
        tmp = k8s.V1EmptyDirVolumeSource(
            medium="Memory" if spec.limits.tmp else None,
            size_limit=str(size_bytes(spec.limits.tmp)) if spec.limits.tmp else None,
        )
        volumes.append(k8s.V1Volume(name="tmp", empty_dir=tmp))
        mounts.insert(0, k8s.V1VolumeMount(name="tmp", mount_path="/tmp"))
        if storage.volume == "hostPath":
            # OpenCode's configuration, made once on this host (`agent.opencode_config`).
            config = str(agent.opencode_config(self.settings))
            volumes.append(_host_path("opencode-config", config, "Directory"))
            mounts.append(
                k8s.V1VolumeMount(
                    name="opencode-config", mount_path=agent.CONFIG_INSIDE, read_only=True
                )
            )
        secret = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name, labels=labels),
            type="Opaque",
            data={k: base64.b64encode(v.encode()).decode() for k, v in spec.env.items()},
        )
        container = k8s.V1Container(
            name=CONTAINER,
            image=self.image_for(spec.profile),
            image_pull_policy="IfNotPresent",
            # A claim is the same file system that codestation checked, mounted on the node
            # under a device number of its own: its files keep their inode numbers.
            command=agent.serve_command(
                "0.0.0.0", agent.CONTAINER_PORT, workspace, inode_only=storage.volume == "claim"
            ),
            working_dir="/workspace",
            env=[k8s.V1EnvVar(name="HOME", value="/tmp")],
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name))],
            ports=[k8s.V1ContainerPort(container_port=agent.CONTAINER_PORT, name="opencode")],
            resources=_resources(spec.limits),
            security_context=k8s.V1SecurityContext(
                run_as_user=spec.uid,
                run_as_group=spec.gid,
                allow_privilege_escalation=False,
                privileged=False,
                read_only_root_filesystem=True,
                capabilities=k8s.V1Capabilities(drop=["ALL"]),
            ),
            volume_mounts=mounts,
        )
        pod = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=name, labels=labels),
            spec=k8s.V1PodSpec(
                containers=[container],
                volumes=volumes,
                restart_policy="Never",  # a session whose agent ended has failed
                automount_service_account_token=False,
                enable_service_links=False,
                # The pause container is then pid 1 (it reaps, as Docker's init does) and
                # OpenCode gets SIGTERM as any process does: pid 1 would ignore it.
                share_process_namespace=True,
                # The container engine's default syscall filter, as Docker sessions have: the
                # 1.20 kubelet runs Pods unconfined unless told.
                security_context=k8s.V1PodSecurityContext(
                    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")
                ),
                termination_grace_period_seconds=int(self.settings.stop_timeout),
            ),
        )
        try:
            if policy is not None:
                self._ensure_policy(policy)
            self.core.create_namespaced_secret(self.namespace, secret, _request_timeout=CALL)
            made = self.core.create_namespaced_pod(self.namespace, pod, _request_timeout=CALL)
            # The Secret goes with its Pod, whoever deletes it.
            owner = {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": made.metadata.uid}
            self.core.patch_namespaced_secret(
                name,
                self.namespace,
                {"metadata": {"ownerReferences": [owner]}},
                _request_timeout=CALL,
            )
            ip = self._placed(name)
            reach = self.settings.kubernetes_reach
            if reach == "auto":
                # Only in the cluster is a Pod's IP surely the Pod's: elsewhere it may be no
                # route at all, or another machine of the same private range, which would
                # be sent the session's password.
                reach = "pod" if self._in_cluster else "port-forward"
        except (ApiException, *UNREACHABLE) as exc:
            self._undo(name)
            reason = _api_message(exc) if isinstance(exc, ApiException) else str(exc)
            raise StartFailed(f"Kubernetes could not start the session's Pod: {reason}") from exc
        except StartFailed as exc:
            # What the agent said goes with its Pod: read first, for the failure's record.
            tail = ""
            with contextlib.suppress(*UNREACHABLE):
                tail = self._tail(name, self.settings.log_tail_lines)
            self._undo(name)
            raise StartFailed(str(exc), log_tail=tail) from exc
        uid = made.metadata.uid
        return {"pod": name, "namespace": self.namespace, "ip": ip, "uid": uid, "reach": reach}

    def _ensure_policy(self, policy: k8s.V1NetworkPolicy) -> None:
        """The environment's policy, made once: its name is a hash of what it says."""
        try:
            self.networking.create_namespaced_network_policy(
                self.namespace, policy, _request_timeout=CALL
            )
        except ApiException as exc:
            if exc.status != 409:  # 409: made already, by this start or an earlier one
                raise

    def _workspace(
        self, storage: KubernetesStorage, workspace: Workspace
    ) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
        """The volumes and mounts that put `workspace` (and its pinned paths) at /workspace."""
        if storage.volume == "hostPath":
            volumes = [_host_path("workspace", workspace.current_path, "Directory")]
            mounts = [k8s.V1VolumeMount(name="workspace", mount_path="/workspace")]
            for i, pin in enumerate(workspace.pinned):
                kind = "Directory" if Path(pin.current_path).is_dir() else "File"
                volumes.append(_host_path(f"pin-{i}", pin.current_path, kind))
                mounts.append(
                    k8s.V1VolumeMount(
                        name=f"pin-{i}",
                        mount_path=f"/workspace/{pin.relative}",
                        read_only=pin.read_only,
                    )
                )
            return volumes, mounts
        assert storage.root is not None  # KubernetesStorage checks both
        assert storage.claim is not None
        where = Path(workspace.current_path)
        if not where.is_relative_to(storage.root) or where == storage.root:
            raise StartFailed(
                f"workspace {where} is not inside {storage.root}, where this environment's "
                f"claim {storage.claim} is mounted: start sessions on directories beneath it"
            )
        # The guard goes by inode there, and inode numbers are one file system's own.
        device = os.stat(storage.root).st_dev
        if any(d != device for d in (workspace.device, *(p.device for p in workspace.pinned))):
            raise StartFailed(
                f"workspace {where} is on another file system than {storage.root} (a mount or "
                "a subvolume inside the claim): start sessions on the claim's own directories"
            )
        claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=storage.claim)
        volumes = [k8s.V1Volume(name="workspace", persistent_volume_claim=claim)]
        sub = str(where.relative_to(storage.root))
        mounts = [k8s.V1VolumeMount(name="workspace", mount_path="/workspace", sub_path=sub)]
        for pin in workspace.pinned:
            mounts.append(
                k8s.V1VolumeMount(
                    name="workspace",
                    mount_path=f"/workspace/{pin.relative}",
                    sub_path=f"{sub}/{pin.relative}",
                    read_only=pin.read_only,
                )
            )
        return volumes, mounts

    def _placed(self, name: str) -> str:
        """The Pod's IP once it has one; StartFailed if it ends or never gets one."""
        watcher = watch.Watch()
        last: k8s.V1Pod | None = None
        try:
            for event in watcher.stream(
                self.core.list_namespaced_pod,
                self.namespace,
                field_selector=f"metadata.name={name}",
                timeout_seconds=int(PLACED_TIMEOUT),
                _request_timeout=PLACED_TIMEOUT + CALL,
            ):
                pod: k8s.V1Pod = event["object"]
                last = pod
                ended = why_ended(pod) if event["type"] != "DELETED" else "its Pod was deleted"
                if ended:
                    raise StartFailed(f"the session's Pod ended before OpenCode served: {ended}")
                if pod.status is not None and pod.status.pod_ip:
                    return str(pod.status.pod_ip)
                stuck = why_stuck(pod)
                if stuck:
                    raise StartFailed(f"the session's Pod cannot start: {stuck}")
        finally:
            watcher.stop()
        unscheduled = [
            c.message
            for c in ((last.status.conditions or []) if last and last.status else [])
            if c.type == "PodScheduled" and c.status == "False" and c.message
        ]
        raise StartFailed(
            f"the session's Pod was given no address within {PLACED_TIMEOUT:.0f} s"
            + (f": {unscheduled[0]}" if unscheduled else "")
            + " (lower the environment's limits, or free room in the cluster)"
        )

    def _undo(self, name: str) -> None:
        """What a failed start made, gone as far as the cluster lets it now; what it does not
        is an orphan the manager's sweep removes (by label) once the cluster answers."""
        with contextlib.suppress(ApiException, *UNREACHABLE):
            self._delete(name, grace=1)

    def _delete(self, name: str, grace: int) -> None:
        for delete in (self.core.delete_namespaced_pod, self.core.delete_namespaced_secret):
            try:
                delete(name, self.namespace, grace_period_seconds=grace, _request_timeout=CALL)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def _pod(self, session_id: str) -> k8s.V1Pod | None:
        return self._pod_named(object_name(session_id))

    def _pod_named(self, name: str) -> k8s.V1Pod | None:
        try:
            return self.core.read_namespaced_pod(name, self.namespace, _request_timeout=CALL)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def poll(self, session_id: str, state: State) -> Exit | None:
        pod = await self._call(self._pod, session_id)
        if pod is None:
            return Exit(reason="its Pod is gone")
        if state.get("uid") and pod.metadata and pod.metadata.uid != state["uid"]:
            # Its name taken by another Pod since: not the session's agent, nor its address.
            return Exit(reason="its Pod was deleted and another made in its place")
        ended = why_ended(pod)
        if ended is None:
            waiting = why_stuck(pod)  # it would wait for ever: a missing image, a bad spec
            return Exit(reason=f"its container cannot start: {waiting}") if waiting else None
        code, oom = _exit_code(pod)
        return Exit(reason=ended, code=code, oom_killed=oom)

    async def stop(self, session_id: str, state: State, grace: float) -> str:
        try:
            return await self._call(self._stop, session_id, grace)
        finally:
            await self.forwards.close(object_name(session_id))

    def _stop(self, session_id: str, grace: float) -> str:
        tail = self._tail(object_name(session_id), self.settings.log_tail_lines)
        # Never 0, which the API server takes as removal by force: the kubelet may not have
        # ended the agent yet (nor ever, on a lost node).
        name, grace = object_name(session_id), max(math.ceil(grace), 1)
        self._delete(name, grace=grace)
        # Stopped means the agent no longer runs: wait for the kubelet to have ended it. A
        # kubelet that has not confirmed it well after the grace period (1.20's dockershim
        # sometimes loses track of a container it already removed; a lost node never answers)
        # has its Pod removed by force, as `docker rm -f` would.
        if not self._gone(name, grace + CONFIRM_TIMEOUT):
            self._delete(name, grace=0)
            if not self._gone(name, GONE_TIMEOUT):
                raise RuntimeUnavailable(
                    f"the session's Pod is still there {GONE_TIMEOUT:.0f} s after its "
                    "removal by force (the API server is failing?)"
                )
        return tail

    def _gone(self, name: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._pod_named(name) is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def _tail(self, name: str, lines: int) -> str:
        try:
            text = self.core.read_namespaced_pod_log(
                name,
                self.namespace,
                container=CONTAINER,
                tail_lines=lines,
                limit_bytes=TAIL_BYTES,  # lines of any length are the agent's to write
                _request_timeout=CALL,
            )
        except ApiException:  # gone, or never started a container
            return ""
        return str(text)

    async def logs(self, session_id: str, state: State, tail: int) -> str:
        return await self._call(self._tail, object_name(session_id), tail)

    async def follow(self, session_id: str, state: State, tail: int) -> AsyncIterator[bytes]:
        try:
            stream = await self._call(
                lambda: self.core.read_namespaced_pod_log(
                    object_name(session_id),
                    self.namespace,
                    container=CONTAINER,
                    tail_lines=tail,
                    follow=True,
                    _preload_content=False,
                    # A log may say nothing for hours: no read timeout (urllib3 takes None).
                    _request_timeout=(CALL, None),  # type: ignore[arg-type]
                )
            )
        except ApiException:  # 404: the Pod is gone
            return
        async for chunk in pumped(_Chunks(stream), f"logs-{session_id}"):
            yield chunk

    async def ended(self) -> AsyncIterator[str]:
        try:
            core = self.core
        except k8s_config.ConfigException:
            await asyncio.sleep(30)  # no cluster configured here: nothing to follow yet
            return
        events = _PodEvents(core, self.namespace, self.selector)
        async for pod in pumped(events, "kubernetes-events"):
            labels = (pod.metadata.labels or {}) if pod.metadata else {}
            session_id = labels.get(LABEL_SESSION)
            if session_id and why_ended(pod):
                yield session_id

    async def running_sessions(self) -> set[str]:
        # Secrets too: one whose Pod was never made (a crash between the two) holds the
        # session's password and keys until it is removed.
        def listed() -> list[k8s.V1ObjectMeta]:
            ns, ours = self.namespace, self.selector
            pods = self.core.list_namespaced_pod(
                ns, label_selector=ours, _request_timeout=CALL
            ).items
            secrets = self.core.list_namespaced_secret(
                ns, label_selector=ours, _request_timeout=CALL
            ).items
            metas = [p.metadata for p in pods] + [s.metadata for s in secrets]
            return [m for m in metas if m is not None]

        return {
            meta.labels[LABEL_SESSION]
            for meta in await self._call(listed)
            if meta.labels and LABEL_SESSION in meta.labels
        }

    async def close(self) -> None:
        await self.forwards.close_all()
        if self._core is not None:
            self._core.api_client.close()
        self._threads.shutdown(wait=False, cancel_futures=True)


def network_policy(profile: EnvironmentProfile, service: str) -> k8s.V1NetworkPolicy | None:
    """The NetworkPolicy that says, for the cluster's network plugin to enforce, what
    `profile.network` allows (`network.py`): `none`, nothing out; `egress`, anywhere but
    private, link-local and other reserved ranges (the cluster's Pods and nodes among them),
    except the environment's `allow` list, and DNS; `full`, no policy. In, only OpenCode's
    port, for codestation. Pods carry its name's hash as a label, which it selects."""
    if profile.network == "full":
        return None
    allow = sorted(str(n) for n in profile.allow)
    key = hashlib.sha256(json.dumps([service, profile.network, allow]).encode()).hexdigest()
    selector = {LABEL_NETWORK: key[:16]}
    inbound = [
        k8s.V1NetworkPolicyIngressRule(
            ports=[k8s.V1NetworkPolicyPort(port=agent.CONTAINER_PORT, protocol="TCP")]
        )
    ]
    outbound: list[k8s.V1NetworkPolicyEgressRule] = []
    if profile.network == "egress":
        everywhere = [
            k8s.V1NetworkPolicyPeer(
                # By its wire name: the client's constructor silently drops `var_except`,
                # which would leave the block open to everything.
                ip_block=k8s.V1IPBlock.model_validate(
                    {
                        "cidr": cidr,
                        "except": [str(n) for n in _blocked(version)],
                    }
                )
            )
            for cidr, version in (("0.0.0.0/0", 4), ("::/0", 6))
        ]
        allowed = [k8s.V1NetworkPolicyPeer(ip_block=k8s.V1IPBlock(cidr=n)) for n in allow]
        dns = [
            k8s.V1NetworkPolicyPort(port=53, protocol="UDP"),
            k8s.V1NetworkPolicyPort(port=53, protocol="TCP"),
        ]
        outbound = [
            k8s.V1NetworkPolicyEgressRule(to=everywhere + allowed),
            k8s.V1NetworkPolicyEgressRule(
                to=[k8s.V1NetworkPolicyPeer(namespace_selector=k8s.V1LabelSelector())], ports=dns
            ),
        ]
    return k8s.V1NetworkPolicy(
        metadata=k8s.V1ObjectMeta(
            name=f"codestation-{profile.network}-{key[:16]}",
            labels={LABEL_MANAGED: "codestation", LABEL_SERVICE: service, **selector},
        ),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels=selector),
            policy_types=["Ingress", "Egress"],
            ingress=inbound,
            egress=outbound,
        ),
    )


def _api_message(exc: ApiException) -> str:
    """What the API server said, from its Status body where there is one."""
    try:
        said = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        said = None
    return f"{exc.status} {exc.reason}" + (f": {said}" if said else "")


def _blocked(version: int) -> list[network.Network]:
    """`network.BLOCKED` of one IP version. The API server reads an IPv4-mapped IPv6 range
    as IPv4 (and refuses it under ::/0); such traffic is IPv4's, which its own block covers."""
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    return [
        n
        for n in network.BLOCKED
        if n.version == version
        and not (isinstance(n, ipaddress.IPv6Network) and n.subnet_of(mapped))
    ]


def _host_path(name: str, path: str, kind: str) -> k8s.V1Volume:
    # A type, never "": with none, the kubelet makes a missing path as an empty directory.
    return k8s.V1Volume(name=name, host_path=k8s.V1HostPathVolumeSource(path=path, type=kind))


def _resources(limits: Limits) -> k8s.V1ResourceRequirements:
    wanted: dict[str, str] = {}
    if limits.memory is not None:
        wanted["memory"] = str(size_bytes(limits.memory))
    if limits.cpus is not None:
        wanted["cpu"] = f"{int(limits.cpus * 1000)}m"
    return k8s.V1ResourceRequirements(limits=wanted or None, requests=wanted or None)


def why_ended(pod: k8s.V1Pod) -> str | None:
    """Why the Pod's agent is no longer running, or None while it runs (or is starting)."""
    if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
        return "its Pod is being deleted (not by codestation)"
    status = pod.status
    if status is None:
        return None
    if status.reason in ("Evicted", "NodeLost", "Shutdown", "Terminated"):
        return f"its Pod was {status.reason.lower()}: {status.message or status.reason}"
    for container in status.container_statuses or []:
        done = container.state.terminated if container.state else None
        if done is not None:
            why = done.reason or "Error"
            if why == "OOMKilled":
                return (
                    f"OpenCode was killed for want of memory (OOMKilled, status {done.exit_code})"
                )
            detail = f": {done.message.strip()}" if done.message else ""
            return f"OpenCode exited with status {done.exit_code} ({why}){detail}"
    if status.phase in ("Failed", "Succeeded"):
        return f"its Pod is {status.phase}: {status.message or status.reason or 'no reason given'}"
    if status.phase == "Unknown":
        return "its node stopped reporting on it (the node is lost?)"
    return None


def why_stuck(pod: k8s.V1Pod) -> str | None:
    """A reason the Pod's container will not start by itself (a missing image, bad config)."""
    for container in (pod.status.container_statuses or []) if pod.status else []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason in (
            "ErrImagePull",
            "ImagePullBackOff",
            "ErrImageNeverPull",
            "InvalidImageName",
            "CreateContainerConfigError",
            "CreateContainerError",
        ):
            return f"{waiting.reason}: {waiting.message or ''}".strip()
    return None


def _exit_code(pod: k8s.V1Pod) -> tuple[int | None, bool]:
    for container in (pod.status.container_statuses or []) if pod.status else []:
        done = container.state.terminated if container.state else None
        if done is not None:
            return done.exit_code, done.reason == "OOMKilled"
    return None, False


class _Chunks:
    """A followed log (a urllib3 response) as an iterator of byte chunks, closable."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self.response.stream(4096, decode_content=False)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.response.release_conn()
        self.response.close()


class _PodEvents:
    """Every change to this service's Pods, from a watch that is made again when it ends
    (the API server ends watches after a while); closable from another thread."""

    def __init__(self, core: k8s.CoreV1Api, namespace: str, selector: str) -> None:
        self.core, self.namespace, self.selector = core, namespace, selector
        self.watcher = watch.Watch()
        self.closed = False

    def __iter__(self) -> Iterator[k8s.V1Pod]:
        while not self.closed:
            try:
                for event in self.watcher.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    timeout_seconds=300,
                    _request_timeout=300 + CALL,
                ):
                    yield event["object"]
            except (ApiException, *UNREACHABLE):
                if self.closed:
                    return
                time.sleep(2)  # the API server is away: the manager's polls are the backstop

    def close(self) -> None:
        self.closed = True
        self.watcher.stop()
