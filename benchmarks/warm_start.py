"""Warm start: a session that takes a sandbox from the warm pool, in each runtime.

Timed from POST /api/v1/code/start to OpenCode answering for that workspace: `GET /file?path=.`
through codestation's proxy lists the workspace's files. Each run then deletes the session and
waits for every pool to refill, so every start finds a member ready and none booting beside
it. Runs alternate between Docker and bubblewrap. Prints p50 and p95 of each, beside E2B's
and Daytona's published figures (about 100-150 ms and under 90 ms, from pre-started or
snapshotted machines), and the direct `GET /file?path=.` to a running OpenCode for scale.
Needs what `make run` sets up, as root.

    .venv/bin/python benchmarks/warm_start.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from codestation.agent import DIRECTORY, USERNAME
from codestation.client import Client
from cold_start import p95, project, served

PROFILE = False
# OpenCode rebuilds its built-in catalog of models (models.dev: 225 providers) each time it
# opens a project, some 0.4 s of CPU; an environment that lists its own models
# (`catalog = "configured"`) skips that. Both are measured.
_OWN_MODEL = {
    "catalog": "configured",
    "provider": {"own": {"npm": "@ai-sdk/openai-compatible", "models": {"model": {}},
                         "options": {"baseURL": "http://model.invalid/v1"}}},
    "model": "own/model",
}  # fmt: skip
ENVIRONMENTS = {
    "docker": {"runtime": "docker", "pool": 1, **_OWN_MODEL},
    "bwrap": {"runtime": "bwrap", "pool": 1, **_OWN_MODEL},
    "bwrap-builtin": {"runtime": "bwrap", "pool": 1},
}


def wait_pool(client: Client, environment: str) -> None:
    deadline = time.monotonic() + 120
    while client.health()["capacity"]["pool_ready"].get(environment, 0) < 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool of {environment} did not refill")
        time.sleep(0.05)


def warm_start(
    client: Client, http: httpx.Client, workspace: Path, environment: str
) -> tuple[float, str]:
    """Seconds from POST start to the workspace's files listed through the proxy, and where
    the session started from. Every pool is full first: no member boots beside the start."""
    for each in ENVIRONMENTS:
        wait_pool(client, each)
    begin = time.perf_counter()
    session = client.start(str(workspace), environment, wait=False)
    answered = time.perf_counter() - begin
    if session.status != "running":
        session = client.wait(session.id, interval=0.01, timeout=120)
    listed = http.get(f"/api/v1/code/session/{session.id}/opencode/file", params={"path": "."})
    elapsed = time.perf_counter() - begin
    if PROFILE:
        print(f"  start answered {answered * 1000:.0f} ms, phases {session.phases}", flush=True)
    names = {entry["name"] for entry in listed.json()}
    if "README.md" not in names:
        raise RuntimeError(f"the workspace was not listed: {listed.text[:200]}")
    client.delete(session.id)
    return elapsed, session.started_from


def direct_listing(client: Client, workspace: Path) -> float:
    """A running session's `GET /file?path=.` asked of OpenCode directly, for scale (median)."""
    session = client.start(str(workspace), wait=True)
    assert session.url is not None
    times = []
    with httpx.Client(auth=(USERNAME, session.auth.password), headers=DIRECTORY) as http:
        for _ in range(20):
            begin = time.perf_counter()
            http.get(f"{session.url}/file", params={"path": "."}).raise_for_status()
            times.append(time.perf_counter() - begin)
    client.delete(session.id)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    with (
        served("warm-start-", environments=ENVIRONMENTS) as service,
        service.client() as client,
        httpx.Client(base_url=service.url, headers=service.bearer, timeout=120) as http,
    ):
        workspace = project(service.tmp)
        (workspace / "src").mkdir()
        (workspace / "src" / "main.py").write_text("print('hello')\n")
        # The first start of each is cold: it tells the pool whom to start sandboxes for.
        for environment in ENVIRONMENTS:
            client.delete(client.start(str(workspace), environment).id)
        direct = direct_listing(client, workspace)
        times: dict[str, list[float]] = {name: [] for name in ENVIRONMENTS}
        for i in range(args.runs):
            for environment in ENVIRONMENTS:
                took, origin = warm_start(client, http, workspace, environment)
                if origin != "pool":
                    raise RuntimeError(f"run {i + 1} of {environment} started {origin}")
                times[environment].append(took)
            print(f"run {i + 1}: " + ", ".join(
                f"{name} {seen[-1] * 1000:.0f} ms" for name, seen in times.items()
            ), flush=True)  # fmt: skip
    figures: dict[str, float] = {}
    print(f"\nover {args.runs} warm starts each (POST start -> the workspace listed via the proxy)")
    for environment, seen in times.items():
        p50 = statistics.median(seen) * 1000
        high = p95(seen) * 1000
        print(f"  {environment:>13}: p50 {p50:.0f} ms, p95 {high:.0f} ms")
        figures[f"warm start {environment} p50 ms"] = round(p50, 1)
        figures[f"warm start {environment} p95 ms"] = round(high, 1)
    print(f"  for scale: GET /file?path=. asked of OpenCode directly, p50 {direct * 1000:.1f} ms")
    print("  published: E2B ~100-150 ms, Daytona < 90 ms (from pre-started machines)")
    figures["direct /file listing ms"] = round(direct * 1000, 1)
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
