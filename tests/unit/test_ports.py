import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codestation.errors import NoFreePort
from codestation.ports import PortAllocator, port_is_free
from codestation.sessions import Session, Status
from codestation.store import Store
from tests.unit.factories import make_session


def free_block(size: int) -> int:
    """The first port of `size` consecutive ports nobody holds now."""
    for start in range(41000, 60000, size):
        if all(port_is_free("127.0.0.1", p) for p in range(start, start + size)):
            return start
    raise RuntimeError("no free block")


def factory(port: int) -> Session:
    return make_session(port)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "codestation.db")
    yield s
    s.close()


def test_leases_the_lowest_free_port_and_never_the_same_one_twice(store: Store) -> None:
    start = free_block(3)
    ports = PortAllocator(store, start, start + 2, "127.0.0.1")
    assert [ports.lease(factory).port for _ in range(3)] == [start, start + 1, start + 2]
    with pytest.raises(NoFreePort, match="widen"):
        ports.lease(factory)


def test_a_port_another_process_listens_on_is_skipped(store: Store) -> None:
    start = free_block(2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", start))
        held.listen()
        assert not port_is_free("127.0.0.1", start)
        assert PortAllocator(store, start, start + 1, "127.0.0.1").lease(factory).port == start + 1


def test_a_port_bound_on_all_addresses_is_skipped(store: Store) -> None:
    start = free_block(2)
    with socket.socket() as held:
        held.bind(("0.0.0.0", start))  # bound, not listening: still unusable
        assert PortAllocator(store, start, start + 1, "127.0.0.1").lease(factory).port == start + 1


def test_a_released_port_is_leased_again(store: Store) -> None:
    start = free_block(1)
    ports = PortAllocator(store, start, start, "127.0.0.1")
    s = ports.lease(factory)
    store.save(s.advance(Status.FAILED, error="x"))
    assert ports.lease(factory).port == start


def test_concurrent_leases_get_distinct_ports(tmp_path: Path) -> None:
    start = free_block(20)
    path = tmp_path / "shared.db"
    results: list[int] = []
    errors: list[Exception] = []

    def lease() -> None:
        # Each thread has its own connection, as separate processes would.
        ports = PortAllocator(Store(path), start, start + 19, "127.0.0.1")
        try:
            results.append(ports.lease(factory).port)
        except Exception as exc:
            errors.append(exc)

    Store(path).close()
    threads = [threading.Thread(target=lease) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(start, start + 20))
