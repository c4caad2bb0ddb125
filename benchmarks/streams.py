"""The per-session proxy on long-lived traffic: events, terminal keystrokes and a big download,
each through codestation beside the same straight to the session's OpenCode, in one run.

(a) Server-sent events: one subscriber to OpenCode's `/event` through codestation and one
    direct, both listening while OpenCode makes sessions; for each event, how much later it
    reached the subscriber through codestation than the direct one (p50, p95).
(b) WebSocket echo: a keystroke to a PTY running `cat` and its echo back, through codestation
    and direct, interleaved; p50 of each and the difference.
(c) A terminal printing a big file (30 MB), which OpenCode sends on in bursts as fast as the
    socket takes it: the time until all of it came, direct and through codestation, and how
    far the service's resident memory rose meanwhile (its peak, VmHWM, reset first), which
    shows whether the proxy holds what it relays. Not 100 MB: OpenCode 1.18.33 itself drops a
    terminal's WebSocket, and stalls an HTTP answer of 100 MB short of its end, when the reader
    is slower than it writes (README, "Performance").

    .venv/bin/python benchmarks/streams.py [--events 200] [--echoes 300] [--megabytes 30]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
from websockets.sync.client import ClientConnection, connect

from codestation import SessionInfo
from codestation.agent import DIRECTORY
from cold_start import Served, p95, project, served

MiB = 2**20


class Subscriber(threading.Thread):
    """Reads an event stream, noting when each event's data line arrived."""

    def __init__(self, http: httpx.Client) -> None:
        super().__init__(daemon=True)
        self.http = http
        self.seen: dict[str, float] = {}
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            with self.http.stream("GET", "/event") as answer:
                for line in answer.iter_lines():
                    if line.startswith("data:"):
                        self.seen.setdefault(line, time.perf_counter())
                        self.connected.set()
        except httpx.HTTPError:
            pass  # its client closed: the measurement is over


def clients(service: Served, session: SessionInfo) -> tuple[httpx.Client, httpx.Client]:
    """Two HTTP clients for one session: straight to its OpenCode, and through codestation."""
    assert session.url is not None, session.error
    direct = httpx.Client(
        base_url=session.url,
        auth=(session.auth.username, session.auth.password),
        headers=DIRECTORY,
        timeout=60,
    )
    through = httpx.Client(
        base_url=service.url,
        headers={"Host": f"{session.id}.localhost:{service.port}", **service.bearer},
        timeout=60,
    )
    return direct, through


def events(service: Served, session: SessionInfo, direct: httpx.Client, count: int) -> list[float]:
    """For each event both subscribers saw: seconds it came later through codestation."""
    listening = clients(service, session)  # their own, off the thread that makes the events
    near, far = Subscriber(listening[0]), Subscriber(listening[1])
    with listening[0], listening[1]:
        near.start()
        far.start()
        if not (near.connected.wait(30) and far.connected.wait(30)):
            raise RuntimeError("an event stream did not connect")
        for i in range(count):
            direct.post("/session", json={"title": f"event {i}"}).raise_for_status()
            time.sleep(0.02)  # one at a time: each event's path is timed alone
        time.sleep(1)
    both = near.seen.keys() & far.seen.keys()
    if len(both) < count:
        raise RuntimeError(f"only {len(both)} events of {count} reached both subscribers")
    return [far.seen[key] - near.seen[key] for key in both if "server.connected" not in key]


def pty_to(service: Served, session: SessionInfo, pty_id: str, through: bool) -> ClientConnection:
    """A WebSocket to one of the session's PTYs: through codestation, or straight to OpenCode."""
    path = f"/pty/{pty_id}/connect?cursor=-1"
    if through:  # the session's host name, on a socket to the service: no resolver needed
        return connect(
            f"ws://{session.id}.localhost:{service.port}{path}",
            additional_headers=service.bearer,
            sock=socket.create_connection(("127.0.0.1", service.port)),
            max_size=None,
        )
    assert session.url is not None
    basic = base64.b64encode(f"{session.auth.username}:{session.auth.password}".encode()).decode()
    return connect(
        f"{session.url.replace('http://', 'ws://')}{path}",
        additional_headers={"Authorization": f"Basic {basic}", **DIRECTORY},
        max_size=None,
    )


def echo(pty: ClientConnection) -> float:
    begin = time.perf_counter()
    pty.send("x")
    while True:
        frame = pty.recv(timeout=10)
        data = frame.encode() if isinstance(frame, str) else frame
        if not data.startswith(b"\x00") and b"x" in data:
            return time.perf_counter() - begin


def echoes(
    service: Served, session: SessionInfo, direct: httpx.Client, count: int
) -> tuple[list[float], list[float]]:
    """Round trips of a keystroke through a PTY running `cat`: direct, and through codestation
    (a PTY each, so neither sees the other's echo)."""
    made = [
        direct.post("/pty", json={"command": "cat", "args": [], "cwd": "/workspace"}).json()["id"]
        for _ in range(2)
    ]
    straight, through = [], []
    with (
        pty_to(service, session, made[0], False) as near,
        pty_to(service, session, made[1], True) as far,
    ):
        for pty in (near, far):
            pty.recv(timeout=10)  # OpenCode's first frame: where the output stands
        for _ in range(20):  # warm-up
            echo(near)
            echo(far)
        for i in range(count):
            # OpenCode sends a terminal's output on a timer of its own (the echo takes 3-13
            # ms): a random pause before each keystroke meets it at a random phase, and the
            # two take turns at going first.
            time.sleep(random.uniform(0, 0.015))
            if i % 2:
                straight.append(echo(near))
                through.append(echo(far))
            else:
                through.append(echo(far))
                straight.append(echo(near))
    for pty_id in made:
        direct.delete(f"/pty/{pty_id}")
    return straight, through


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def printed(pty: ClientConnection) -> tuple[float, int]:
    """Seconds until the PTY's whole output came, and its size."""
    begin = time.perf_counter()
    size, tail = 0, b""
    while b"THE-END" not in tail:
        frame = pty.recv(timeout=120)
        data = frame.encode() if isinstance(frame, str) else frame
        if not data.startswith(b"\x00"):
            size += len(data)
            tail = (tail + data)[-64:]
    return time.perf_counter() - begin, size


def big_output(
    service: Served, session: SessionInfo, direct: httpx.Client, megabytes: int
) -> dict[str, float]:
    """A terminal printing `megabytes` of a file: direct, then through codestation, each whole;
    the service's peak memory while it relayed."""
    script = f"head -c {megabytes * 10**6} /workspace/big.txt; echo; echo THE-END"
    took, size = [], 0
    pid = service.process.pid
    grew = 0.0
    for through in (False, True):
        made = direct.post("/pty", json={"command": "sh", "args": ["-c", "read go; " + script]})
        with pty_to(service, session, made.json()["id"], through) as pty:
            if through:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again here
                before = peak_rss(pid)
            pty.send("\r")
            seconds, size = printed(pty)
            took.append(seconds)
            if through:
                grew = (peak_rss(pid) - before) / MiB
    print(
        f"(c) a terminal printing {size / MiB:.0f} MiB: direct {took[0]:.2f} s, through "
        f"codestation {took[1]:.2f} s; the service's peak memory rose {grew:.1f} MiB",
        flush=True,
    )
    return {
        "big terminal output ratio": round(took[1] / took[0], 2),
        "big terminal output, service peak growth MiB": round(grew, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--echoes", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=30, help="What the terminal prints.")
    parser.add_argument("--runtime", choices=["docker", "bwrap"], default="bwrap")
    parser.add_argument("--json", type=Path, help="Also write the figures here, as JSON.")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    with served("streams-", args.runtime) as service, service.client() as client:
        workspace = project(service.tmp)
        session = client.start(str(workspace))
        line = b"x" * 99 + b"\n"
        (workspace / "big.txt").write_bytes(line * (args.megabytes * 10**6 // len(line)))
        direct = clients(service, session)[0]
        with direct:
            later = events(service, session, direct, args.events)
            ms = statistics.median(later) * 1000
            print(
                f"(a) {len(later)} events: through codestation p50 {ms:.2f} ms, "
                f"p95 {p95(later) * 1000:.2f} ms after the direct subscriber",
                flush=True,
            )
            figures["SSE event added delay p50 ms"] = round(ms, 2)
            straight, through = echoes(service, session, direct, args.echoes)
            d50, t50 = statistics.median(straight) * 1000, statistics.median(through) * 1000
            print(
                f"(b) WebSocket echo: direct p50 {d50:.2f} ms p95 {p95(straight) * 1000:.2f}; "
                f"through codestation p50 {t50:.2f} ms p95 {p95(through) * 1000:.2f}; "
                f"+{t50 - d50:.2f} ms",
                flush=True,
            )
            figures["WebSocket echo added p50 ms"] = round(t50 - d50, 2)
            figures |= big_output(service, session, direct, args.megabytes)
        client.delete(session.id)
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
