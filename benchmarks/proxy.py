"""The per-session proxy's cost: small requests to a session's OpenCode through codestation (its
own host name, a token) against the same requests straight to OpenCode's published port (its
password), interleaved one by one, over one kept-alive connection each. Prints p50 and p95 of
each and the ratio of the p50s.

Two anchors run beside them, each in a uvicorn of its own (`forwarder.py`): a bare forwarder,
the least any Python proxy on the service's stack does (forward with the password, nothing
checked), and uvicorn answering a constant without forwarding at all. They show how much of
the proxy's cost is codestation's own and how much is a Python server's floor.

    .venv/bin/python benchmarks/proxy.py [--requests 300] [--runtime bwrap] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cold_start import free_port, p95, project, served

PATHS = ("/global/health", "/session")


def timed(http: httpx.Client, path: str) -> float:
    begin = time.perf_counter()
    answer = http.get(path)
    took = time.perf_counter() - begin
    if answer.status_code != 200:
        raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
    return took


@contextmanager
def forwarder(upstream: str, username: str, password: str) -> Iterator[str]:
    """`forwarder.py` in a uvicorn of its own, forwarding to `upstream`; yields its URL."""
    port = free_port()
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "forwarder:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=Path(__file__).parent,
        env={**os.environ, "FORWARD_TO": upstream, "FORWARD_AUTH": f"Basic {basic}"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/_constant").raise_for_status()
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the forwarder did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--runtime", choices=["docker", "bwrap"], default="bwrap")
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    with served("proxy-bench-", args.runtime) as service, service.client() as client:
        session = client.start(str(project(service.tmp)))
        assert session.url is not None, session.error
        direct = httpx.Client(
            base_url=session.url, auth=(session.auth.username, session.auth.password)
        )
        proxied = httpx.Client(
            base_url=service.url,
            headers={"Host": f"{session.id}.localhost:{service.port}", **service.bearer},
        )
        auth = session.auth
        with (
            forwarder(session.url, auth.username, auth.password) as floor_url,
            direct,
            proxied,
            httpx.Client(base_url=floor_url) as bare,
        ):
            for _ in range(20):
                timed(bare, "/_constant")
            for path in PATHS:
                clients = {"direct": direct, "forwarder": bare, "codestation": proxied}
                for _ in range(20):  # warm-up: connections, OpenCode's instance
                    for http in clients.values():
                        timed(http, path)
                took: dict[str, list[float]] = {name: [] for name in (*clients, "constant")}
                for _ in range(args.requests):
                    for name, http in clients.items():
                        took[name].append(timed(http, path))
                    if path == PATHS[0]:
                        took["constant"].append(timed(bare, "/_constant"))
                d50 = statistics.median(took["direct"])
                for name, values in took.items():
                    if values:
                        p50 = statistics.median(values)
                        print(
                            f"GET {path}, {name}: p50 {p50 * 1000:.2f} ms p95 "
                            f"{p95(values) * 1000:.2f} ms; ratio to direct {p50 / d50:.2f}",
                            flush=True,
                        )
                p50 = statistics.median(took["codestation"])
                figures[f"proxy {path} p50 ms"] = round(p50 * 1000, 2)
                figures[f"proxy {path} ratio"] = round(p50 / d50, 2)
                f50 = statistics.median(took["forwarder"])
                figures[f"proxy {path} bare forwarder ratio"] = round(f50 / d50, 2)
                if took["constant"]:
                    c50 = statistics.median(took["constant"])
                    figures["uvicorn constant answer ratio"] = round(c50 / d50, 2)
        session.stop()
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
