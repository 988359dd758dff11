"""--mode tproxy under faults, in a throwaway router namespace (root only, see nslab.py): the
new objects (mangle chains, `ip rule` entries, the local routes of table 10025) after a
SIGKILL half-way, a rule or route deleted by hand, enable twice, and both backends.

Whatever happened, `status` works and `enable` or `disable` converge to exactly the state of a
clean `enable`, or to the state from before (the admin's own mangle rule and ip rule kept).
"""

from __future__ import annotations

import re

import pytest
from test_netns import REASON
from test_netsetup_faults import _lines, kill, ok, start, wait_no_processes

from lab import nslab

PORT = "10025"
OPTIONS = ("--mode", "tproxy", "-i", "lan0")
#: per family: the route, the rule, then 6 mangle changes (see test_tproxy_unit.py)
OPS_PER_FAMILY = 8
OP_LINE = re.compile(r"^  (ip6?tables-legacy -t mangle |ip -[46] (rule|route) add )")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(REASON is not None, reason=f"network-namespace tests: {REASON}"),
]


def netsetup(ns: str, command: str, *options: str):
    from test_netsetup_faults import _argv, _env

    result = nslab.run_in(ns, _argv(command, *options), env=_env())
    assert "Traceback" not in result.stderr, result.stderr
    return result


def state(ns: str) -> str:
    """Both mangle tables, both families' ip rules and our table's routes, counters aside."""
    text = ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text += f"== {tool}\n" + nslab.run_in(ns, [tool, "-t", "mangle"], check=True).stdout
    for family in ("-4", "-6"):
        text += f"== ip {family} rule\n" + nslab.run_in(ns, ["ip", family, "rule"]).stdout
        text += f"== ip {family} route table {PORT}\n" + nslab.run_in(
            ns, ["ip", family, "route", "show", "table", PORT]).stdout
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return re.sub(r"\[\d+:\d+\]", "[0:0]", text)


@pytest.fixture(scope="module")
def router():
    with nslab.router_namespace("cst") as ns:
        yield ns


@pytest.fixture(scope="module")
def states(router):
    """(before, enabled): an admin's own mangle rule and ip rule, then a clean enable."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        nslab.run_in(router, [tool, "-w", "-t", "mangle", "-A", "PREROUTING", "-i", "wan0",
                              "-j", "RETURN"], check=True)
    for family in ("-4", "-6"):
        nslab.run_in(router, ["ip", family, "rule", "add", "fwmark", "0x7", "lookup", "77",
                              "priority", "9025"], check=True)
    before = state(router)
    ok(netsetup(router, "enable", *OPTIONS))
    enabled = state(router)
    ok(netsetup(router, "disable", *OPTIONS))
    assert state(router) == before
    assert enabled.count("from all fwmark 0x2729/0xffff lookup 10025") == 2
    assert enabled.count("local default dev lo") == 2
    assert enabled.count("-A PREROUTING -j CLAMSMTP-10025") == 2
    assert "fwmark 0x7 lookup 77" in enabled  # the admin's rule, same priority, kept
    return before, enabled


def kill_at(ns: str, op: int) -> None:
    proc = start(ns, "enable", *OPTIONS, delay=0.2)
    lines, pump = _lines(proc)
    seen = []
    try:
        while True:
            line = lines.get(timeout=60)
            assert line is not None, f"enable ended before op {op}:\n{''.join(seen)}"
            seen.append(line)
            if OP_LINE.match(line):
                op -= 1
                if op == 0:
                    kill(proc, True)
                    return
    finally:
        if proc.poll() is None:
            kill(proc, True)
        pump.join(15)
        proc.stdout.close()


# the first ip rule, the first mangle change, the IPv6 route, the very last change
KILL_POINTS = [2, 3, OPS_PER_FAMILY + 1, 2 * OPS_PER_FAMILY]


@pytest.mark.parametrize("op", KILL_POINTS, ids=[f"op{n}" for n in KILL_POINTS])
def test_enable_killed_half_way_converges(router, states, op):
    before, enabled = states
    kill_at(router, op)
    wait_no_processes(router)
    assert state(router) not in (before, enabled) or op in (1, 2 * OPS_PER_FAMILY)
    status = ok(netsetup(router, "status", *OPTIONS)).stdout
    assert "IPv4 (iptables-legacy, table mangle): " in status
    if KILL_POINTS.index(op) % 2 == 0:
        ok(netsetup(router, "enable", *OPTIONS))
        assert state(router) == enabled
    ok(netsetup(router, "disable", *OPTIONS))
    assert state(router) == before


@pytest.mark.parametrize("deleted", [
    ["ip", "-4", "rule", "del", "fwmark", "0x2729/0xffff", "lookup", PORT, "priority", "9025"],
    ["ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", PORT],
    ["iptables-legacy", "-w", "-t", "mangle", "-D", "CLAMSMTP-10025", "3"],
], ids=["ip-rule", "ipv6-route", "mangle-rule"])
def test_a_hand_deleted_object_shows_in_status_and_enable_puts_it_back(router, states,
                                                                       deleted):
    before, enabled = states
    ok(netsetup(router, "enable", *OPTIONS))
    nslab.run_in(router, deleted, check=True)
    status = ok(netsetup(router, "status", *OPTIONS)).stdout
    assert "MISSING" in status or "NOT as planned" in status, status
    ok(netsetup(router, "enable", *OPTIONS))
    assert state(router) == enabled
    ok(netsetup(router, "disable", *OPTIONS))
    assert state(router) == before


def test_enable_twice_is_one_enable_and_status_lists_rules_routes_counters(router, states):
    before, enabled = states
    ok(netsetup(router, "enable", *OPTIONS))
    ok(netsetup(router, "enable", *OPTIONS))
    assert state(router) == enabled
    status = ok(netsetup(router, "status", *OPTIONS)).stdout
    for line in ("IPv6 (ip6tables-legacy, table mangle): installed\n",
                 "  policy rule IPv4: present: ip -4 rule fwmark 0x2729/0xffff lookup 10025 "
                 "priority 9025\n",
                 "  policy route IPv6: present: ip -6 route local ::/0 dev lo table 10025\n"):
        assert line in status, status
    assert re.search(r"^ +0 +0  -A CLAMSMTP-10025 -i lan0 .*-j TPROXY ", status, re.M), status
    ok(netsetup(router, "disable"))  # no --mode: a disable finds ours whatever the mode
    assert state(router) == before


def test_nft_backend_installs_and_removes_the_same_objects(router, states):
    before, _ = states
    ok(netsetup(router, "enable", *OPTIONS, "--backend", "nft"))
    listed = nslab.run_in(router, ["nft", "list", "table", "inet", f"clamsmtp-{PORT}"],
                          check=True).stdout
    assert "type filter hook prerouting priority mangle; policy accept;" in listed
    assert "tproxy to :10025 accept" in listed
    routing = state(router)
    assert routing.count("from all fwmark 0x2729/0xffff lookup 10025") == 2
    status = ok(netsetup(router, "status", *OPTIONS, "--backend", "nft")).stdout
    assert f"nftables table inet clamsmtp-{PORT} (nft list table inet clamsmtp-{PORT}): " \
           "installed\n" in status, status
    assert "policy route IPv4: present" in status
    ok(netsetup(router, "enable", *OPTIONS, "--backend", "nft"))  # twice: converges
    ok(netsetup(router, "disable", "--backend", "nft"))
    assert state(router) == before
    assert "clamsmtp" not in nslab.run_in(router, ["nft", "list", "ruleset"]).stdout
