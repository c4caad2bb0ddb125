"""What an agent can reach, tried from inside each runtime's sandbox (commands run through
OpenCode's own PTY, as the agent's shell tool runs them).

The outside world is a web server in a network namespace this module makes, on an address of
a range no rule treats as private (198.18.0.0/15, for benchmarks): never a real external
address. The same server also answers on a private address (10.231.0.0/16), standing for a
mirror on a private network. The host's own services are a web server on all of the host's
addresses."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from codestation import SessionInfo, Status
from tests.e2e.conftest import Service, ServiceFactory, free_port, run_in_session

WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


@dataclass(frozen=True)
class World:
    outside: str  # address:port of the outside world's server
    private: str  # address:port of the same server on a private network
    host_port: int  # a server on every address of this host
    host_addresses: list[str]  # the host's addresses, loopback and bridges included


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host-service")

    def log_message(self, *args: object) -> None:
        pass


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    name, subnet, private = f"csworld{WORKER}", f"198.18.{WORKER}", f"10.231.{WORKER}"
    with contextlib.suppress(subprocess.CalledProcessError):  # a previous run's, killed
        sh("ip", "netns", "del", name)
    sh("ip", "netns", "add", name)
    sh("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}n")
    sh("ip", "link", "set", f"{name}n", "netns", name)
    sh("ip", "addr", "add", f"{subnet}.2/24", "dev", f"{name}h")
    sh("ip", "addr", "add", f"{private}.2/24", "dev", f"{name}h")
    sh("ip", "link", "set", f"{name}h", "up")
    inside = ["ip", "netns", "exec", name]
    sh(*inside, "ip", "addr", "add", f"{subnet}.1/24", "dev", f"{name}n")
    sh(*inside, "ip", "addr", "add", f"{private}.1/24", "dev", f"{name}n")
    sh(*inside, "ip", "link", "set", f"{name}n", "up")
    sh(*inside, "ip", "link", "set", "lo", "up")
    server = subprocess.Popen(
        [*inside, "python3", "-m", "http.server", "8000"],
        cwd=Path(__file__).parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = http.server.ThreadingHTTPServer(("0.0.0.0", free_port()), _Answer)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    shown = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True)
    addresses = [
        a["local"]
        for link in json.loads(shown.stdout)
        if not link["ifname"].startswith("csworld")  # the worlds' own ends, not the host's
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    try:
        yield World(f"{subnet}.1:8000", f"{private}.1:8000", host.server_address[1], addresses)
    finally:
        host.shutdown()
        server.terminate()
        server.wait()
        sh("ip", "link", "del", f"{name}h")
        sh("ip", "netns", "del", name)


def reach(session: SessionInfo, targets: dict[str, str]) -> dict[str, bool]:
    """Which of `targets` (name: address:port) answer HTTP from inside the session."""
    script = "; ".join(
        f"echo {name}=$(curl -s -o /dev/null -m 3 -w '%{{http_code}}' http://{where}/)"
        for name, where in targets.items()
    )
    code, printed = run_in_session(session, script, timeout=120)
    assert code == 0, printed
    answers = dict(line.split("=", 1) for line in printed.split())
    return {name: answers[name] not in ("000", "") for name in targets}


def sessions_on(service: Service, workspace: Path, environment: str) -> SessionInfo:
    session = service.client.wait(service.client.start(str(workspace), environment, wait=False).id)
    assert session.status is Status.RUNNING, session.error
    return session


def environments(**extra: object) -> str:
    return json.dumps(
        {
            "none": {"network": "none"},
            "egress": {"network": "egress"},
            "full": {"network": "full"},
            **extra,
        }
    )


def the_host(world: World, service: Service) -> dict[str, str]:
    """Every way to the host itself: its services on each address, and codestation's API."""
    targets = {
        f"host-{i}": f"{address}:{world.host_port}"
        for i, address in enumerate(world.host_addresses)
    }
    targets["codestation"] = f"127.0.0.1:{service.port}"
    return targets


def other_session(service: Service, runtime: str, other: SessionInfo) -> dict[str, str]:
    """Every way to another session's OpenCode."""
    targets = {"other-published": f"127.0.0.1:{other.port}"}
    if runtime == "docker":
        engine = docker.from_env()
        networks = engine.containers.get(f"codestation-{other.id}").attrs["NetworkSettings"]
        for name, net in networks["Networks"].items():
            targets[f"other-ip-{name}"] = f"{net['IPAddress']}:8080"
            targets[f"gateway-{name}"] = f"{net['Gateway']}:{other.port}"
        engine.close()
    return targets


def test_egress_reaches_the_world_but_not_the_host_or_other_sessions(
    start_service: ServiceFactory, workspace: Path, tmp_path: Path, world: World, runtime: str
) -> None:
    service = start_service(environments=environments())
    other_workspace = tmp_path / "other"
    other_workspace.mkdir()
    other = sessions_on(service, other_workspace, "egress")
    session = sessions_on(service, workspace, "egress")
    targets = {
        "outside": world.outside,
        "private": world.private,
        "metadata": "169.254.169.254:80",
        **the_host(world, service),
        **other_session(service, runtime, other),
    }
    reached = reach(session, targets)
    assert reached.pop("outside"), "egress must reach the outside world"
    assert not any(reached.values()), {k: targets[k] for k, v in reached.items() if v}
    # Names still resolve through the host's resolver (allowed on port 53 only).
    _, printed = run_in_session(session, "getent hosts deb.debian.org || echo unresolved")
    assert "unresolved" not in printed, printed


def test_none_reaches_nothing(
    start_service: ServiceFactory, workspace: Path, world: World, runtime: str
) -> None:
    service = start_service(environments=environments())
    session = sessions_on(service, workspace, "none")
    targets = {"outside": world.outside, **the_host(world, service)}
    reached = reach(session, targets)
    assert not any(reached.values()), {k: targets[k] for k, v in reached.items() if v}
    # Its own OpenCode still answers inside, and codestation still reaches it from outside.
    assert reach(session, {"self": "127.0.0.1:" + str(own_port(runtime, session))})["self"]
    assert service.client.session(session.id).status is Status.RUNNING


def test_full_is_the_host_s_network(
    start_service: ServiceFactory, workspace: Path, world: World, runtime: str
) -> None:
    service = start_service(environments=environments())
    session = sessions_on(service, workspace, "full")
    eth0 = next(a for a in world.host_addresses if not ipaddress.ip_address(a).is_loopback)
    reached = reach(session, {"outside": world.outside, "host": f"{eth0}:{world.host_port}"})
    assert reached == {"outside": True, "host": True}


def test_allow_opens_a_private_range_to_egress(
    start_service: ServiceFactory, workspace: Path, world: World, runtime: str
) -> None:
    mirror = world.private.split(":")[0]
    eth0 = next(a for a in world.host_addresses if not ipaddress.ip_address(a).is_loopback)
    # The host's own address in the list too: no allow list opens the host itself.
    allowed = {"network": "egress", "allow": [f"{mirror}/32", f"{eth0}/32"]}
    service = start_service(environments=environments(mirror=allowed))
    targets = {"mirror": world.private, "host": f"{eth0}:{world.host_port}"}
    opened = reach(sessions_on(service, workspace, "mirror"), targets)
    assert opened == {"mirror": True, "host": False}
    plain = reach(sessions_on(service, workspace, "egress"), targets)
    assert plain == {"mirror": False, "host": False}


def own_port(runtime: str, session: SessionInfo) -> int:
    """The port a session's OpenCode listens on inside its sandbox."""
    return 8080 if runtime == "docker" else session.port
