"""What Prometheus scrapes at `GET /metrics`, in its text format (`prometheus_client`).

What happens is counted where it happens: starts (a histogram of their durations, by runtime
and cold or pool), start failures by reason (the error's code), culls by reason, requests and
bytes through the per-session proxy. What *is* (sessions by status and runtime, the pool,
capacity, open terminals and event streams) is read at each scrape from `Now`, a function the
app gives, so it cannot drift from the truth.

Each service has a registry of its own, not the library's global one: two apps in one process
(the tests) never count into each other. Labels take only bounded sets of values: never a
session id, a user or a path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a warm start's tenths, a cold one's seconds, an image build's minutes.
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300)


@dataclass
class Now:
    """What is, at one scrape."""

    sessions: dict[tuple[str, str], int]  # (status, runtime): how many
    pool_ready: int
    max_sessions: int
    memory_reserved: int
    memory_budget: int
    terminals: int
    event_streams: int


class Metrics:
    def __init__(self) -> None:
        # Not described by collecting: `now` may not answer before the service has started.
        self.registry = CollectorRegistry(auto_describe=False)
        self.starts = Histogram(
            "codestation_session_start_seconds",
            "From the start's request to OpenCode answering, of sessions that came up.",
            ["runtime", "started_from"],
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.start_failures = Counter(
            "codestation_session_start_failures",
            "Starts that failed, by the error's code (start_timeout, agent_exited, ...).",
            ["runtime", "reason"],
            registry=self.registry,
        )
        self.culls = Counter(
            "codestation_session_culls",
            "Sessions stopped for being idle or too old.",
            ["reason"],
            registry=self.registry,
        )
        self.proxy_requests = Counter(
            "codestation_proxy_requests",
            "Requests to sessions' OpenCode through the proxy (a WebSocket counts once).",
            ["kind"],
            registry=self.registry,
        )
        self.proxy_bytes = Counter(
            "codestation_proxy_bytes",
            "Bytes through the proxy: answers' bodies and WebSocket frames, each way.",
            ["direction"],
            registry=self.registry,
        )
        # Each label's child, looked up once: the proxy counts every chunk.
        self.http_requests = self.proxy_requests.labels("http")
        self.websockets = self.proxy_requests.labels("websocket")
        self.to_agent = self.proxy_bytes.labels("to_agent")
        self.from_agent = self.proxy_bytes.labels("from_agent")

    def watch(self, now: Callable[[], Now]) -> None:
        """Read what is from `now()` at each scrape."""
        self.registry.register(_Present(now))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Present(Collector):
    def __init__(self, now: Callable[[], Now]) -> None:
        self.now = now

    def collect(self) -> Iterator[Metric]:
        now = self.now()
        sessions = GaugeMetricFamily(
            "codestation_sessions", "Sessions by status and runtime.", labels=["status", "runtime"]
        )
        for (status, runtime), count in sorted(now.sessions.items()):
            sessions.add_metric([status, runtime], count)
        yield sessions
        yield GaugeMetricFamily(
            "codestation_pool_ready", "Sandboxes started ahead of need, waiting.", now.pool_ready
        )
        yield GaugeMetricFamily(
            "codestation_live_sessions_max", "The most live sessions admitted (max_live_sessions).",
            now.max_sessions,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "codestation_memory_reserved_bytes", "Memory live sessions reserve, together.",
            now.memory_reserved,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "codestation_memory_budget_bytes", "The most memory live sessions may reserve.",
            now.memory_budget,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "codestation_terminals_open", "Browser terminals attached now.", now.terminals
        )
        yield GaugeMetricFamily(
            "codestation_event_streams_open", "Event streams and followed logs open now.",
            now.event_streams,
        )  # fmt: skip
