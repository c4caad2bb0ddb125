"""Density: how much memory an idle session takes, in each runtime, and how many fit here.

Starts N idle sessions in one runtime, then the other (each on a workspace of its own, one at a
time), lets them settle, and reads the host's available memory (MemAvailable) and the
service's own resident memory before and after. Per idle session: the drop in available
memory over N (everything a session costs the host: OpenCode, its sandbox, the engine's share);
per tracked session: the growth of the service's RSS over N. Then: how many idle sessions this
host's memory would hold (MemTotal less codestation's default `memory_reserve`, 2 GiB, over the
cost of one), the goal being 100 or more.

    .venv/bin/python benchmarks/density.py [--sessions 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cold_start import served

RESERVE = 2 << 30  # codestation's default memory_reserve


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def settled(seconds: float = 15) -> int:
    """Available memory once idle sessions stop growing (their start-up garbage collected)."""
    time.sleep(seconds)
    return meminfo("MemAvailable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    # Idle sessions use far less than their limits reserve (4 GiB each by default): the
    # budget is lifted, to see what the host itself holds.
    lifted = {"CODESTATION_MEMORY_BUDGET": "1024g"}
    with served("density-", extra_env=lifted) as service, service.client() as client:
        for environment, runtime in (("default", "docker"), ("bwrap", "bwrap")):
            # One first, so images, binaries and caches are in place before measuring.
            warm = service.tmp / f"warm-{runtime}"
            warm.mkdir()
            client.delete(client.start(str(warm), environment).id)
            before, service_before = settled(5), rss(service.process.pid)
            ids = []
            for i in range(args.sessions):
                workspace = service.tmp / f"{runtime}-{i}"
                workspace.mkdir()
                (workspace / "README.md").write_text("# idle\n")
                session = client.start(str(workspace), environment)
                if session.status != "running":
                    raise RuntimeError(f"a session did not start: {session.error}")
                ids.append(session.id)
            after, service_after = settled(), rss(service.process.pid)
            per_session = (before - after) / args.sessions
            per_tracked = (service_after - service_before) / args.sessions
            fit = int((meminfo("MemTotal") - RESERVE) / per_session)
            print(f"{runtime}: {args.sessions} idle sessions; each takes "
                  f"{per_session / 2**20:.0f} MiB of the host's memory, "
                  f"{per_tracked / 2**10:.0f} KiB of the service's; "
                  f"about {fit} would fit here", flush=True)  # fmt: skip
            figures[f"idle session {runtime} MiB"] = round(per_session / 2**20)
            figures[f"idle sessions that fit, {runtime}"] = fit
            figures[f"service memory per session, {runtime} KiB"] = round(per_tracked / 1024)
            for session_id in ids:
                client.delete(session_id)
    total = meminfo("MemTotal") / 2**30
    print(f"\nhost memory {total:.1f} GiB, less a 2 GiB reserve; goal: 100 idle sessions or more")
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
