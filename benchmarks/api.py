"""API status reads: a session's status from codestation's API, beside a bare FastAPI endpoint
that answers the same JSON on this machine (the floor any FastAPI service stands on).

(a) codestation: `GET /api/v1/code/session/{id}` with a token (authentication, the store, the
    session's shape); (b) bare: `GET /session` of a FastAPI app in a uvicorn of its own,
    answering a fixed copy of that JSON. Interleaved one by one over a kept-alive connection
    each; p50 and p95 of each and the ratio of the p50s.

    .venv/bin/python benchmarks/api.py [--requests 500]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cold_start import free_port, p95, project, served

BARE_APP = """
import json, sys
from fastapi import FastAPI
app = FastAPI()
answer = json.loads(sys.argv[1])
@app.get("/session")
async def session() -> dict:
    return answer
"""


def timed(http: httpx.Client, path: str) -> float:
    begin = time.perf_counter()
    http.get(path).raise_for_status()
    return time.perf_counter() - begin


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    with served("api-", runtime="bwrap") as service, service.client() as client:
        session = client.start(str(project(service.tmp)))
        path = f"/api/v1/code/session/{session.id}"
        with httpx.Client(base_url=service.url, headers=service.bearer) as http:
            answer = http.get(path).json()
        bare_port = free_port()
        script = service.tmp / "bare_app.py"
        script.write_text(BARE_APP)
        # The answer goes to the app as its first argument.
        bare = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, uvicorn; sys.path.insert(0, sys.argv[3]); "
             "import bare_app; uvicorn.run(bare_app.app, port=int(sys.argv[2]), "
             "log_level='warning')",
             json.dumps(answer), str(bare_port), str(service.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_listening(bare_port)
            ours, floor = [], []
            with (
                httpx.Client(base_url=service.url, headers=service.bearer) as http,
                httpx.Client(base_url=f"http://127.0.0.1:{bare_port}") as plain,
            ):
                for _ in range(20):  # warm-up
                    timed(http, path)
                    timed(plain, "/session")
                for _ in range(args.requests):
                    ours.append(timed(http, path))
                    floor.append(timed(plain, "/session"))
        finally:
            bare.terminate()
            bare.wait(timeout=30)
        client.delete(session.id)

    a, b = statistics.median(ours) * 1000, statistics.median(floor) * 1000
    print(
        f"GET a session's status: codestation p50 {a:.2f} ms p95 {p95(ours) * 1000:.2f} ms; "
        f"bare FastAPI p50 {b:.2f} ms p95 {p95(floor) * 1000:.2f} ms; ratio {a / b:.2f}"
    )
    if args.json:
        figures = {"status read p50 ms": round(a, 2), "status read ratio to bare": round(a / b, 2)}
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
