"""The kubernetes runtime on the test cluster (`scripts/kubernetes.sh`, started if it is not
running, and stopped after if it was not).

- Start: POST start to OpenCode healthy, for a session on the cluster, against a bare Pod of
  the same image running `opencode serve` (created through the same client, healthy by the
  same probe at its IP), interleaved run by run. Prints the medians and their ratio.
- Reach: small requests (`GET /global/health`) to one session's OpenCode at its Pod's IP,
  through codestation's proxy to it there (`kubernetes_reach = "pod"`), at its port-forward
  listener, and through codestation's proxy to that (`"port-forward"`), interleaved one by
  one over one kept-alive connection each. Prints p50 and p95 of each and the ratios of the
  p50s to the Pod's IP.

    .venv/bin/python benchmarks/cluster.py [--runs 5] [--requests 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import docker
import httpx
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch

from codestation.agent import CONTAINER_PORT, OFFLINE_ENV, serve_args
from codestation.config import Settings
from codestation.image import ensure_image
from cold_start import Served, p95, project, served, wait_healthy
from proxy import timed

SCRIPT = Path(__file__).parents[1] / "scripts" / "kubernetes.sh"
# A session's limits (CODESTATION_LIMITS below) as the bare Pod's: two Pods fit on a 2-core
# node, and each OpenCode gets the same CPU.
LIMITS = {"memory": str(1 << 30), "cpu": "500m"}


@contextmanager
def cluster() -> Iterator[tuple[Path, str]]:
    """The test cluster, with the sandbox image on its node: its kubeconfig and the image."""
    image = ensure_image(docker.from_env(), Settings(), print)
    up = subprocess.run(["bash", str(SCRIPT), "kubectl", "get", "--raw", "/readyz"],
                        capture_output=True)  # fmt: skip
    started = subprocess.run(["bash", str(SCRIPT), "start", image], capture_output=True,
                             text=True, check=True, timeout=1200)  # fmt: skip
    try:
        yield Path(started.stdout.strip().splitlines()[-1]), image
    finally:
        if up.returncode != 0:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=300)


@contextmanager
def namespace(core: k8s.CoreV1Api) -> Iterator[str]:
    name = f"cs-bench-{secrets.token_hex(4)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name, grace_period_seconds=0)


def bare_pod_start(core: k8s.CoreV1Api, namespace: str, image: str, workspace: Path) -> float:
    """Seconds from creating a Pod of OpenCode (the workspace at /workspace, a password in
    its environment) to its answering healthy at its IP; the Pod is deleted after, untimed."""
    name = f"bare-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    env = {**OFFLINE_ENV, "HOME": "/tmp", "OPENCODE_SERVER_PASSWORD": password}
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            containers=[
                k8s.V1Container(
                    name="opencode",
                    image=image,
                    image_pull_policy="IfNotPresent",
                    command=serve_args("0.0.0.0", CONTAINER_PORT),
                    working_dir="/workspace",
                    env=[k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
                    volume_mounts=[k8s.V1VolumeMount(name="ws", mount_path="/workspace")],
                    resources=k8s.V1ResourceRequirements(limits=LIMITS, requests=LIMITS),
                )
            ],
            volumes=[
                k8s.V1Volume(
                    name="ws",
                    host_path=k8s.V1HostPathVolumeSource(path=str(workspace), type="Directory"),
                )
            ],
        ),
    )
    begin = time.monotonic()
    core.create_namespaced_pod(namespace, pod)
    try:
        ip = ""
        for event in watch.Watch().stream(
            core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
            timeout_seconds=60,
        ):  # fmt: skip
            ip = event["object"].status.pod_ip or ""
            if ip:
                break
        wait_healthy(f"http://{ip}:{CONTAINER_PORT}", password, time.monotonic() + 60)
        return time.monotonic() - begin
    finally:
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def session_start(service: Served, workspace: Path) -> float:
    """Seconds from POST start to OpenCode healthy at the session's `url`; stopped after."""
    with service.client() as client:
        begin = time.monotonic()
        session = client.wait(
            client.start(str(workspace), wait=False).id, interval=0.02, timeout=120
        )
        if session.url is None:
            raise RuntimeError(f"session failed: {session.error}")
        wait_healthy(session.url, session.auth.password, time.monotonic() + 60)
        elapsed = time.monotonic() - begin
        client.delete(session.id)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    with cluster() as (kubeconfig, image), ExitStack() as stack:
        core = k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig)))
        ns = stack.enter_context(namespace(core))
        services = {
            reach: stack.enter_context(
                served(
                    f"k8s-bench-{reach}-",
                    "kubernetes",
                    extra_env={
                        "CODESTATION_KUBERNETES_CONFIG": str(kubeconfig),
                        "CODESTATION_KUBERNETES_NAMESPACE": ns,
                        "CODESTATION_KUBERNETES_REACH": reach,
                        "CODESTATION_LIMITS": json.dumps({"memory": "1g", "cpus": 0.5}),
                    },
                )
            )
            for reach in ("pod", "port-forward")
        }
        workspace = project(services["pod"].tmp)

        session_start(services["pod"], workspace)  # warm-up: the node's first Pod of the image
        took: dict[str, list[float]] = {"bare Pod": [], "codestation": []}
        for _ in range(args.runs):
            took["bare Pod"].append(bare_pod_start(core, ns, image, workspace))
            took["codestation"].append(session_start(services["pod"], workspace))
        bare = statistics.median(took["bare Pod"])
        for name, values in took.items():
            print(f"start, {name}: median {statistics.median(values):.2f} s "
                  f"(runs {', '.join(f'{v:.2f}' for v in values)})", flush=True)  # fmt: skip
        mine = statistics.median(took["codestation"])
        print(f"start ratio: {mine / bare:.2f}", flush=True)
        figures["kubernetes start s"] = round(mine, 2)
        figures["kubernetes start ratio"] = round(mine / bare, 2)

        clients: dict[str, httpx.Client] = {}
        started = []
        for reach, service in services.items():
            client = stack.enter_context(service.client())
            session = client.start(str(workspace))
            assert session.url is not None, session.error
            started.append((client, session.id))
            auth = (session.auth.username, session.auth.password)
            name = "Pod IP" if reach == "pod" else "port-forward listener"
            clients[name] = stack.enter_context(httpx.Client(base_url=session.url, auth=auth))
            clients[f"codestation, {reach}"] = stack.enter_context(
                httpx.Client(
                    base_url=service.url,
                    headers={"Host": f"{session.id}.localhost:{service.port}", **service.bearer},
                )
            )
        path = "/global/health"
        for _ in range(20):  # warm-up: connections (a port-forward's WebSocket), OpenCode
            for http in clients.values():
                timed(http, path)
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.requests):
            for name, http in clients.items():
                times[name].append(timed(http, path))
        direct = statistics.median(times["Pod IP"])
        for name, values in times.items():
            p50 = statistics.median(values)
            print(f"GET {path}, {name}: p50 {p50 * 1000:.2f} ms p95 {p95(values) * 1000:.2f} "
                  f"ms; ratio to the Pod's IP {p50 / direct:.2f}", flush=True)  # fmt: skip
            key = name.replace(", ", " ").replace("codestation", "proxy")
            figures[f"kubernetes {key} p50 ms"] = round(p50 * 1000, 2)
            if name != "Pod IP":
                figures[f"kubernetes {key} ratio"] = round(p50 / direct, 2)
        for client, session_id in started:
            client.delete(session_id)
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
