"""Cold start: codestation's session start, in each runtime, beside bare OpenCode's.

(a) codestation, Docker: POST /api/v1/code/start -> OpenCode healthy through the published port.
(b) codestation, bubblewrap: the same, in the bwrap sandbox.
(c) bare: the same OpenCode binary started on the host in the same directory -> healthy.
(d) the Docker engine alone: a container of the sandbox image running `sleep`, started and
    removed through the Docker SDK. No Docker session can start faster than (c) + (d): the
    floor under the ratio a/c.

Runs are interleaved (a, b, c, d, a, b, c, d, ...) so drift on a noisy machine hits all alike.
Prints the medians and the ratios a/c and b/c. Needs what `make run` sets up (a Docker engine, the
sandbox image, bubblewrap).

    .venv/bin/python benchmarks/cold_start.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
from pydantic import SecretStr

from codestation.agent import OFFLINE_ENV, opencode_binary, serve_args, wait_ready
from codestation.client import Client
from codestation.config import Settings
from codestation.image import image_tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(url: str, password: str, deadline: float) -> None:
    """Healthy, as codestation's own readiness probe finds it (`agent.wait_ready`): bare
    OpenCode is timed by the same measure as a session."""

    async def still_running() -> None:
        return None

    async def probe() -> None:
        async with httpx.AsyncClient() as client:
            seconds = deadline - time.monotonic()
            await wait_ready(client, url, SecretStr(password), seconds, still_running)

    asyncio.run(probe())


PHASES = ("admission", "prepare", "sandbox", "snapshot", "boot")


def codestation_start(
    client: Client, workspace: Path, environment: str, phases: list[dict[str, float]] | None = None
) -> float:
    """Seconds from POST start to OpenCode healthy; the session's own timing of each phase of
    its start goes into `phases`."""
    begin = time.monotonic()
    started = client.start(str(workspace), environment, wait=False)
    session = client.wait(started.id, interval=0.02, timeout=120)
    if session.url is None:
        raise RuntimeError(f"session failed: {session.error}")
    wait_healthy(session.url, session.auth.password, time.monotonic() + 60)
    elapsed = time.monotonic() - begin
    if phases is not None:
        phases.append(session.phases)
    client.delete(session.id)
    return elapsed


def bare_start(binary: Path, workspace: Path) -> float:
    password = secrets.token_urlsafe(16)
    port = free_port()
    home = tempfile.mkdtemp(prefix="bare-home-")
    env = {**os.environ, **OFFLINE_ENV, "HOME": home, "OPENCODE_SERVER_PASSWORD": password}
    begin = time.monotonic()
    process = subprocess.Popen(
        serve_args("127.0.0.1", port, str(binary)),
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", password, time.monotonic() + 60)
        return time.monotonic() - begin
    finally:
        process.terminate()
        process.wait(timeout=30)


def engine_start(engine: docker.DockerClient, image: str) -> float:
    """Seconds for the Docker engine to create and start a container of `image` (detached,
    on the default bridge, as `docker run -d` would), measured through the same SDK the
    runtime uses; the container is removed after, untimed."""
    begin = time.monotonic()
    container = engine.containers.run(image, ["sleep", "60"], detach=True)
    elapsed = time.monotonic() - begin
    container.remove(force=True)
    return elapsed


def serve(
    data_dir: Path,
    port: int,
    runtime: str = "docker",
    environments: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """The service, on its own data; its first start writes the admin token to `token`."""
    env = {
        **os.environ,
        "CODESTATION_DATA_DIR": str(data_dir),
        "CODESTATION_TOKEN_FILE": str(data_dir.parent / "config" / "token"),
        "CODESTATION_PORT": str(port),
        "CODESTATION_RUNTIME": runtime,
        "CODESTATION_ENVIRONMENTS": json.dumps(environments or {"bwrap": {"runtime": "bwrap"}}),
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "codestation.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("codestation did not start")


@dataclass
class Served:
    """A running service of a benchmark's own: its scratch directory, address and admin token."""

    tmp: Path
    port: int
    token: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, timeout: float = 120) -> Client:
        return Client(self.url, token=self.token, timeout=timeout)


@contextmanager
def served(
    prefix: str,
    runtime: str = "docker",
    environments: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Served]:
    """The service in a scratch directory of its own, stopped (and the directory gone) after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        port = free_port()
        process = serve(Path(tmp, "data"), port, runtime, environments, extra_env)
        try:
            token = Path(tmp, "config", "token").read_text().strip()
            yield Served(Path(tmp), port, token, process)
        finally:
            process.terminate()
            process.wait(timeout=60)


def project(parent: Path, name: str = "project") -> Path:
    """A small workspace to start sessions on."""
    workspace = parent / name
    workspace.mkdir()
    (workspace / "README.md").write_text("# benchmark\n")
    return workspace


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    settings = Settings()
    binary = opencode_binary(settings)
    engine = docker.from_env()
    with served("cold-start-") as service, service.client() as client:
        workspace = project(service.tmp)
        # Warm-up: the image and the binary in place, caches hot.
        codestation_start(client, workspace, "default")
        codestation_start(client, workspace, "bwrap")
        bare_start(binary, workspace)
        image = image_tag(settings)  # the service has built it by now
        engine_start(engine, image)
        a, b, c, d = [], [], [], []
        phases: dict[str, list[dict[str, float]]] = {"docker": [], "bwrap": []}
        for i in range(args.runs):
            a.append(codestation_start(client, workspace, "default", phases["docker"]))
            b.append(codestation_start(client, workspace, "bwrap", phases["bwrap"]))
            c.append(bare_start(binary, workspace))
            d.append(engine_start(engine, image))
            print(
                f"run {i + 1}: docker {a[-1]:.2f} s, bwrap {b[-1]:.2f} s, bare {c[-1]:.2f} s, "
                f"engine alone {d[-1]:.2f} s",
                flush=True,
            )
    ma, mb, mc, md = (statistics.median(x) for x in (a, b, c, d))
    print(f"\nmedian over {args.runs} runs")
    print(f"  (a) codestation start -> healthy, docker: {ma:.2f} s")
    print(f"  (b) codestation start -> healthy, bwrap:  {mb:.2f} s")
    print(f"  (c) bare opencode serve -> healthy:       {mc:.2f} s")
    print(f"  (d) docker engine alone, run -d:          {md:.2f} s")
    print(f"  ratio a/c: {ma / mc:.2f}   ratio b/c: {mb / mc:.2f}")
    print(f"  floor under a/c, (c + d)/c: {(mc + md) / mc:.2f}")
    print("\nphases of a start, as each session timed them (median seconds)")
    print("  " + "".join(f"{name:>11}" for name in ("runtime", *PHASES)))
    for runtime, seen in phases.items():
        medians = [statistics.median(p.get(name, 0.0) for p in seen) for name in PHASES]
        print("  " + f"{runtime:>11}" + "".join(f"{m:>11.3f}" for m in medians))
    if args.json:
        figures = {
            "cold start docker s": round(ma, 3),
            "cold start bwrap s": round(mb, 3),
            "bare opencode s": round(mc, 3),
            "cold start docker ratio": round(ma / mc, 2),
            "cold start bwrap ratio": round(mb / mc, 2),
            "docker engine run -d s": round(md, 3),
            "cold start docker floor ratio": round((mc + md) / mc, 2),
        }
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
