"""The sandbox image Docker sessions run: built from `sandbox/Dockerfile` and the pinned OpenCode.

Its tag carries a hash of every input of the build (the Dockerfile, the base image's name, the
OpenCode version and the binary's content), so an image is built once and rebuilt only when an
input changes. Its base is `sandbox_base_image` when that
can be had; where no registry answers (air-gapped sites, these CI machines), a Debian base is
made from the apt mirror with debootstrap and imported instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import docker
import docker.errors

from codestation.agent import opencode_binary
from codestation.config import Settings
from codestation.errors import ImageBuildFailed

REPOSITORY = "codestation-sandbox"
FALLBACK_BASE = "codestation-base:bookworm"
SUITE = "bookworm"

Report = Callable[[str], None]

_build_lock = threading.Lock()


def dockerfile() -> bytes:
    return resources.files("codestation").joinpath("sandbox/Dockerfile").read_bytes()


def image_tag(settings: Settings) -> str:
    """The tag of the sandbox image these settings make. Installs OpenCode if it is missing:
    its content is an input."""
    inputs = [
        dockerfile(),
        settings.sandbox_base_image.encode(),
        settings.opencode_version.encode(),
        _file_digest(opencode_binary(settings)).encode(),
    ]
    digest = hashlib.sha256(b"\0".join(inputs)).hexdigest()
    return f"{REPOSITORY}:{settings.opencode_version}-{digest[:12]}"


def _file_digest(path: Path) -> str:
    """SHA-256 of the file, computed once per version of it (the binary is about 150 MB)."""
    stat = path.stat()
    return _digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.cache
def _digest_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_image(client: docker.DockerClient, settings: Settings, report: Report) -> str:
    """The sandbox image's tag, building it (and its base) first if it is missing."""
    tag = image_tag(settings)
    with _build_lock:
        if _exists(client, tag):
            return tag
        report("installing OpenCode")
        binary = opencode_binary(settings)
        base = _ensure_base(client, settings, report)
        report(f"building {tag} on {base}")
        with tempfile.TemporaryDirectory(prefix="codestation-build-") as context:
            Path(context, "Dockerfile").write_bytes(dockerfile())
            copy = Path(context, "opencode")
            try:
                os.link(binary, copy)
            except OSError:  # another file system
                shutil.copy2(binary, copy)
            copy.chmod(0o755)
            _build(client, context, tag, base, report)
        report(f"built {tag}")
        return tag


def _build(client: docker.DockerClient, context: str, tag: str, base: str, report: Report) -> None:
    stream: Any = client.api.build(
        path=context, tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True, decode=True,
        labels={"org.codestation.sandbox": "true"},
    )  # fmt: skip
    for chunk in stream:
        if "error" in chunk:
            raise ImageBuildFailed(f"building the sandbox image failed: {chunk['error'].strip()}")
        line = str(chunk.get("stream", "")).strip()
        if line:
            report(line)
    if not _exists(client, tag):
        raise ImageBuildFailed(f"the build of {tag} ended without an image; see the lines above.")


def _ensure_base(client: docker.DockerClient, settings: Settings, report: Report) -> str:
    ref = settings.sandbox_base_image
    if _exists(client, ref):
        return ref
    try:
        report(f"pulling {ref}")
        client.images.pull(ref)
        return ref
    except docker.errors.APIError as exc:
        report(f"cannot pull {ref} ({exc.explanation or exc}); building a base with debootstrap")
    if _exists(client, FALLBACK_BASE):
        return FALLBACK_BASE
    _debootstrap_base(client, settings, report)
    return FALLBACK_BASE


def apt_mirror() -> str | None:
    """The Debian mirror apt on this host uses, if it uses one."""
    pattern = re.compile(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+/debian)/?\s*", re.M)
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for file in files:
        try:
            match = pattern.search(file.read_text())
        except OSError:
            continue
        if match:
            return match.group(1)
    return None


def _debootstrap_base(client: docker.DockerClient, settings: Settings, report: Report) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise ImageBuildFailed(
            f"{settings.sandbox_base_image} cannot be pulled and the fallback needs debootstrap "
            "run as root; install debootstrap and run `codestation image build` as root once, "
            "or set sandbox_base_image to an image you can pull."
        )
    mirror = settings.debian_mirror or apt_mirror()
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.cache_dir, prefix=".base-") as tmp:
        rootfs = Path(tmp, "rootfs")
        report(f"debootstrap {SUITE} from {mirror or 'its default mirror'}")
        argv = [debootstrap, "--variant=minbase", SUITE, str(rootfs)]
        result = subprocess.run(
            [*argv, mirror] if mirror else argv, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ImageBuildFailed(
                f"debootstrap failed; check that the Debian mirror is reachable: "
                f"{(result.stdout + result.stderr).strip()[-800:]}"
            )
        tarball = Path(tmp, "rootfs.tar")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        report(f"importing {FALLBACK_BASE}")
        repository, tag = FALLBACK_BASE.split(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
