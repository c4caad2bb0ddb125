"""A Pod's port as a port on this host, through the API server's port-forward: how a
codestation that cannot route to Pod IPs (it runs beside the cluster, not in it nor on a
node) reaches its sessions' OpenCode.

Each Pod forwarded gets a listener on this host's loopback. Each connection to it is one
WebSocket to the Pod's `portforward` subresource, protocol v4.channel.k8s.io: every message
begins with its channel (0 the stream's bytes, 1 the API server's errors), and each channel's
first message begins with the port, two bytes. So the proxy, terminals and prompts reach
OpenCode at an address as they do for any other runtime.

The protocol has no half-close: a connection ends, both ways, once either side ends it.
Another user of this machine can connect to such a listener as to a Docker session's
published port; OpenCode behind it asks for the session's password all the same, and a
listener takes at most MAX_CONNECTIONS at once, each a WebSocket to the API server.
A Pod's listener, once closed, is never made again in this process (session ids are not
reused): a late caller gets an address that refuses, not a listener no one would close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import should_bypass_proxies
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
OPEN_TIMEOUT = 10.0
CHUNK = 64 * 1024
# Connections through one Pod's listener at once: the proxy's pool and a few terminals.
MAX_CONNECTIONS = 64
# Where a Pod whose listener was closed is "reached": nothing listens on port 0.
CLOSED = ("127.0.0.1", 0)


class PortForwards:
    """One loopback listener per Pod forwarded, to `port` of that Pod in `namespace`."""

    def __init__(
        self,
        configuration: Callable[[], k8s.Configuration],
        namespace: str,
        port: int,
        threads: concurrent.futures.Executor,
    ) -> None:
        self._configuration = configuration  # the client's, made on first use
        self.namespace = namespace
        self.port = port
        self._threads = threads
        self._listeners: dict[str, _Listener] = {}
        self._closed: set[str] = set()

    def address(self, pod: str) -> tuple[str, int]:
        """Where this host reaches `pod`'s port: a listener made on first asking. Called on
        the service's event loop, which serves it."""
        if pod in self._closed:
            return CLOSED
        listener = self._listeners.get(pod)
        if listener is None:
            listener = self._listeners[pod] = _Listener(pod, self._open)
        return listener.address

    async def close(self, pod: str) -> None:
        """The Pod's listener and every connection through it ended, for good."""
        self._closed.add(pod)
        listener = self._listeners.pop(pod, None)
        if listener is not None:
            await listener.close()

    async def close_all(self) -> None:
        for pod in list(self._listeners):
            await self.close(pod)

    async def _open(self, pod: str) -> ClientConnection:
        loop = asyncio.get_running_loop()
        # The client is made, and credentials read, for each connection off the loop: a
        # service account's token is rotated, an exec plugin (a cloud's login) may run.
        configuration = await loop.run_in_executor(self._threads, self._configuration)
        headers = await loop.run_in_executor(self._threads, _auth_headers, configuration)
        host: str = configuration.host
        base = host.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        options: dict[str, Any] = {}
        if base.startswith("wss://"):
            options["ssl"] = _tls(configuration)
            if configuration.tls_server_name:
                options["server_hostname"] = configuration.tls_server_name
        # The client's proxy as its own calls use it (it read HTTPS_PROXY and NO_PROXY).
        proxy = configuration.proxy
        if proxy and should_bypass_proxies(host, configuration.no_proxy or ""):
            proxy = None
        upstream = await connect(
            f"{base}/api/v1/namespaces/{self.namespace}/pods/{pod}/portforward?ports={self.port}",
            subprotocols=[PROTOCOL],  # type: ignore[list-item]
            additional_headers=headers,
            proxy=proxy or None,
            open_timeout=OPEN_TIMEOUT,
            max_size=None,  # the kubelet's frames are bounded by its own buffer
            max_queue=4,  # a slow reader holds back the Pod, not this process's memory
            compression=None,
            # No keepalive pings: OpenCode whose output waits on a slow reader is behind them
            # (see agent.websocket), and the kubelet ends idle streams after hours itself.
            ping_interval=None,
            **options,
        )
        # ... but a path to the API server that died silently is noticed, in minutes.
        raw = upstream.transport.get_extra_info("socket")
        if raw is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
                if hasattr(socket, option):
                    raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        return upstream


class _Listener:
    def __init__(self, pod: str, open_: Callable[[str], Awaitable[ClientConnection]]) -> None:
        self.pod = pod
        self._open = open_
        loop = asyncio.get_running_loop()  # before the socket: no loop, no listener
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._sock.setblocking(False)
        host, port = self._sock.getsockname()[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False
        # Connections made before the server runs wait in the socket's backlog.
        self._serving = loop.create_task(self._serve())

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._connected, sock=self._sock)
        async with server:
            await server.serve_forever()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if self._closed or len(self._connections) >= MAX_CONNECTIONS:
                return
            self._connections.add(task)
            try:
                upstream = await self._open(self.pod)
            except Exception as exc:  # refused, unreachable, misconfigured: never the loop's
                log.warning("port-forward to Pod %s: cannot connect: %s", self.pod, exc)
                return
            async with upstream:
                await _pump(self.pod, reader, writer, upstream)
        except (OSError, ConnectionClosed):
            pass  # either side went away: the connection ends, as any would
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        self._closed = True
        self._serving.cancel()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(self._serving, *self._connections, return_exceptions=True)
        self._sock.close()  # the server's, or never served


async def _pump(
    pod: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: ClientConnection
) -> None:
    """Bytes both ways until either side ends."""

    async def to_pod() -> None:
        while data := await reader.read(CHUNK):
            await upstream.send(bytes([DATA]) + data)

    async def from_pod() -> None:
        ported: set[int] = set()
        async for message in upstream:
            frame = message.encode() if isinstance(message, str) else message
            if not frame:
                continue
            channel, payload = frame[0], frame[1:]
            if channel not in ported:
                ported.add(channel)
                payload = payload[2:]
            if channel == DATA and payload:
                writer.write(payload)
                await writer.drain()
            elif channel == ERROR and payload:
                # e.g. nothing listens on the port yet: the connection fails, as a refused one
                log.debug("port-forward to Pod %s: %s", pod, payload.decode(errors="replace"))
                return

    tasks = [asyncio.ensure_future(to_pod()), asyncio.ensure_future(from_pod())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _auth_headers(configuration: k8s.Configuration) -> dict[str, str]:
    """The client's credentials that go in headers (a bearer token, refreshed if due)."""
    settings: dict[str, Any] = dict(configuration.auth_settings())
    return {
        str(auth["key"]): str(auth["value"])
        for auth in settings.values()
        if auth.get("in") == "header" and auth.get("value")
    }


def _tls(configuration: k8s.Configuration) -> ssl.SSLContext:
    """The client's TLS settings: its CA, its client certificate, whether it verifies."""
    context = ssl.create_default_context(
        cafile=configuration.ssl_ca_cert, cadata=configuration.ca_cert_data
    )
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if configuration.assert_hostname is False:
        context.check_hostname = False
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
