"""Where sessions run. `base.py` is the contract; each other module is one engine."""

from __future__ import annotations

from codestation.config import Settings
from codestation.errors import RuntimeUnavailable
from codestation.runtimes.base import Exit, LaunchSpec, Runtime, State
from codestation.runtimes.bwrap import BwrapRuntime
from codestation.runtimes.docker import DockerRuntime
from codestation.runtimes.kubernetes import KubernetesRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    "docker": DockerRuntime,
    "bwrap": BwrapRuntime,
    "kubernetes": KubernetesRuntime,
}


def make_runtimes(settings: Settings) -> dict[str, Runtime]:
    """One of each that may run sessions here; they connect to nothing until used. Kubernetes
    only where the settings name it (for the service or an environment): a service that does
    not use a cluster must never touch one, such as the one a user's ~/.kube/config names."""
    wanted = {settings.runtime, *(p.runtime for p in settings.environments.values())}
    return {
        name: cls(settings)
        for name, cls in RUNTIMES.items()
        if name != "kubernetes" or "kubernetes" in wanted
    }


async def choose_runtime(settings: Settings, runtimes: dict[str, Runtime]) -> str:
    """The runtime sessions use unless their environment names one.

    `auto` takes Docker when an engine answers, else bubblewrap when it can make a sandbox.
    """
    if settings.runtime != "auto":
        await runtimes[settings.runtime].check()
        return settings.runtime
    reasons = []
    for name in ("docker", "bwrap"):
        try:
            await runtimes[name].check()
        except RuntimeUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            continue
        return name
    raise RuntimeUnavailable(
        "no runtime can run sessions here. Either start a Docker engine or install bubblewrap "
        "(`sudo apt-get install bubblewrap`). " + " ".join(reasons)
    )


__all__ = ["RUNTIMES", "Exit", "LaunchSpec", "Runtime", "State", "choose_runtime", "make_runtimes"]
