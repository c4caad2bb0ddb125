"""Where sessions run. `base.py` is the contract; each other module is one engine."""

from __future__ import annotations

from codestation.config import Settings
from codestation.runtimes.base import Exit, LaunchSpec, Runtime, State


def make_runtime(settings: Settings) -> Runtime:
    from codestation.runtimes.docker import DockerRuntime

    return DockerRuntime(settings)


__all__ = ["Exit", "LaunchSpec", "Runtime", "State", "make_runtime"]
