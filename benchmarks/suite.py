"""Every benchmark, one after the other, and one table: each figure beside its goal.

Each benchmark runs as it does alone (its own detailed output passes through) and hands its
figures over as JSON; the ratios are measured side by side within each benchmark's own run.
`--quick` runs each briefly, to prove they all still run (what CI does): its figures are noisy,
never a verdict.

    .venv/bin/python benchmarks/suite.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent

# Each benchmark: its script, its arguments in full and in --quick.
BENCHMARKS = {
    "cold_start.py": (["--runs", "7"], ["--runs", "1"]),
    "warm_start.py": (["--runs", "30"], ["--runs", "2"]),
    "changes.py": (["--runs", "7"], ["--runs", "1", "--files", "1000"]),
    "proxy.py": (["--requests", "300"], ["--requests", "30"]),
    "streams.py": (
        ["--events", "200", "--echoes", "300"],
        ["--events", "20", "--echoes", "20", "--megabytes", "5"],
    ),
    "density.py": (["--sessions", "10"], ["--sessions", "2"]),
    "api.py": (["--requests", "500"], ["--requests", "30"]),
    "cluster.py": (["--runs", "5", "--requests", "200"], ["--runs", "1", "--requests", "20"]),
}
# What each figure is held to (issue 11), where there is a goal.
GOALS = {
    "cold start docker ratio": "<= 1.10 x bare",
    "cold start bwrap ratio": "<= 1.05 x bare",
    "cold start docker floor ratio": "(bare + the engine starting a container: the least)",
    "warm start docker p50 ms": "<= 100 (E2B ~100-150, Daytona < 90)",
    "warm start docker p95 ms": "<= 250",
    "warm start bwrap p50 ms": "<= 100 (E2B ~100-150, Daytona < 90)",
    "warm start bwrap p95 ms": "<= 250",
    "warm start bwrap-builtin p50 ms": "(OpenCode's own catalog rebuild: ~0.4 s CPU)",
    "proxy /global/health ratio": "<= 1.2 x direct",
    "proxy /session ratio": "<= 1.2 x direct",
    "proxy /global/health bare forwarder ratio": "(the least a Python proxy does: the floor)",
    "proxy /session bare forwarder ratio": "(the least a Python proxy does: the floor)",
    "uvicorn constant answer ratio": "(uvicorn answering, forwarding nothing)",
    "SSE event added delay p50 ms": "<= 1",
    "WebSocket echo added p50 ms": "<= 1 (direct + 1 ms)",
    "big terminal output, service peak growth MiB": "(relayed as it comes, not held)",
    "start on the big workspace ratio": "~ 1 (the snapshot hides in the start)",
    "status read ratio to bare": "(a bare FastAPI endpoint answering the same JSON)",
    "idle sessions that fit, docker": ">= 100",
    "idle sessions that fit, bwrap": ">= 100",
    "kubernetes start ratio": "(to a bare Pod of OpenCode, the same limits)",
    "kubernetes proxy pod ratio": "(to the Pod's IP)",
    "kubernetes port-forward listener ratio": "(the API server's port-forward alone)",
    "kubernetes proxy port-forward ratio": "(to the Pod's IP)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Briefly: prove they run.")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        for script, (full, quick) in BENCHMARKS.items():
            out = Path(tmp, f"{script}.json")
            print(f"\n== {script}", flush=True)
            subprocess.run(
                [sys.executable, str(HERE / script), *(quick if args.quick else full),
                 "--json", str(out)],
                check=True,
            )  # fmt: skip
            figures |= json.loads(out.read_text())

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = len(os.sched_getaffinity(0))
    kind = "quick: noisy, not a verdict" if args.quick else "full run"
    machine = f"{platform.node()}: {cores} cores, Python {platform.python_version()}"
    print(f"\n== all figures ({kind}), {when}, {machine}")
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value:>10}  {GOALS.get(name, '')}")


if __name__ == "__main__":
    main()
