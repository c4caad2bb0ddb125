"""The firewall rules a network policy makes (the e2e tests try them from inside sandboxes)."""

from __future__ import annotations

import ipaddress

from codestation.network import rules


def positions(lines: list[str], needle: str) -> list[int]:
    return [i for i, line in enumerate(lines) if needle in line]


def test_egress_refuses_the_host_before_any_allow_list() -> None:
    made = rules(
        "OUT", "egress", [ipaddress.ip_network("10.0.0.0/8")], version=4,
        also_blocked=[ipaddress.ip_address("10.1.2.3")], passed="ACCEPT",
    )  # fmt: skip
    host, allowed = positions(made, "-d 10.1.2.3/32"), positions(made, "-d 10.0.0.0/8 -j ACCEPT")
    assert host
    assert allowed
    assert max(host) < min(allowed)
    assert made[0].endswith("--ctstate RELATED,ESTABLISHED -j ACCEPT")


def test_egress_lets_udp_reach_only_the_resolvers_when_asked() -> None:
    made = rules("OUT", "egress", [], version=4, udp_to_resolvers_only=True)
    assert made[-1] == "-A OUT -p udp -j REJECT"
    assert "-A OUT -p udp -j REJECT" not in rules("OUT", "egress", [], version=4)


def test_ipv6_refuses_nat64_6to4_and_mapped_addresses() -> None:
    made = "\n".join(rules("OUT", "egress", [], version=6))
    for net in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::ffff:0:0/96", "fe80::/10"):
        assert f"-d {net} -j REJECT" in made, net


def test_none_refuses_everything_new_and_full_nothing() -> None:
    assert rules("OUT", "none", [], version=4)[1:] == [
        "-A OUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUT -j REJECT",
    ]
    assert len(rules("OUT", "full", [], version=4)) == 1
