"""Host ports for sessions, leased from a configured range.

A port is offered only when no live session leases it and the host lets us bind it right now
(a bind, not a connect: a connect says nothing about a process that listens on another address
or does not accept). The lease itself is a row in the store, whose uniqueness rule settles
races between concurrent starts; the bind test only keeps us off ports foreign processes hold.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator

from codestation.errors import NoFreePort
from codestation.sessions import Session
from codestation.store import PortTaken, Quota, Store


def port_is_free(address: str, port: int) -> bool:
    """Whether a process could listen on `address:port` now."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As a server would: connections lingering in TIME_WAIT after a session stopped do
        # not keep its port from the next one; a listener or a plain bind does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


class PortAllocator:
    def __init__(self, store: Store, start: int, end: int, address: str) -> None:
        self.store = store
        self.start = start
        self.end = end
        self.address = address
        self._reserved: set[int] = set()  # held by the warm pool, which is not in the store

    def reserve(self, port: int) -> None:
        """Keep `port` from every lease until `release`d (a sandbox started ahead holds it)."""
        self._reserved.add(port)

    def release(self, port: int) -> None:
        self._reserved.discard(port)

    def candidates(self) -> Iterator[int]:
        taken = self.store.leased_ports().keys() | self._reserved
        for port in range(self.start, self.end + 1):
            if port not in taken and port_is_free(self.address, port):
                yield port

    def lease(self, make_session: Callable[[int], Session], quota: Quota | None = None) -> Session:
        """Record `make_session(port)` in the store with the first port that can be had
        (LimitReached or Full if it does not fit in `quota`)."""
        for port in self.candidates():
            session = make_session(port)
            try:
                self.store.create(session, quota)
            except PortTaken:
                continue
            return session
        raise NoFreePort(
            f"every port in {self.start}-{self.end} is leased or in use; stop a session "
            "(POST /api/v1/code/session/<id>/stop) or widen port_range_start/port_range_end."
        )
