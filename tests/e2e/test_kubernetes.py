"""The kubernetes runtime on a real single-node cluster (`scripts/kubernetes.sh`: Kubernetes
1.20.2 built from Debian's source, a kubelet with a dockerd of its own).

The module starts the cluster unless it runs already, loads the sandbox image into its node, and
stops it after if it started it. Each test's service has a namespace of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from codestation import SessionInfo, Settings, Status
from codestation.errors import StartFailed
from codestation.image import ensure_image
from codestation.runtimes import LaunchSpec
from codestation.runtimes.kubernetes import LABEL_MANAGED, KubernetesRuntime, object_name
from codestation.workspaces import Workspace, open_workspace
from tests.e2e.conftest import Model, Service, ServiceFactory, free_port
from tests.e2e.test_agent_work import USER
from tests.e2e.test_survival import store
from tests.e2e.test_terminal import open_terminal, read_until

# Alone: the cluster (etcd, the API server, a kubelet, a dockerd, the Pods) loads the 2-core
# machine enough to slow every other test's sandboxes past their waits.
pytestmark = pytest.mark.serial

SCRIPT = Path(__file__).parents[2] / "scripts" / "kubernetes.sh"
MANIFESTS = Path(__file__).parents[2] / "deploy" / "kubernetes"
NODE_DOCKER = "unix:///var/lib/codestation-kube/run/docker.sock"
NODE_IP = "10.244.77.1"  # scripts/kubernetes.sh: the node, where its API server listens


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.core = k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig)))
        self.node = docker.DockerClient(base_url=NODE_DOCKER)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    image = ensure_image(docker.from_env(), Settings(), print)
    running = subprocess.run(["bash", str(SCRIPT), "kubectl", "get", "--raw", "/readyz"],
                             capture_output=True)  # fmt: skip
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", image], capture_output=True, text=True, timeout=1200
    )
    assert started.returncode == 0, started.stderr
    kubeconfig = Path(started.stdout.strip().splitlines()[-1])
    yield Cluster(kubeconfig)
    if running.returncode != 0:  # it was not running before this module: leave it so
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=300)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"cs-test-{secrets.token_hex(4)}"
    cluster.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    # What codestation made for sessions (codestation's own Deployment is the test's).
    managed = f"{LABEL_MANAGED}=codestation"
    left = [
        p.metadata.name
        for p in cluster.core.list_namespaced_pod(name, label_selector=managed).items
    ]
    left += [
        s.metadata.name
        for s in cluster.core.list_namespaced_secret(name, label_selector=managed).items
    ]
    cluster.core.delete_namespace(name, grace_period_seconds=0)
    assert not left, f"left behind: {left}"


@pytest.fixture
def on_cluster(cluster: Cluster, namespace: str, launch_service: ServiceFactory) -> ServiceFactory:
    """Start a service whose sessions run on the cluster, in this test's namespace. After the
    namespace, so its sessions are stopped before the namespace is checked."""

    def factory(size: int = 10, **settings: Any) -> Service:
        settings.setdefault("kubernetes_reach", "pod")  # it runs on the node
        return launch_service(
            size,
            runtime="kubernetes",
            kubernetes_config=str(cluster.kubeconfig),
            kubernetes_namespace=namespace,
            **settings,
        )

    return factory


@pytest.fixture
def k8s_service(on_cluster: ServiceFactory) -> Service:
    return on_cluster(limits=json.dumps({"memory": "768m", "cpus": 1.5, "pids": 512, "tmp": "64m"}))


def opencode_container(cluster: Cluster, session: SessionInfo) -> Any:
    """The session's OpenCode container, as the node's dockerd runs it."""
    labels = [f"io.kubernetes.pod.name={object_name(session.id)}",
              "io.kubernetes.container.name=opencode"]  # fmt: skip
    [container] = cluster.node.containers.list(filters={"label": labels})
    return container


def running(service: Service, workspace: Path) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=180)
    assert session.status is Status.RUNNING, session.error
    return session


def through_proxy(service: Service, session: SessionInfo, path: str) -> httpx.Response:
    with service.http() as http:
        return http.get(path, headers={"Host": f"{session.id}.localhost:{service.port}"})


def failed_within(service: Service, session_id: str, seconds: float) -> SessionInfo:
    deadline = time.monotonic() + seconds
    while (session := service.client.get(session_id)).status is Status.RUNNING:
        assert time.monotonic() < deadline, f"still running {seconds} s later"
        time.sleep(0.1)
    return session


def gone(cluster: Cluster, namespace: str, name: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    for read in (cluster.core.read_namespaced_pod, cluster.core.read_namespaced_secret):
        while True:
            try:
                read(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    break
                raise
            assert time.monotonic() < deadline, f"{name} still there after {seconds} s"
            time.sleep(0.2)


def test_a_session_runs_in_a_pod_answers_through_the_proxy_and_stops_leaving_the_data(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    pod = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
    assert session.url == f"http://{pod.status.pod_ip}:8080"

    health = through_proxy(k8s_service, session, "/global/health")
    assert health.status_code == 200, health.text
    assert health.json()["healthy"] is True

    (workspace / "made-on-the-host.txt").write_text("seen by the agent\n")
    listed = through_proxy(k8s_service, session, "/file?path=.")
    assert "made-on-the-host.txt" in {f["name"] for f in listed.json()}
    content = through_proxy(k8s_service, session, "/file/content?path=made-on-the-host.txt")
    assert content.json()["content"].strip() == "seen by the agent"

    before = sorted(p.name for p in workspace.iterdir())
    stopped = k8s_service.client.stop(session.id)
    assert stopped.status is Status.STOPPED
    gone(cluster, namespace, object_name(session.id))
    assert sorted(p.name for p in workspace.iterdir()) == before
    assert (workspace / "made-on-the-host.txt").read_text() == "seen by the agent\n"


def test_the_password_is_in_the_secret_and_nowhere_in_the_pod(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    name = object_name(session.id)
    secret = cluster.core.read_namespaced_secret(name, namespace)
    values = {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
    assert values["OPENCODE_SERVER_PASSWORD"] == session.auth.password

    pod = cluster.core.read_namespaced_pod(name, namespace)
    spec: dict[str, Any] = cluster.core.api_client.sanitize_for_serialization(pod)
    assert session.auth.password not in json.dumps(spec)
    container = spec["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": name}}]
    assert spec["spec"]["automountServiceAccountToken"] is False
    assert spec["spec"]["restartPolicy"] == "Never"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsUser"] == workspace.stat().st_uid
    assert spec["metadata"]["labels"]["codestation.dev/session"] == session.id


def test_limits_reach_the_pods_container(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    assert session.limits == {"memory": "768m", "cpus": 1.5, "tmp": "64m"}  # no pids: the node's
    container = opencode_container(cluster, session)
    host = container.attrs["HostConfig"]
    assert host["Memory"] == 768 << 20
    assert host["CpuQuota"] / host["CpuPeriod"] == 1.5
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    tmp = [m for m in container.attrs["Mounts"] if m["Destination"] == "/tmp"]
    assert len(tmp) == 1


def test_a_killed_container_fails_the_session_with_its_reason_within_seconds(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    container = opencode_container(cluster, session)
    container.kill()
    failed = failed_within(k8s_service, session.id, 10)
    assert failed.status is Status.FAILED
    assert "exited with status 137" in (failed.error or "")
    gone(cluster, namespace, object_name(session.id))


def test_a_pod_deleted_by_someone_else_fails_the_session_within_seconds(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    cluster.core.delete_namespaced_pod(object_name(session.id), namespace)
    failed = failed_within(k8s_service, session.id, 10)
    assert failed.status is Status.FAILED
    assert "its Pod is being deleted" in (failed.error or "")
    gone(cluster, namespace, object_name(session.id))


def test_a_restarted_service_readopts_its_pods(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    pod = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
    k8s_service.restart()
    again = k8s_service.client.get(session.id)
    assert again.status is Status.RUNNING
    assert through_proxy(k8s_service, again, "/global/health").status_code == 200
    same = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
    assert same.metadata.uid == pod.metadata.uid


@contextlib.contextmanager
def pod_ips_unreachable() -> Iterator[None]:
    """This host without a route to Pods' OpenCode, as a machine beside the cluster is: its
    connections there fail at once (a router's "network unreachable"). The API server's
    port-forward reaches the Pod's port inside the Pod's own network namespace: untouched."""
    rule = ["OUTPUT", "-d", "10.244.77.0/24", "-p", "tcp", "--dport", "8080",
            "-j", "REJECT", "--reject-with", "icmp-net-unreachable"]  # fmt: skip
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


def test_a_service_that_cannot_route_to_pods_reaches_them_through_port_forward(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, workspace: Path
) -> None:
    (workspace / "made-on-host.txt").write_text("x" * 300_000)
    with pod_ips_unreachable():
        service = on_cluster(kubernetes_reach="auto")  # not in the cluster: port-forward
        session = running(service, workspace)
        pod = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
        with pytest.raises(OSError, match="unreachable"):
            socket.create_connection((pod.status.pod_ip, 8080), 3).close()
        url = urlsplit(session.url)
        assert url.hostname == "127.0.0.1", session.url

        assert through_proxy(service, session, "/global/health").json()["healthy"] is True
        # Many round trips, and an answer of many frames, each through a tunnel of its own.
        content = through_proxy(service, session, "/file/content?path=made-on-host.txt")
        assert content.json()["content"] == "x" * 300_000
        with open_terminal(service, session, "shell") as ws:
            ws.send(json.dumps({"data": "ls /workspace; echo listed-$((6*7))\r"}))
            seen = read_until(ws, "listed-42")
        assert "made-on-host.txt" in seen

        service.restart()  # its sessions are reached the same way, at a listener made anew
        again = service.client.get(session.id)
        assert again.status is Status.RUNNING
        assert through_proxy(service, again, "/global/health").status_code == 200
        listener = urlsplit(again.url).port
        assert listener is not None

        service.client.stop(session.id)
        gone(cluster, namespace, object_name(session.id))
        with pytest.raises(ConnectionRefusedError):  # its listener went with it
            socket.create_connection(("127.0.0.1", listener), 3).close()


def test_a_start_cut_off_before_it_recorded_its_pod_is_readopted_by_the_pods_name(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    pod = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
    k8s_service.stop_process(signal.SIGKILL)
    with store(k8s_service) as db:  # killed after the Pod was made, before `start` returned
        db.execute(
            "UPDATE sessions SET status = 'starting', runtime_state = '{}' WHERE id = ?",
            (session.id,),
        )
    k8s_service.restart()
    again = k8s_service.client.wait(session.id, timeout=120)
    assert again.status is Status.RUNNING, again.error
    assert through_proxy(k8s_service, again, "/global/health").status_code == 200
    same = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
    assert same.metadata.uid == pod.metadata.uid


def test_an_image_no_node_has_fails_the_start_with_the_reason(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, workspace: Path
) -> None:
    service = on_cluster(
        environments=json.dumps({"default": {"image": "codestation-nowhere:1"}}),
    )
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.FAILED
    assert "ImagePull" in (session.error or ""), session.error
    gone(cluster, namespace, object_name(session.id))


@contextlib.contextmanager
def shared_claim(cluster: Cluster, namespace: str, root: Path) -> Iterator[str]:
    """A claim `workspaces` of a volume of many workspaces, as a team's ReadWriteMany claim
    would be; here a hostPath PersistentVolume (the one node) at `root`, which codestation
    sees there too."""
    volume = f"{namespace}-workspaces"
    cluster.core.create_persistent_volume(
        k8s.V1PersistentVolume(
            metadata=k8s.V1ObjectMeta(name=volume),
            spec=k8s.V1PersistentVolumeSpec(
                capacity={"storage": "1Gi"},
                access_modes=["ReadWriteMany"],
                host_path=k8s.V1HostPathVolumeSource(path=str(root), type="Directory"),
                storage_class_name="",
                claim_ref=k8s.V1ObjectReference(namespace=namespace, name="workspaces"),
            ),
        )
    )
    try:
        cluster.core.create_namespaced_persistent_volume_claim(
            namespace,
            k8s.V1PersistentVolumeClaim(
                metadata=k8s.V1ObjectMeta(name="workspaces"),
                spec=k8s.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteMany"],
                    resources=k8s.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                    storage_class_name="",
                    volume_name=volume,
                ),
            ),
        )
        yield "workspaces"
    finally:
        with contextlib.suppress(ApiException):
            cluster.core.delete_namespaced_persistent_volume_claim("workspaces", namespace)
        cluster.core.delete_persistent_volume(volume)


def test_a_workspace_on_a_shared_claim_is_the_agents_through_its_subpath(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, tmp_path: Path
) -> None:
    root = tmp_path / "workspaces"
    (root / "alice" / "project").mkdir(parents=True)
    (root / "alice" / "project" / "notes.md").write_text("on the claim\n")
    (root / "bob").mkdir()
    (root / "bob" / "secret.txt").write_text("not alice's\n")
    with shared_claim(cluster, namespace, root) as claim:
        storage = {"volume": "claim", "claim": claim, "root": str(root)}
        service = on_cluster(
            environments=json.dumps({"default": {"kubernetes": storage}}),
        )
        session = running(service, root / "alice" / "project")  # the guard passed it
        pod = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
        [mount] = [m for m in pod.spec.containers[0].volume_mounts if m.mount_path == "/workspace"]
        assert mount.sub_path == "alice/project"
        listed = through_proxy(service, session, "/file?path=.")
        assert {f["name"] for f in listed.json()} == {"notes.md"}
        outside = through_proxy(service, session, "/file/content?path=../../bob/secret.txt")
        assert "not alice's" not in outside.text

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        refused = service.client.wait(service.client.start(str(elsewhere), wait=False).id)
        assert refused.status is Status.FAILED
        assert f"is not inside {root}" in (refused.error or "")
        service.client.stop(session.id)
        assert (root / "alice" / "project" / "notes.md").read_text() == "on the claim\n"


def test_the_guard_stops_opencode_on_another_directory_of_the_claim(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """What a swap between the check and the kubelet's mount by subPath leaves (see
    test_workspace_race): the checked directory's path, another directory's identity. The
    node mounts the claim under a device number of its own, so the guard goes by inode."""
    root = tmp_path / "workspaces"
    (root / "alice" / "project").mkdir(parents=True)
    (root / "bob").mkdir()
    with shared_claim(cluster, namespace, root) as claim:
        storage = {"volume": "claim", "claim": claim, "root": str(root)}
        settings = Settings(
            data_dir=tmp_path / "data",
            kubernetes_config=cluster.kubeconfig,
            kubernetes_namespace=namespace,
            environments={"default": {"kubernetes": storage}},
        )
        engine = KubernetesRuntime(settings)
        held = open_workspace(str(root / "alice" / "project"), [root], [])
        other = os.stat(root / "bob")
        impostor = Workspace(root / "alice" / "project", held.fd, 0, 0, other.st_dev, other.st_ino)
        spec = LaunchSpec(
            session_id="cs-guardtestaaaaaaa",
            workspace=impostor,
            address="",
            port=0,
            env={"OPENCODE_SERVER_PASSWORD": "x"},
            profile=settings.environments["default"],
            limits=settings.limits.model_copy(update={"cpus": 0.5}),
            uid=0,
            gid=0,
        )

        async def run() -> str:
            """What the agent said: the guard exits before OpenCode serves, which `start` sees
            when it ends before the Pod has its address, else the first `poll`."""
            try:
                state = await engine.start(spec)
            except StartFailed as exc:
                return f"start failed: {exc}\n{exc.log_tail}"
            finally:
                held.close()
            try:
                deadline = time.monotonic() + 60
                while (ended := await engine.poll(spec.session_id, state)) is None:
                    assert time.monotonic() < deadline, "OpenCode kept running"
                    await asyncio.sleep(0.2)
                assert ended.code == 97, ended
                return await engine.logs(spec.session_id, state, 20)
            finally:
                await engine.stop(spec.session_id, state, 0)
                await engine.close()

        logged = asyncio.run(run())
    if logged.startswith("start failed: "):
        assert "exited with status 97" in logged
    assert "/workspace was replaced while the session started" in logged
    assert "opencode server listening" not in logged


def test_an_agent_out_of_memory_fails_saying_so(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, workspace: Path
) -> None:
    service = on_cluster(
        limits=json.dumps({"memory": "48m", "tmp": "8m"}),  # OpenCode needs far more to boot
    )
    session = service.client.wait(service.client.start(str(workspace), wait=False).id, timeout=120)
    assert session.status is Status.FAILED
    assert "OOMKilled" in (session.error or ""), session.error
    gone(cluster, namespace, object_name(session.id))


def test_each_environments_network_becomes_a_network_policy_selecting_its_pods(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, workspace: Path
) -> None:
    # The test cluster has no network plugin: the policies are made and select the Pods, but
    # nothing here enforces them (the README says so).
    service = on_cluster(
        environments=json.dumps(
            {
                "default": {"network": "egress", "allow": ["10.1.2.3/32"]},
                "sealed": {"network": "none"},
                "open": {"network": "full"},
            }
        ),
    )
    networking = k8s.NetworkingV1Api(cluster.core.api_client)
    policies: dict[str, dict[str, Any]] = {}
    for environment in ("default", "sealed", "open"):
        started = service.client.start(str(workspace), environment, wait=False)
        session = service.client.wait(started.id, timeout=180)
        assert session.status is Status.RUNNING, session.error
        pod = cluster.core.read_namespaced_pod(object_name(session.id), namespace)
        selecting = [
            p
            for p in networking.list_namespaced_network_policy(namespace).items
            if p.spec.pod_selector.match_labels.items() <= (pod.metadata.labels or {}).items()
        ]
        if environment == "open":
            assert selecting == []
        else:
            [policy] = selecting
            policies[environment] = cluster.core.api_client.sanitize_for_serialization(policy)
        service.client.stop(session.id)

    egress = policies["default"]["spec"]
    assert egress["policyTypes"] == ["Ingress", "Egress"]
    assert egress["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    blocks = [peer["ipBlock"] for peer in egress["egress"][0]["to"]]
    v4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8"} <= set(v4["except"])
    assert {"cidr": "10.1.2.3/32"} in blocks
    assert egress["egress"][1]["ports"] == [
        {"port": 53, "protocol": "UDP"},
        {"port": 53, "protocol": "TCP"},
    ]
    sealed = policies["sealed"]["spec"]
    assert sealed["policyTypes"] == ["Ingress", "Egress"]
    assert sealed.get("egress") in (None, [])


def test_pods_take_no_port_of_the_host_and_none_of_its_memory_budget(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, tmp_path: Path
) -> None:
    service = on_cluster(
        1,  # one port in the range, and a budget for one session: Pods need neither
        limits=json.dumps({"memory": "768m", "cpus": 0.5}),  # two fit the 2-core node
        memory_budget="1g",
    )
    sessions = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        sessions.append(running(service, tmp_path / name))
    for session in sessions:
        assert session.port == 8080
        assert session.url is not None
        assert session.url.endswith(":8080")
        assert through_proxy(service, session, "/global/health").status_code == 200
    assert service.client.stop_all() != []


def described(namespace: str) -> str:
    """What the cluster says of codestation's Pod: for a failure's message."""
    said = []
    for args in (
        ["describe", "pod"],
        ["logs", "--tail=40", "-l", "app.kubernetes.io/name=codestation"],
    ):
        shown = subprocess.run(
            ["bash", str(SCRIPT), "kubectl", "-n", namespace, *args],
            capture_output=True, text=True,
        )  # fmt: skip
        said.append(shown.stdout[-4000:] + shown.stderr[-1000:])
    return "\n".join(said)


def hostpath_claim(cluster: Cluster, namespace: str, claim: str, path: Path, mode: str) -> str:
    """A PersistentVolume on the node's `path`, bound to `claim` in `namespace`; its name."""
    volume = f"{namespace}-{claim}"
    cluster.core.create_persistent_volume(
        k8s.V1PersistentVolume(
            metadata=k8s.V1ObjectMeta(name=volume),
            spec=k8s.V1PersistentVolumeSpec(
                capacity={"storage": "1Gi"},
                access_modes=[mode],
                host_path=k8s.V1HostPathVolumeSource(path=str(path), type="Directory"),
                storage_class_name="",
                claim_ref=k8s.V1ObjectReference(namespace=namespace, name=claim),
            ),
        )
    )
    return volume


def test_codestation_deployed_by_its_manifests_runs_sessions_in_the_cluster(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    built = subprocess.run(["bash", str(SCRIPT), "image"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    image = built.stdout.strip().splitlines()[-1]
    loaded = subprocess.run(["bash", str(SCRIPT), "load", image], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    sandbox = ensure_image(docker.from_env(), Settings(), print)

    # The storage a cluster's admin provides: the store's volume, and a claim of workspaces.
    data, root = tmp_path / "data", tmp_path / "workspaces"
    data.mkdir()
    os.chown(data, 10001, 10001)  # codestation's uid in its image; a hostPath has no fsGroup
    (root / "alice" / "project").mkdir(parents=True)
    (root / "alice" / "project" / "plan.md").write_text("from the claim\n")
    volumes = [
        hostpath_claim(cluster, namespace, "codestation-data", data, "ReadWriteOnce"),
        hostpath_claim(cluster, namespace, "workspaces", root, "ReadWriteMany"),
    ]
    cluster.core.create_namespaced_persistent_volume_claim(
        namespace,
        k8s.V1PersistentVolumeClaim(
            metadata=k8s.V1ObjectMeta(name="workspaces"),
            spec=k8s.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteMany"],
                resources=k8s.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                storage_class_name="",
                volume_name=volumes[1],
            ),
        ),
    )
    try:
        # The manifests as kustomize builds them, in this test's namespace, with this
        # machine's images and host names.
        built_yaml = subprocess.run(
            ["bash", str(SCRIPT), "kubectl", "kustomize", str(MANIFESTS)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        documents = [d for d in yaml.safe_load_all(built_yaml) if d]
        for document in documents:
            document["metadata"]["namespace"] = namespace
            for subject in document.get("subjects", []):
                subject["namespace"] = namespace
            if document["kind"] == "ConfigMap":
                config = document["data"]["config.toml"]
                config = config.replace('"codestation-sandbox:1.18.33"', f'"{sandbox}"')
                config = config.replace("https://codestation.example.com", "http://cs.test:8585")
                document["data"]["config.toml"] = config.replace(
                    'proxy_domain = "codestation.example.com"', 'proxy_domain = "cs.test"'
                )
            if document["kind"] == "PersistentVolumeClaim":
                document["spec"]["storageClassName"] = ""
                document["spec"]["volumeName"] = volumes[0]
            if document["kind"] == "Deployment":
                container = document["spec"]["template"]["spec"]["containers"][0]
                container["image"] = image
                # The test cluster runs no kube-proxy, so the API server's Service address
                # leads nowhere: codestation is pointed at the API server itself.
                container["env"] += [
                    {"name": "KUBERNETES_SERVICE_HOST", "value": NODE_IP},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
                ]
        applied = subprocess.run(
            ["bash", str(SCRIPT), "kubectl", "apply", "-f", "-"],
            input=yaml.safe_dump_all(documents), capture_output=True, text=True,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stderr
        ready = subprocess.run(
            ["bash", str(SCRIPT), "kubectl", "-n", namespace, "rollout", "status",
             "deployment/codestation", "--timeout=180s"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert ready.returncode == 0, ready.stdout + ready.stderr + described(namespace)

        [pod] = cluster.core.list_namespaced_pod(
            namespace, label_selector="app.kubernetes.io/name=codestation"
        ).items
        token = subprocess.run(
            ["bash", str(SCRIPT), "kubectl", "-n", namespace, "exec", str(pod.metadata.name), "--",
             "cat", "/var/lib/codestation/token"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        api = f"http://{pod.status.pod_ip}:8585"
        headers = {"Host": "cs.test:8585", "Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=api, headers=headers, timeout=60) as http:
            started = http.post(
                "/api/v1/code/start", json={"workspace": "/srv/workspaces/alice/project"}
            )
            assert started.status_code == 202, started.text
            session_id = started.json()["id"]
            deadline = time.monotonic() + 180
            while (session := http.get(f"/api/v1/code/session/{session_id}").json())[
                "status"
            ] == "starting":
                assert time.monotonic() < deadline
                time.sleep(0.5)
            assert session["status"] == "running", session["error"]
            assert session["runtime"] == "kubernetes"
            listed = http.get("/file?path=.", headers={"Host": f"{session_id}.cs.test:8585"})
            assert listed.status_code == 200, listed.text
            assert {f["name"] for f in listed.json()} == {"plan.md"}
            stopped = http.post(f"/api/v1/code/session/{session_id}/stop")
            assert stopped.status_code == 200, stopped.text
        gone(cluster, namespace, object_name(session_id))
        assert (root / "alice" / "project" / "plan.md").read_text() == "from the claim\n"
    finally:
        subprocess.run(
            ["bash", str(SCRIPT), "kubectl", "-n", namespace, "delete", "deployment",
             "codestation", "--wait=true", "--timeout=60s"],
            capture_output=True,
        )  # fmt: skip
        for claim in ("workspaces", "codestation-data"):
            with contextlib.suppress(ApiException):
                cluster.core.delete_namespaced_persistent_volume_claim(claim, namespace)
        for volume in volumes:
            cluster.core.delete_persistent_volume(volume)


def test_a_terminal_opens_a_shell_in_the_pod(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    (workspace / "made-on-host.txt").write_text("x")
    session = running(k8s_service, workspace)
    with open_terminal(k8s_service, session, "shell") as ws:
        ws.send(json.dumps({"rows": 30, "cols": 100}))
        ws.send(json.dumps({"data": "ls /workspace; hostname; stty size\r"}))
        seen = read_until(ws, "30 100")
    assert "made-on-host.txt" in seen
    assert object_name(session.id) in seen  # the Pod's own host name: it runs there


def test_a_pod_no_record_knows_is_removed_at_start_up(
    k8s_service: Service, cluster: Cluster, namespace: str, workspace: Path
) -> None:
    session = running(k8s_service, workspace)
    k8s_service.stop_process(signal.SIGKILL)
    with store(k8s_service) as db:  # its Pod runs on, and no record knows it
        db.execute("DELETE FROM sessions WHERE id = ?", (session.id,))
    cluster.core.read_namespaced_pod(object_name(session.id), namespace)
    k8s_service.restart()
    gone(cluster, namespace, object_name(session.id))
    assert "removed 1 orphan sandbox" in k8s_service.log.read_text().replace("\n", " ")


def test_an_idle_session_is_culled_and_its_pod_removed(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, workspace: Path
) -> None:
    service = on_cluster(
        cull_interval="0.5",
    )
    started = service.client.start(str(workspace), idle_timeout=2, wait=False)
    session = service.client.wait(started.id, timeout=180)
    assert session.status is Status.RUNNING, session.error
    deadline = time.monotonic() + 60
    while (listed := next(s for s in service.client.sessions() if s.id == session.id)).status.live:
        assert time.monotonic() < deadline, "never culled"
        time.sleep(0.5)
    assert listed.status is Status.STOPPED
    assert listed.reason == "idle"
    gone(cluster, namespace, object_name(session.id))


def test_a_prompt_reaches_the_model_and_edits_the_workspace_as_its_owner(
    cluster: Cluster, namespace: str, on_cluster: ServiceFactory, workspace: Path, model: Model
) -> None:
    service = on_cluster(
        environments=json.dumps({"agent": model.environment()}),
        env={model.env_var: model.key},
    )
    for path in [workspace, *workspace.rglob("*")]:  # a user's, not root's
        os.chown(path, USER, USER)
    with service.client.start(str(workspace), "agent", timeout=180) as session:
        assert session.status == "running", session.error
        reply = session.prompt("please write hello.txt: Hello from the agent")
        written = workspace / "hello.txt"
        assert written.read_text() == "Hello from the agent"
        assert (written.stat().st_uid, written.stat().st_gid) == (USER, USER)
        assert [(t.tool, t.status) for t in reply.tools] == [("write", "completed")]
        report = session.changes()
        assert [(f.path, f.change) for f in report.files] == [("hello.txt", "added")]
    assert service.client.get(session.id).status == "stopped"


def test_an_account_without_rights_is_told_what_it_lacks(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # A ServiceAccount of no Role: what codestation would be, deployed without its RBAC.
    cluster.core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="nobody"))
    )
    deadline = time.monotonic() + 30
    while not (
        account := cluster.core.read_namespaced_service_account("nobody", namespace)
    ).secrets:
        assert time.monotonic() < deadline, "no token was made for the account"
        time.sleep(0.2)
    secret = cluster.core.read_namespaced_secret(str(account.secrets[0].name), namespace)
    token = base64.b64decode((secret.data or {})["token"]).decode()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    admin["users"][0]["user"] = {"token": token}
    kubeconfig = tmp_path / "nobody.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(admin))
    serve = subprocess.run(
        [sys.executable, "-m", "codestation.cli", "serve"],
        env={**os.environ, "CODESTATION_DATA_DIR": str(tmp_path / "data"),
             "CODESTATION_TOKEN_FILE": str(tmp_path / "config" / "token"),
             "CODESTATION_PORT": str(free_port()), "CODESTATION_RUNTIME": "kubernetes",
             "CODESTATION_KUBERNETES_CONFIG": str(kubeconfig),
             "CODESTATION_KUBERNETES_NAMESPACE": namespace},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = " ".join((serve.stdout + serve.stderr).split())
    assert serve.returncode != 0
    assert f"the cluster refused to list Pods in namespace {namespace}" in said
    assert "403 Forbidden" in said
    assert "Traceback" not in said
