"""What makes a pool member fit a start: its key and its fingerprint."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from codestation.config import EnvironmentProfile
from codestation.pool import fingerprint
from codestation.ports import PortAllocator
from codestation.store import Store


def test_a_fingerprint_changes_with_the_profile_and_the_secrets_values() -> None:
    profile = EnvironmentProfile(secrets={"API_KEY": {"env": "X"}})
    first = fingerprint(profile, {"API_KEY": SecretStr("one")})
    assert fingerprint(profile, {"API_KEY": SecretStr("one")}) == first
    assert fingerprint(profile, {"API_KEY": SecretStr("two")}) != first
    assert (
        fingerprint(profile.model_copy(update={"model": "a/b"}), {"API_KEY": SecretStr("one")})
        != first
    )
    assert "one" not in first


def test_a_reserved_port_is_offered_to_no_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    ports = PortAllocator(store, 39100, 39102, "127.0.0.1")
    assert list(ports.candidates()) == [39100, 39101, 39102]
    ports.reserve(39100)
    assert list(ports.candidates()) == [39101, 39102]
    ports.release(39100)
    assert list(ports.candidates()) == [39100, 39101, 39102]
    store.close()
