"""The real service as a subprocess, against the real Docker engine and OpenCode binary.

Every service a test starts gets its own data directory, token file and port range. Its first
start makes the admin token, as it would for a person, and the fixture reads it from the token
file; `service.client` and `service.http()` carry it. When the test ends, the fixture stops what
is left and checks nothing leaked: no container labelled with that data directory, no port
still leased or held.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from codestation import Client, SessionInfo
from codestation.ports import port_is_free
from codestation.runtimes.docker import LABEL_DATA_DIR

pytestmark = pytest.mark.e2e

RUNTIMES = ("docker", "bwrap")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every end-to-end test runs against each runtime, or those its `runtimes` mark names.

    A runtime missing on the machine fails its tests: nothing here skips.
    """
    if "runtime" in metafunc.fixturenames:
        mark = metafunc.definition.get_closest_marker("runtimes")
        metafunc.parametrize("runtime", mark.args if mark else RUNTIMES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Each pytest-xdist worker takes ranges from a block of its own, so parallel workers never
# probe and lease the same ports; all below the kernel's ephemeral range (32768 and up), where
# any outgoing connection may hold a port for a while.
_worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_next_block = [20000 + 3000 * _worker]


def free_range(size: int) -> tuple[int, int]:
    """`size` consecutive ports that nothing holds, distinct from earlier ranges of this run."""
    start = _next_block[0]
    while not all(port_is_free("127.0.0.1", p) for p in range(start, start + size)):
        start += size
    _next_block[0] = start + size
    return start, start + size - 1


@dataclass
class Service:
    url: str
    data_dir: Path
    ports: tuple[int, int]
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path
    command: list[str]  # `codestation serve`, as this test runs it
    token: str = ""  # the admin token its first start made
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = Client(self.url, timeout=120, token=self.token or None)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def http(self, token: str | None = None) -> httpx.Client:
        """A client with the admin's token, or `token`'s."""
        return httpx.Client(base_url=self.url, timeout=120, headers=self.auth_headers(token))

    def auth_headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def client_for(self, token: str) -> Client:
        return Client(self.url, timeout=120, token=token)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`codestation ARGS` against this service's data and configuration."""
        return subprocess.run(
            [sys.executable, "-m", "codestation.cli", *args],
            env={**self.env, "CODESTATION_URL": self.url, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def login_link(self, token: str | None = None) -> str:
        """A one-time login link for `token` (the admin's): `codestation token link ID`."""
        made = self.cli("token", "link", (token or self.token).split("_")[1])
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()

    def browser_login(self, http: httpx.Client, session_id: str) -> str:
        """Walk a browser's way onto a session's host name with `http`, which holds a login
        cookie for the service: the host's state cookie, the service's ticket, the host's door.
        Returns the host's own login cookie."""
        host = f"{session_id}.localhost:{self.port}"
        as_page = {"Accept": "text/html", "Host": host}
        to_service = http.get("/", headers=as_page, follow_redirects=False)
        assert to_service.status_code == 303, to_service.text
        state = to_service.cookies["codestation_state"]
        back = http.get(to_service.headers["location"], follow_redirects=False)
        assert back.status_code == 303, back.text
        door = back.headers["location"].replace(f"http://{host}", self.url)
        cookie = {"Cookie": f"codestation_state={state}"}
        entered = httpx.get(door, headers={"Host": host, **cookie}, follow_redirects=False)
        assert entered.status_code == 303, entered.text
        return entered.cookies["codestation_session"]

    def make_token(self, user: str, *, admin: bool = False, expires: str | None = None) -> str:
        """A new token for `user`, made as an admin would: `codestation token create`."""
        args = ["token", "create", "--user", user, *(["--admin"] if admin else [])]
        made = self.cli(*args, *(["--expires", expires] if expires else []))
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()

    def leftovers(self) -> list[str]:
        """Sandboxes of this service still on the machine: containers, and every process of a
        bwrap sandbox, whatever it is and whether or not its bwrap still runs.

        A bwrap sandbox's output goes to its log under this service's data directory: bwrap's,
        its init's (pid 1 of the sandbox's PID namespace) and OpenCode's stdout are that file
        (still so once it is deleted). What OpenCode starts (a PTY's shell) writes elsewhere,
        but lives in the same PID namespace, which the kernel empties when its init ends: so a
        process is a leftover if its output is in the data directory, or if it shares a PID
        namespace other than ours with such a process.
        """
        found = [f"container {c.name}" for c in self.containers()]
        ours = os.readlink("/proc/self/ns/pid")
        inside = str(self.data_dir) + os.sep
        processes: dict[str, tuple[str, str, bool]] = {}  # pid: (argv[0], pid ns, writes here)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                namespace = os.readlink(proc / "ns" / "pid")
                outputs = [os.readlink(proc / "fd" / fd) for fd in ("1", "2")]
            except OSError:  # gone meanwhile, or a zombie (which has no descriptors)
                continue
            processes[proc.name] = (argv0, namespace, any(o.startswith(inside) for o in outputs))
        sandboxes = {ns for _, ns, writes_here in processes.values() if writes_here} - {ours}
        for pid, (argv0, namespace, writes_here) in sorted(processes.items()):
            if writes_here or namespace in sandboxes:
                found.append(f"sandbox process {pid} ({argv0 or '?'})")
        return found

    def containers(self) -> list[Any]:
        engine = docker.from_env()
        try:
            for _ in range(10):
                try:
                    return list(
                        engine.containers.list(
                            all=True, filters={"label": f"{LABEL_DATA_DIR}={self.data_dir}"}
                        )
                    )
                except docker.errors.NotFound:  # removed between the list and its details
                    time.sleep(0.1)
            raise AssertionError("the engine's container list kept changing")
        finally:
            engine.close()

    def stop_process(self, sig: int = 15) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def restart(self, sig: int = 15) -> None:
        """Stop the service process and start another on the same data, port and range."""
        self.stop_process(sig)
        self.process = _spawn(self.command, self.env, self.log)
        _wait_healthy(self)


# The service from this checkout, as the tests' own Python runs it.
SERVE = [sys.executable, "-m", "codestation.cli", "serve"]


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_healthy(service: Service) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"the service exited at start-up:\n{service.log.read_text()}")
        try:
            if httpx.get(f"{service.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the service did not answer in 60 s:\n{service.log.read_text()}")


def launch(
    tmp_path: Path,
    ports: tuple[int, int],
    extra_env: dict[str, str],
    command: list[str] = SERVE,
    **settings: str,
) -> Service:
    data_dir = tmp_path / f"data-{len(list(tmp_path.glob('data-*')))}"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "CODESTATION_TOKEN"},
        "CODESTATION_DATA_DIR": str(data_dir),
        # A directory of its own: codestation refuses workspaces that hold its token file's.
        "CODESTATION_TOKEN_FILE": str(data_dir.parent / f"config-{data_dir.name}" / "token"),
        "CODESTATION_PORT": str(port),
        "CODESTATION_PORT_RANGE_START": str(ports[0]),
        "CODESTATION_PORT_RANGE_END": str(ports[1]),
        # Tests start more sessions at once than a 24 GiB host's budget admits at the default
        # 4g each; test_capacity.py sets its own budget to test admission.
        "CODESTATION_MEMORY_BUDGET": "1024g",
        **{f"CODESTATION_{k.upper()}": v for k, v in settings.items()},
        **extra_env,
    }
    env.pop("CODESTATION_CONFIG", None)
    log = tmp_path / f"service-{port}.log"
    process = _spawn(command, env, log)
    service = Service(f"http://127.0.0.1:{port}", data_dir, ports, process, env, log, command)
    _wait_healthy(service)
    service.token = Path(env["CODESTATION_TOKEN_FILE"]).read_text().strip()
    service.client = service.client_for(service.token)
    return service


ServiceFactory = Callable[..., Service]


@pytest.fixture
def start_service(launch_service: ServiceFactory, runtime: str) -> ServiceFactory:
    """Start a service whose sessions run in this test's runtime."""

    def factory(size: int = 10, **settings: str) -> Service:
        return launch_service(size, **{"runtime": runtime, **settings})

    return factory


@pytest.fixture
def launch_service(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start a service with exactly these settings (and extra environment variables in `env`)."""
    started: list[Service] = []

    def factory(
        size: int = 10,
        env: dict[str, str] | None = None,
        command: list[str] = SERVE,
        **settings: str,
    ) -> Service:
        service = launch(tmp_path, free_range(size), env or {}, command, **settings)
        started.append(service)
        return service

    yield factory
    for service in started:
        if service.process.poll() is None:
            service.client.stop_all(everyone=True)
            service.stop_process()
        leftovers = service.leftovers()
        for container in service.containers():
            container.remove(force=True)
        assert not leftovers, f"sandboxes left behind: {leftovers}"
        # The engine's port proxy may take a moment to let go on a loaded machine.
        deadline = time.monotonic() + 15
        while held := [p for p in range(service.ports[0], service.ports[1] + 1)
                       if not port_is_free("127.0.0.1", p)]:  # fmt: skip
            assert time.monotonic() < deadline, (
                f"ports still held after every session stopped: {held}"
            )
            time.sleep(0.2)


@pytest.fixture
def service(start_service: ServiceFactory) -> Service:
    return start_service()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / "README.md").write_text("# a project\n")
    (ws / "src").mkdir()
    (ws / "src" / "main.py").write_text("print('hello')\n")
    return ws


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root` with its mode and content."""
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_in_session(session: SessionInfo, script: str, timeout: float = 30) -> tuple[int, str]:
    """Run `script` in a shell inside the session's sandbox through OpenCode's own PTY API (as
    the agent's shell tool would); return its exit status and what it printed.

    The shell leaves both in the workspace, where the test reads them from the host: reading
    them over the PTY's WebSocket proved racy (OpenCode sometimes closes a fresh connection).
    """
    auth = (session.auth.username, session.auth.password)
    tag = secrets.token_hex(6)
    out, status = Path(session.workspace, f".t-{tag}.out"), Path(session.workspace, f".t-{tag}")
    wrapped = (
        f"({script}) > /workspace/{out.name} 2>&1; "
        f"echo $? > /workspace/{status.name}.tmp; mv /workspace/{status.name}.tmp "
        f"/workspace/{status.name}"
    )
    created = httpx.post(
        f"{session.url}/pty", auth=auth, timeout=60, json={"command": "sh", "args": ["-c", wrapped]}
    )
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + timeout
    while not status.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{script!r} did not finish in {timeout} s")
        time.sleep(0.05)
    code, printed = int(status.read_text()), out.read_text()
    status.unlink()
    out.unlink()
    return code, printed


def agent_pid(session: SessionInfo) -> int:
    """The host pid of the session's OpenCode, found by its password in its environment."""
    marker = f"OPENCODE_SERVER_PASSWORD={session.auth.password}".encode()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            is_agent = cmdline[0].endswith(b"opencode") and b"serve" in cmdline  # not bwrap
            if is_agent and marker in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    raise LookupError("no OpenCode process for the session")


@dataclass(frozen=True)
class Model:
    """The scripted model server (`tests/e2e/llm.py`), in a network namespace of its own on an
    address no rule treats as private, as a real provider is: sandboxes reach it with the
    default `egress` network. `key` is the API key its environment names as a secret."""

    root: str  # http://address:port
    key: str
    env_var: str  # the service's variable that holds `key`

    @property
    def url(self) -> str:
        """What OpenCode's baseURL is."""
        return f"{self.root}/v1"

    def requests(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(f"{self.root}/_requests", timeout=10).json()[
            "requests"
        ]
        return found

    def environment(self, **extra: Any) -> dict[str, Any]:
        """An environment profile whose agent uses this model, its key given as a secret."""
        return {
            "provider": {
                "scripted": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "Scripted",
                    "options": {"baseURL": self.url, "apiKey": "{env:MODEL_KEY}"},
                    "models": {"mock-model": {"name": "Mock"}},
                }
            },
            "model": "scripted/mock-model",
            "secrets": {"MODEL_KEY": {"env": self.env_var}},
            **extra,
        }


@pytest.fixture(scope="session")
def model() -> Iterator[Model]:
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    name, subnet = f"csmodel{worker}", f"198.19.{worker}"
    inside = ["ip", "netns", "exec", name]

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    for leftover in (("netns", "del", name), ("link", "del", f"{name}h")):  # a killed run's
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", *leftover)
    sh("ip", "netns", "add", name)
    sh("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}n")
    sh("ip", "link", "set", f"{name}n", "netns", name)
    sh("ip", "addr", "add", f"{subnet}.2/24", "dev", f"{name}h")
    sh("ip", "link", "set", f"{name}h", "up")
    sh(*inside, "ip", "addr", "add", f"{subnet}.1/24", "dev", f"{name}n")
    sh(*inside, "ip", "link", "set", f"{name}n", "up")
    sh(*inside, "ip", "link", "set", "lo", "up")
    server = subprocess.Popen(
        [*inside, sys.executable, "-m", "tests.e2e.llm", "--host", f"{subnet}.1", "--port", "8000"],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.DEVNULL,
    )
    found = Model(f"http://{subnet}.1:8000", f"sk-test-{secrets.token_hex(12)}", "CS_TEST_KEY")
    deadline = time.monotonic() + 30
    while True:
        try:
            found.requests()
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the scripted model server did not come up"
            time.sleep(0.2)
    yield found
    server.terminate()
    server.wait(10)
    with contextlib.suppress(subprocess.CalledProcessError):
        sh("ip", "netns", "del", name)


# A real browser's fixtures, for every test that asks for one.
from tests.e2e.browser import browser, console, new_context, page  # noqa: E402, F401
