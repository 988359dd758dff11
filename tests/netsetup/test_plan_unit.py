"""Unit tests of the backend-independent plan: validation, interfaces, the rule layout."""

from __future__ import annotations

import pytest
from netsetup_fakes import FACTS, FULL

from netsetup.backends.iptables import rule_args
from netsetup.backends.nft import render_script
from netsetup.plan import RedirectPlan, Rule, chain_layout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proxy_port": 0}, "proxy port"),
        ({"ports": (25, 25)}, "twice"),
        ({"ports": ()}, "at least one"),
        ({"families": (5,)}, "families"),
        ({"interfaces": ("a very long interface",)}, "interface name"),
        ({"local": True}, "uid"),
    ],
)
def test_plan_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RedirectPlan(**{"proxy_port": 10025, **kwargs})


def test_chain_names_carry_the_proxy_port():
    assert FULL.owned_chains == ("CLAMSMTP-10026", "CLAMSMTP-10026-LOCAL")
    assert FULL.hooks() == (("PREROUTING", "CLAMSMTP-10026"), ("OUTPUT", "CLAMSMTP-10026-LOCAL"))


def test_layout_order_exemptions_local_then_redirects():
    (hook, chain, rules), (local_hook, local_chain, local_rules) = chain_layout(FULL, 4)
    assert (hook, chain, local_hook, local_chain) == (
        "PREROUTING",
        "CLAMSMTP-10026",
        "OUTPUT",
        "CLAMSMTP-10026-LOCAL",
    )
    assert [rule_args(r) for r in rules] == [
        "-s 203.0.113.0/24 -j RETURN",
        "-d 198.51.100.25/32 -j RETURN",
        "-m addrtype --dst-type LOCAL -j RETURN",
        "-i lan0 -p tcp -m tcp --dport 25 -j REDIRECT --to-ports 10026",
        "-i lan0 -p tcp -m tcp --dport 587 -j REDIRECT --to-ports 10026",
        "-i dmz0 -p tcp -m tcp --dport 25 -j REDIRECT --to-ports 10026",
        "-i dmz0 -p tcp -m tcp --dport 587 -j REDIRECT --to-ports 10026",
    ]
    assert local_rules[0] == Rule("RETURN", uid_owner=105)  # the daemon's own mail leaves


# -- interfaces -----------------------------------------------------------------------------


def test_default_interfaces_skip_loopback_uplinks_and_bridge_ports():
    assert FACTS.default_interfaces() == ("lan0", "br0")
    assert FACTS.uplinks() == ("wan0",)


@pytest.mark.parametrize(
    "name", ['x";redirect#+', "lan0;", "lan 0", "a#", "+x", "++", "", "a" * 16, "lan0\n", "é0"]
)
def test_plan_rejects_unsafe_interface_names(name):
    with pytest.raises(ValueError, match="invalid interface name"):
        RedirectPlan(proxy_port=10025, interfaces=(name,))


def test_plan_accepts_interface_names_and_wildcards():
    names = ("lan0", "eth+", "+", "br-lan.10", "wg_0@x", "a" * 15, "a" * 14 + "+")
    assert RedirectPlan(proxy_port=10025, interfaces=names).interfaces == names


def test_bare_plus_matches_every_interface():
    script = render_script(RedirectPlan(proxy_port=10025, interfaces=("+",)))
    assert "\t\ttcp dport 25 counter redirect to :10025\n" in script
    assert "iifname" not in script
    # iptables-legacy-save prints "-i +" as nothing: status compares with that
    assert rule_args(Rule("REDIRECT", in_interface="+", protocol="tcp", dport=25, to_port=1)) == (
        "-p tcp -m tcp --dport 25 -j REDIRECT --to-ports 1"
    )
