"""The kubernetes runtime's parts that need no cluster: how it reads a Pod's status into a
session's end (the cases a single-node test cluster cannot produce: an eviction, a lost
node), when it is made at all, and the id it labels its Pods with. The rest is driven for real
in tests/e2e/test_kubernetes.py."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from kubernetes import client as k8s
from pydantic import ValidationError

from codestation.config import EnvironmentProfile, Settings
from codestation.errors import RuntimeUnavailable
from codestation.runtimes import make_runtimes
from codestation.runtimes.kubernetes import KubernetesRuntime, why_ended, why_stuck


def pod(phase: str, reason: str | None = None, message: str | None = None) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="codestation-x"),
        status=k8s.V1PodStatus(phase=phase, reason=reason, message=message),
    )


def test_an_evicted_pod_ends_the_session_with_the_kubelets_words() -> None:
    evicted = pod("Failed", "Evicted", "The node was low on resource: memory.")
    assert why_ended(evicted) == "its Pod was evicted: The node was low on resource: memory."


def test_a_pod_whose_node_stopped_reporting_has_ended() -> None:
    assert "node" in (why_ended(pod("Unknown")) or "")


def test_a_pod_being_scheduled_or_running_has_not_ended() -> None:
    assert why_ended(pod("Pending")) is None
    assert why_ended(pod("Running")) is None
    assert why_stuck(pod("Pending")) is None


def test_a_container_that_cannot_be_made_is_a_reason_to_give_up() -> None:
    waiting = pod("Pending")
    waiting.status.container_statuses = [
        k8s.V1ContainerStatus(
            name="opencode",
            image="x",
            image_id="",
            ready=False,
            restart_count=0,
            state=k8s.V1ContainerState(
                waiting=k8s.V1ContainerStateWaiting(
                    reason="CreateContainerConfigError", message='secret "x" not found'
                )
            ),
        )
    ]
    assert why_stuck(waiting) == 'CreateContainerConfigError: secret "x" not found'
    assert why_ended(waiting) is None


def test_a_service_that_names_no_cluster_never_touches_one(tmp_path: Path) -> None:
    # A user's ~/.kube/config may name a cluster of others: a Docker or bwrap service must
    # not even list Pods there (it would remove those it takes for its own orphans).
    plain = Settings(data_dir=tmp_path)
    assert "kubernetes" not in make_runtimes(plain)
    for named in (
        Settings(data_dir=tmp_path, runtime="kubernetes"),
        Settings(
            data_dir=tmp_path,
            environments={"team": EnvironmentProfile(runtime="kubernetes")},
        ),
    ):
        assert "kubernetes" in make_runtimes(named)


def test_the_service_id_on_the_cluster_is_random_and_kept(tmp_path: Path) -> None:
    first = KubernetesRuntime(Settings(data_dir=tmp_path / "a", runtime="kubernetes"))
    again = KubernetesRuntime(Settings(data_dir=tmp_path / "a", runtime="kubernetes"))
    # Another machine's data directory at the very same path is another service.
    other = KubernetesRuntime(Settings(data_dir=tmp_path / "b", runtime="kubernetes"))
    assert first.service == again.service
    assert first.service != other.service
    assert len(first.service) == 16


def test_a_session_is_reached_at_its_pods_ip_or_through_a_port_forward_listener(
    tmp_path: Path,
) -> None:
    runtime = KubernetesRuntime(Settings(data_dir=tmp_path))

    async def addresses() -> list[tuple[str, int]]:
        try:
            return [
                runtime.address("cs-a", 0, {"ip": "10.1.2.3", "reach": "pod"}),
                runtime.address("cs-b", 0, {"ip": "10.1.2.4"}),  # a record from before `reach`
                runtime.address("cs-c", 0, {"ip": "10.1.2.5", "reach": "port-forward"}),
                runtime.address("cs-c", 0, {"ip": "10.1.2.5", "reach": "port-forward"}),
                runtime.address("cs-d", 0, {}),  # a start cut off before it said where
            ]
        finally:
            await runtime.close()

    pod_a, pod_b, forward_c, again_c, forward_d = asyncio.run(addresses())
    assert (pod_a, pod_b) == (("10.1.2.3", 8080), ("10.1.2.4", 8080))
    assert forward_c[0] == forward_d[0] == "127.0.0.1"
    assert forward_c == again_c  # one listener per Pod
    assert forward_c != forward_d
    assert runtime.url("cs-a", 0, {"ip": "fd00::5", "reach": "pod"}) == "http://[fd00::5]:8080"


def test_a_stopped_sessions_listener_is_gone_for_good_and_a_failed_tunnel_only_closes(
    tmp_path: Path,
) -> None:
    # A cluster that cannot be reached: each connection's WebSocket fails to open.
    settings = Settings(data_dir=tmp_path, kubernetes_config=tmp_path / "no-such-kubeconfig")
    runtime = KubernetesRuntime(settings)
    forwarded = {"ip": "10.1.2.3", "reach": "port-forward"}

    async def run() -> tuple[bytes, tuple[str, int], tuple[str, int]]:
        try:
            host, port = runtime.address("cs-a", 0, forwarded)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /global/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)  # closed, not hung
            writer.close()
            with pytest.raises(RuntimeUnavailable):  # no cluster: its listener goes anyway
                await runtime.stop("cs-a", forwarded, 0)
            return answer, (host, port), runtime.address("cs-a", 0, forwarded)
        finally:
            await runtime.close()

    answer, was, now = asyncio.run(run())
    assert answer == b""
    assert now == ("127.0.0.1", 0)  # asked again after it closed: no new listener
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(was, 3).close()


def test_how_sessions_are_reached_is_one_of_three() -> None:
    assert Settings().kubernetes_reach == "auto"
    with pytest.raises(ValidationError, match="'auto', 'pod' or 'port-forward'"):
        Settings(kubernetes_reach="proxy")
