"""How the kubernetes runtime reads a Pod's status into a session's end: the cases a
single-node test cluster cannot produce (an eviction, a lost node). The rest are driven for
real in tests/e2e/test_kubernetes.py."""

from __future__ import annotations

from kubernetes import client as k8s

from codestation.runtimes.kubernetes import why_ended, why_stuck


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
