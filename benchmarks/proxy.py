"""The per-session proxy's cost: small requests to a session's OpenCode through codestation (its
own host name, a token) against the same requests straight to OpenCode's published port (its
password), interleaved one by one, over one kept-alive connection each. Prints p50 and p95 of
each and the ratio of the p50s.

    .venv/bin/python benchmarks/proxy.py [--requests 300] [--runtime bwrap] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from cold_start import p95, project, served

PATHS = ("/global/health", "/session")


def timed(http: httpx.Client, path: str) -> float:
    begin = time.perf_counter()
    answer = http.get(path)
    took = time.perf_counter() - begin
    if answer.status_code != 200:
        raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
    return took


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
        with direct, proxied:
            for path in PATHS:
                for _ in range(20):  # warm-up: connections, OpenCode's instance
                    timed(direct, path)
                    timed(proxied, path)
                straight, through = [], []
                for _ in range(args.requests):
                    straight.append(timed(direct, path))
                    through.append(timed(proxied, path))
                d50, p50 = statistics.median(straight), statistics.median(through)
                print(
                    f"GET {path}: direct p50 {d50 * 1000:.2f} ms p95 "
                    f"{p95(straight) * 1000:.2f} ms; through codestation p50 "
                    f"{p50 * 1000:.2f} ms p95 {p95(through) * 1000:.2f} ms; "
                    f"ratio {p50 / d50:.2f}",
                    flush=True,
                )
                figures[f"proxy {path} p50 ms"] = round(p50 * 1000, 2)
                figures[f"proxy {path} ratio"] = round(p50 / d50, 2)
        session.stop()
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
