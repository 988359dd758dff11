"""The nft backend against the real kernel, in throwaway network namespaces (root only).

Like test_netns.py, but the rules are nftables ones written with ``nft -f -``: every test reads
the whole ruleset back with ``nft list ruleset`` inside the namespace and compares it as text.
The end-to-end tests send a TCP connection client -> gateway -> server and check, with
SO_ORIGINAL_DST in a listener on the gateway, that it was redirected.
"""

from __future__ import annotations

import re
import shutil

import pytest
import test_netns
from test_netns import FULL, PROXY_PORT, connect, netsetup, ok
from test_netns import ruleset as legacy_ruleset

from lab import nslab
from netsetup.backends.nft import render_script
from netsetup.plan import RedirectPlan

TABLE = f"clamsmtp-{PROXY_PORT}"


REASON = nslab.unavailable_reason(("nft", "apt package nftables"))
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(REASON is not None, reason=f"nft namespace tests: {REASON}"),
]


def nft_ruleset(ns: str) -> str:
    return nslab.run_in(ns, ["nft", "list", "ruleset"], check=True).stdout


def nft(ns: str, script: str) -> None:
    nslab.run_in(ns, ["nft", "-f", "-"], input=script, check=True)


def legacy_tables(ns: str) -> str:
    names = "/proc/net/ip_tables_names /proc/net/ip6_tables_names"
    return nslab.run_in(ns, ["sh", "-c", f"cat {names} 2>/dev/null"]).stdout.strip()


FOREIGN = """
table inet fw {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 22 counter accept
    }
}
table ip nat {
    chain POSTROUTING {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" counter masquerade
    }
    chain PREROUTING {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan0" tcp dport 2525 counter redirect to :25
    }
}
"""


@pytest.fixture
def router():
    """lan0 (no default route) and wan0 (default routes), with foreign nftables rules."""
    with nslab.router_namespace("csn") as ns:
        nft(ns, FOREIGN)
        yield ns


@pytest.fixture
def lab():
    with nslab.gateway_lab("csn") as lab:
        yield lab


listener = test_netns.listener  # the same fixture; it starts the listener in this module's lab


def test_nft_enable_twice_status_and_disable_restores_the_exact_ruleset(router):
    ok(netsetup(router, "enable", "--backend", "nft", "--proxy-port", "10026"))  # other instance
    before = nft_ruleset(router)

    result = ok(netsetup(router, "enable", "--backend", "nft", *FULL))
    assert "backend:     nft (nftables through the nft command)" in result.stdout
    once = nft_ruleset(router)
    assert once.startswith(before.rstrip("\n"))  # everything else kept as it was
    ours = nslab.run_in(router, ["nft", "list", "table", "inet", TABLE], check=True).stdout
    for line in (
        "meta skuid 0 counter packets 0 bytes 0 return",
        "ip saddr 203.0.113.0/24 counter packets 0 bytes 0 return",
        "ip6 daddr 2001:db8:ff::/48 counter packets 0 bytes 0 return",
        "fib daddr type local counter packets 0 bytes 0 return",
        f'iifname "lan0" tcp dport 587 counter packets 0 bytes 0 redirect to :{PROXY_PORT}',
        f"tcp dport 25 counter packets 0 bytes 0 redirect to :{PROXY_PORT}",
    ):
        assert line in ours, ours
    ok(netsetup(router, "enable", "--backend", "nft", *FULL))
    assert nft_ruleset(router) == once

    status = ok(netsetup(router, "status", *FULL)).stdout  # auto finds our table
    assert "chosen by auto: our table already exists in nftables" in status
    assert f"nftables table inet {TABLE} (nft list table inet {TABLE}): installed\n" in status
    assert re.search(r"\n\s+0\s+0    meta skuid 0 counter return\n", status), status
    assert "other clamsmtp-netsetup tables here: inet clamsmtp-10026" in status
    drifted = ok(netsetup(router, "status")).stdout  # without --local: not what is installed
    assert "installed, NOT as planned" in drifted
    assert "chain output is installed but not in the plan" in drifted

    ok(netsetup(router, "disable"))
    assert nft_ruleset(router) == before  # foreign tables and the 10026 instance intact
    assert "nothing to remove" in ok(netsetup(router, "disable", "--backend", "nft")).stdout
    assert nft_ruleset(router) == before
    assert legacy_tables(router) == ""  # nothing written to legacy xtables


def test_nft_is_chosen_by_auto_on_an_nftables_host(router):
    before = nft_ruleset(router)
    result = ok(netsetup(router, "enable"))
    assert "chosen by auto: the host's rules are in nftables" in result.stdout
    assert f"table inet {TABLE} {{" in nft_ruleset(router)
    ok(netsetup(router, "disable"))
    assert nft_ruleset(router) == before


def test_nft_ipv6_only_then_both_replaces_the_table(router):
    before = nft_ruleset(router)
    ok(netsetup(router, "enable", "--backend", "nft", "--ipv6"))
    ruleset = nft_ruleset(router)
    assert f"table ip6 {TABLE} {{" in ruleset
    assert f"table inet {TABLE}" not in ruleset and f"table ip {TABLE}" not in ruleset
    status = ok(netsetup(router, "status", "--ipv6")).stdout
    assert f"nftables table ip6 {TABLE} (nft list table ip6 {TABLE}): installed\n" in status
    result = ok(netsetup(router, "enable", "--backend", "nft"))  # both families: one inet table
    assert f"(replacing ip6 {TABLE}: this plan's rules go to inet {TABLE})" in result.stdout
    ruleset = nft_ruleset(router)
    assert f"table inet {TABLE} {{" in ruleset and f"table ip6 {TABLE}" not in ruleset
    ok(netsetup(router, "disable"))
    assert nft_ruleset(router) == before


@pytest.mark.parametrize("installed", [False, True], ids=["fresh", "over-an-install"])
def test_nft_failure_half_way_changes_nothing(router, installed):
    """The injected failure is a command the kernel rejects at the end of the transaction,
    after it took every rule before it: the whole transaction must be aborted."""
    if installed:
        ok(netsetup(router, "enable", "--backend", "nft"))
    before = nft_ruleset(router)
    result = netsetup(router, "enable", "--backend", "nft", *FULL, fail_after=0)
    assert result.returncode == 1, result.stdout + result.stderr
    assert nft_ruleset(router) == before  # not half the rules, and an old install kept whole
    assert "enable failed at `nft -f - (replace table inet" in result.stderr
    assert "injected failure" in result.stderr
    assert "the transaction was aborted, nothing changed" in result.stderr


def test_nft_dry_run_changes_nothing(router):
    before = nft_ruleset(router)
    result = ok(netsetup(router, "enable", "--backend", "nft", "--dry-run", "--local"))
    assert "dry run: nothing is changed; enable would run:" in result.stdout
    script = result.stdout[result.stdout.index("#!/usr/sbin/nft -f") :]
    assert f"table inet {TABLE} {{\n\tchain prerouting {{" in script
    assert "meta skuid " in script
    assert nft_ruleset(router) == before
    ok(netsetup(router, "enable", "--backend", "nft"))
    enabled = nft_ruleset(router)
    result = ok(netsetup(router, "disable", "--dry-run"))
    assert f"  nft delete table inet {TABLE}\n" in result.stdout
    assert nft_ruleset(router) == enabled


@pytest.mark.parametrize(
    ("family", "server", "client"),
    [(4, nslab.SERVER_V4, nslab.CLIENT_V4), (6, nslab.SERVER_V6, nslab.CLIENT_V6)],
    ids=["ipv4", "ipv6"],
)
def test_nft_redirected_connection_arrives_with_original_destination(
    lab, listener, family, server, client
):
    ok(netsetup(lab.gateway, "enable", "--backend", "nft"))
    proc = listener(family)
    assert connect(lab.client, server) == f"{server} 25 {client}"
    assert proc.stdout.readline().strip() == f"{server} 25 {client}"
    status = ok(netsetup(lab.gateway, "status")).stdout
    assert re.search(r"\n\s+1\s+\d+    iifname \"g0\" tcp dport 25 counter redirect", status), (
        status
    )
    assert legacy_tables(lab.gateway) == ""

    ok(netsetup(lab.gateway, "disable"))
    assert connect(lab.client, server) == "refused"  # straight to the server, where 25 is closed


def test_nft_local_mail_redirected_except_the_daemons_own(lab, listener):
    ok(netsetup(lab.gateway, "enable", "--backend", "nft", "--ipv4", "--local", "--user", "65534"))
    assert f"table ip {TABLE} {{" in nft_ruleset(lab.gateway)
    listener(4)
    seen = f"{nslab.SERVER_V4} 25 {nslab.GATEWAY_OUT_V4}"
    assert connect(lab.gateway, nslab.SERVER_V4) == seen
    assert connect(lab.gateway, nslab.SERVER_V4, uid=65534) == "refused"  # no loop back


# -- review fixes -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ['x";redirect#+', 'lan0"'])
def test_nft_unsafe_interface_name_is_a_usage_error_and_changes_nothing(router, name):
    before = nft_ruleset(router)
    result = netsetup(router, "enable", "--backend", "nft", "-i", name)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"invalid interface name {name!r}" in result.stderr
    assert nft_ruleset(router) == before


def test_nft_bare_plus_intercepts_on_every_interface(lab, listener):
    ok(netsetup(lab.gateway, "enable", "--backend", "nft", "--ipv4", "-i", "+"))
    ours = nslab.run_in(lab.gateway, ["nft", "list", "table", "ip", TABLE], check=True).stdout
    assert f"\t\ttcp dport 25 counter packets 0 bytes 0 redirect to :{PROXY_PORT}\n" in ours
    assert "iifname" not in ours
    status = ok(netsetup(lab.gateway, "status", "--ipv4", "-i", "+")).stdout
    assert f"nftables table ip {TABLE} (nft list table ip {TABLE}): installed\n" in status
    proc = listener(4)
    seen = f"{nslab.SERVER_V4} 25 {nslab.CLIENT_V4}"
    assert connect(lab.client, nslab.SERVER_V4) == seen
    assert proc.stdout.readline().strip() == seen
    ok(netsetup(lab.gateway, "disable"))
    assert nft_ruleset(lab.gateway) == ""


@pytest.mark.parametrize(
    "drift",
    [
        f"add table inet {TABLE} {{ flags dormant; }}",
        f"chain inet {TABLE} prerouting {{ policy drop; }}",
        # the same table and rules, at another priority
        render_script(RedirectPlan(proxy_port=PROXY_PORT, interfaces=("lan0",))).replace(
            "priority -100;", "priority 0;"
        ),
    ],
    ids=["dormant", "policy-drop", "priority"],
)
def test_nft_status_reports_a_dormant_table_or_changed_chain(router, drift):
    ok(netsetup(router, "enable", "--backend", "nft"))
    installed = nft_ruleset(router)
    nft(router, drift + "\n")
    status = ok(netsetup(router, "status")).stdout
    assert f"(nft list table inet {TABLE}): installed, NOT as planned" in status
    problems = [line for line in status.splitlines() if line.startswith("  ! ")]
    assert problems and not any("differs from the plan" in line for line in problems), status
    ok(netsetup(router, "enable", "--backend", "nft"))  # converges
    assert nft_ruleset(router) == installed
    assert f"inet {TABLE}): installed\n" in ok(netsetup(router, "status")).stdout


@pytest.mark.skipif(shutil.which("iptables-legacy-save") is None, reason="needs iptables")
def test_rules_of_both_backends_refused_shown_and_removed(router):
    before, legacy_before = nft_ruleset(router), legacy_ruleset(router)
    ok(netsetup(router, "enable", "--backend", "iptables"))
    legacy = legacy_ruleset(router)
    result = netsetup(router, "enable", "--backend", "nft")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "run `clamsmtp-netsetup disable --backend iptables`" in result.stderr
    assert nft_ruleset(router) == before and legacy_ruleset(router) == legacy
    # both at once, as an earlier build let them be
    nft(router, render_script(RedirectPlan(proxy_port=PROXY_PORT, interfaces=("lan0",))))
    result = netsetup(router, "enable", "--backend", "iptables")
    assert result.returncode == 2 and "disable --backend nft`" in result.stderr
    status = ok(netsetup(router, "status")).stdout
    assert "IPv4 (iptables-legacy, table nat): installed\n" in status
    assert f"nftables table inet {TABLE} (nft list table inet {TABLE}): installed\n" in status
    ok(netsetup(router, "disable"))  # auto: ours from both mechanisms
    assert nft_ruleset(router) == before
    assert legacy_ruleset(router) == legacy_before
    # an explicit backend removes its own only, and says what is left
    ok(netsetup(router, "enable", "--backend", "iptables"))
    nft(router, render_script(RedirectPlan(proxy_port=PROXY_PORT, interfaces=("lan0",))))
    result = ok(netsetup(router, "disable", "--backend", "iptables"))
    assert "remove them with `clamsmtp-netsetup disable --backend nft`" in result.stderr
    assert legacy_ruleset(router) == legacy_before and nft_ruleset(router) != before
    ok(netsetup(router, "disable", "--backend", "nft"))
    assert nft_ruleset(router) == before
