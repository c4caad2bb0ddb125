"""What a sandbox may reach over the network, and the firewall rules that say so.

Each environment sets `network`:

- `none`: nothing at all. Only codestation's own connection in, to OpenCode, works.
- `egress` (the default): the outside world, but never this host (none of its addresses), other
  sessions, link-local addresses (a cloud's metadata service) or private ranges, except the
  environment's `allow` list and the host's DNS resolvers (port 53 only).
- `full`: whatever the host can reach, the host itself included. Unsafe: an agent can then
  reach codestation's API, other sessions' ports and every service on the host's loopback.

The runtimes enforce it with the iptables rules written here: Docker on the host, for the
bridge its sessions sit on (with the host's INPUT chain keeping the host itself out), and
bubblewrap inside the sandbox's own network namespace, where the agent, which has no
capabilities, cannot change them. Both need root; a service that is not root can only run
`full` sessions, and says so.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from codestation.errors import StartFailed

Policy = Literal["none", "egress", "full"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Never reachable under `egress` but through `allow`: private and shared ranges, link-local
# (metadata services live there), loopback and "this network", multicast.
BLOCKED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48",
        "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
    )
)  # fmt: skip


def resolvers(path: Path = Path("/etc/resolv.conf")) -> list[Address]:
    """The DNS servers the host uses (its resolv.conf's `nameserver` lines)."""
    found = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(ipaddress.ip_address(parts[1].split("%")[0]))
            except ValueError:
                continue
    return found


def host_addresses() -> list[Address]:
    """Every address this host holds, on any interface: all of them lead to the host itself."""
    ip = shutil.which("ip")
    if ip is None:
        raise StartFailed("`ip` (iproute2) is needed to keep sandboxes off the host; install it.")
    shown = subprocess.run([ip, "-j", "addr", "show"], capture_output=True, text=True, check=True)
    return [
        ipaddress.ip_address(entry["local"])
        for link in json.loads(shown.stdout)
        for entry in link.get("addr_info", [])
        if "local" in entry
    ]


def rules(
    chain: str,
    policy: Policy,
    allow: Iterable[Network],
    *,
    version: Literal[4, 6],
    also_blocked: Iterable[Address] = (),
    passed: str = "RETURN",
    udp_to_resolvers_only: bool = False,
) -> list[str]:
    """iptables-restore lines that fill `chain` for `policy`: what may go on jumps to
    `passed` (or falls off the end), the rest is refused at once (TCP reset, else ICMP).
    `also_blocked`: the host's own addresses, refused even if `allow` names them.
    `udp_to_resolvers_only`: UDP may go to the DNS resolvers alone (pasta binds a host port
    for each UDP flow, which would let an agent hold the host's UDP ports)."""
    lines = [f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j {passed}"]
    if policy == "full":
        return lines
    reset = "--reject-with tcp-reset"
    if policy == "none":
        return [*lines, f"-A {chain} -p tcp -j REJECT {reset}", f"-A {chain} -j REJECT"]
    # A published port reached by its DNAT rule is another session (or the host): refused.
    lines.append(f"-A {chain} -m conntrack --ctstate DNAT -j REJECT")
    for server in resolvers():
        if server.version == version:
            for proto in ("udp", "tcp"):
                lines.append(f"-A {chain} -d {server} -p {proto} --dport 53 -j {passed}")
    hosts = [ipaddress.ip_network(a) for a in also_blocked]
    for net in hosts:  # before `allow`: no allow list opens the host itself
        if net.version == version:
            lines.append(f"-A {chain} -d {net} -p tcp -j REJECT {reset}")
            lines.append(f"-A {chain} -d {net} -j REJECT")
    for net in allow:
        if net.version == version:
            lines.append(f"-A {chain} -d {net} -j {passed}")
    for net in BLOCKED:
        if net.version == version:
            lines.append(f"-A {chain} -d {net} -p tcp -j REJECT {reset}")
            lines.append(f"-A {chain} -d {net} -j REJECT")
    if udp_to_resolvers_only:
        lines.append(f"-A {chain} -p udp -j REJECT")
    return lines


def restore(table: Sequence[str], *, version: Literal[4, 6], netns_pid: int | None = None) -> None:
    """Load `table` (iptables-restore text, `*filter` to `COMMIT`) without flushing what it does
    not name; into the network namespace of `netns_pid` if given."""
    tool = shutil.which("iptables-restore" if version == 4 else "ip6tables-restore")
    if tool is None:
        raise StartFailed(
            "iptables is needed to keep sandboxes off the host and other sessions; install it "
            "(`sudo apt-get install iptables`), or set the environment's network to full (unsafe)."
        )
    argv = [tool, "-w", "--noflush"]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *argv]
    done = subprocess.run(
        argv, input="\n".join(table) + "\n", capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise StartFailed(
            f"the sandbox's network rules could not be set ({done.stderr.strip()}); codestation "
            "must run as root for network none or egress, or set the environment's network to "
            "full (unsafe)."
        )
