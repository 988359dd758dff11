"""clamsmtp-netsetup against the real kernel, inside throwaway network namespaces (root only).

Every test makes its own namespace(s) with documentation addresses, runs the real command
(``python -m netsetup.cli`` under ``ip netns exec``) and reads the rules back with
``iptables-legacy-save`` / ``ip6tables-legacy-save`` inside the namespace.  The end-to-end tests
send one TCP connection client -> gateway -> server and check, with SO_ORIGINAL_DST in a
listener on the gateway, that it was redirected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import faultinject
import pytest

from lab import nslab

PROXY_PORT = 10025
CHAIN = f"CLAMSMTP-{PROXY_PORT}"


REASON = nslab.unavailable_reason(
    ("iptables-legacy-save", "apt package iptables"),
    ("ip6tables-legacy-save", "apt package iptables"),
)
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(REASON is not None, reason=f"network-namespace tests: {REASON}"),
]

#: Every kind of rule at once: --local with the daemon's uid exempt, exemptions, two ports.
FULL = (
    "--local", "--user", "0",
    "--exempt-source", "203.0.113.0/24",
    "--exempt-destination", "2001:db8:ff::/48",
    "--port", "25", "--port", "587",
)

# -- helpers ---------------------------------------------------------------------------------


def netsetup(ns: str, *args: str, fail_after: int | None = None) -> subprocess.CompletedProcess:
    """The real command in ``ns``; never reads the host's /etc/clamsmtpd.conf. ``fail_after``:
    through faultinject.py, the change after that many fails (once)."""
    env = {**os.environ, "PYTHONPATH": str(nslab.REPO_ROOT)}
    if "--proxy-port" not in args and "-f" not in args:
        args = (*args, "--proxy-port", str(PROXY_PORT))
    if fail_after is None:
        return nslab.run_in(ns, [sys.executable, "-m", "netsetup.cli", *args], env=env)
    return nslab.run_in(ns, faultinject.argv(*args, fail_after=fail_after), env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def ruleset(ns: str) -> str:
    """Both nat tables as iptables-save prints them, without the date comments and counters."""
    text = ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text += f"== {tool}\n" + nslab.run_in(ns, [tool, "-t", "nat"], check=True).stdout
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return re.sub(r"\[\d+:\d+\]", "[0:0]", text)


def legacy_table_names(ns: str) -> list[str]:
    out = nslab.run_in(ns, ["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"])
    return sorted(out.stdout.split())


def ipt(ns: str, *args: str, family: int = 4) -> None:
    tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    nslab.run_in(ns, [tool, "-w", *args], check=True)


@pytest.fixture
def router():
    """One namespace: lan0 (no default route) and wan0 (default routes), see nslab."""
    with nslab.router_namespace("csr") as ns:
        yield ns


@pytest.fixture
def lab():
    """client -> gateway -> server, IPv4 and IPv6, forwarding on."""
    with nslab.gateway_lab("cs") as lab:
        yield lab


EXPECTED_V4 = [
    f":{CHAIN} - [0:0]",
    f"-A PREROUTING -j {CHAIN}",
    f"-A {CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
    f"-A {CHAIN} -i lan0 -p tcp -m tcp --dport 25 -j REDIRECT --to-ports {PROXY_PORT}",
]

# -- rule sets -------------------------------------------------------------------------------


def test_enable_installs_rules_and_status_shows_them(router):
    before = ruleset(router)
    result = ok(netsetup(router, "enable"))
    assert "backend:     iptables (legacy xtables through python-iptables)" in result.stdout
    assert "interfaces:  lan0 (192.0.2.1/24, 2001:db8:1::1/64, up)" in result.stdout
    after = ruleset(router)
    v4, v6 = after.split("== ip6tables-legacy-save")
    for line in EXPECTED_V4:
        assert line in v4.splitlines()
        assert line in v6.splitlines()
    assert after != before
    assert legacy_table_names(router) == ["nat", "nat"]  # no filter/mangle/raw created

    status = ok(netsetup(router, "status")).stdout
    assert "IPv4 (iptables-legacy, table nat): installed\n" in status
    assert "IPv6 (ip6tables-legacy, table nat): installed\n" in status
    assert "uplinks:     wan0" in status
    assert re.search(rf"\s+0\s+0  -A PREROUTING -j {CHAIN}   \[rule 1 of 1 in PREROUTING\]", status)
    for line in EXPECTED_V4[2:]:
        assert line in status


def test_enable_twice_identical_and_disable_leaves_no_residue(router):
    before = ruleset(router)
    ok(netsetup(router, "enable"))
    once = ruleset(router)
    ok(netsetup(router, "enable"))
    assert ruleset(router) == once
    ok(netsetup(router, "disable"))
    assert ruleset(router) == before
    assert "nothing to remove" in ok(netsetup(router, "disable")).stdout
    assert ruleset(router) == before


def test_disable_keeps_unrelated_rules_and_other_instances(router):
    for family in (4, 6):
        ipt(
            router,
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            "wan0",
            "-p",
            "tcp",
            "--dport",
            "2525",
            "-j",
            "REDIRECT",
            "--to-ports",
            "25",
            family=family,
        )
        ipt(router, "-t", "nat", "-N", "ADMIN", family=family)
        ipt(router, "-t", "nat", "-A", "ADMIN", "-j", "RETURN", family=family)
        ipt(router, "-t", "nat", "-A", "OUTPUT", "-j", "ADMIN", family=family)
        ipt(
            router,
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
            family=family,
        )
    ok(netsetup(router, "enable", "--proxy-port", "10026"))  # another instance
    before = ruleset(router)

    ok(netsetup(router, "enable", *FULL))
    during = ruleset(router)
    assert f"-A {CHAIN}-LOCAL -m owner --uid-owner 0 -j RETURN" in during
    assert f"-A {CHAIN} -s 203.0.113.0/24 -j RETURN" in during
    assert f"-A {CHAIN} -d 2001:db8:ff::/48 -j RETURN" in during
    prerouting = [x for x in during.splitlines() if x.startswith("-A PREROUTING")]
    assert prerouting[0] == f"-A PREROUTING -j {CHAIN}"  # ours first
    assert "-A PREROUTING -j CLAMSMTP-10026" in prerouting
    assert all(line in during for line in before.splitlines())

    ok(netsetup(router, "disable"))
    assert ruleset(router) == before  # byte for byte, the admin's and 10026's rules intact
    ok(netsetup(router, "disable", "--proxy-port", "10026"))
    assert "CLAMSMTP" not in ruleset(router)
    assert "-A ADMIN -j RETURN" in ruleset(router)


@pytest.mark.parametrize("fail_after", [0, 2, 4, 6, 9, 14])
def test_failure_half_way_rolls_back(router, fail_after):
    ipt(router, "-t", "nat", "-A", "PREROUTING", "-i", "wan0", "-j", "RETURN")
    before = ruleset(router)
    result = netsetup(router, "enable", "--local", "--user", "0", fail_after=fail_after)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = re.search(r"enable failed at `(.+?)`: injected failure", result.stderr)
    assert failed, result.stderr
    assert f"  {failed.group(1)}\n" in result.stdout  # the op was logged before it failed
    assert "rolled back" in result.stderr
    assert "rolling back" in result.stdout
    assert ruleset(router) == before


def test_interface_not_found_changes_nothing(router):
    result = netsetup(router, "enable", "-i", "lan0", "-i", "nosuch0")
    assert result.returncode == 5
    assert "interface 'nosuch0' not found" in result.stderr
    assert legacy_table_names(router) == []


def test_dry_run_touches_nothing(router):
    result = ok(netsetup(router, "enable", "--dry-run"))
    assert "dry run: nothing is changed; enable would run:" in result.stdout
    assert f"  iptables-legacy -t nat -I PREROUTING 1 -j {CHAIN}\n" in result.stdout
    assert legacy_table_names(router) == []  # not even an empty nat table was created


def test_hand_deleted_rules_converge(router):
    ok(netsetup(router, "enable"))
    enabled = ruleset(router)
    redirect = [
        "-i",
        "lan0",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "25",
        "-j",
        "REDIRECT",
        "--to-ports",
        str(PROXY_PORT),
    ]
    ipt(router, "-t", "nat", "-D", CHAIN, *redirect)
    status = ok(netsetup(router, "status")).stdout
    assert "IPv4 (iptables-legacy, table nat): installed, NOT as planned" in status
    assert f"{CHAIN} differs from the plan" in status
    ok(netsetup(router, "enable"))
    assert ruleset(router) == enabled

    ipt(router, "-t", "nat", "-D", "PREROUTING", "-j", CHAIN, family=6)  # jump gone
    assert f"{CHAIN} is jumped to 0 times" in ok(netsetup(router, "status")).stdout
    ok(netsetup(router, "disable"))
    assert "CLAMSMTP" not in ruleset(router)


def test_leftover_of_a_crash_is_cleared(router):
    before = ruleset(router)
    ipt(router, "-t", "nat", "-N", CHAIN)  # a chain with a stale rule and no jump
    ipt(router, "-t", "nat", "-A", CHAIN, "-j", "RETURN")
    ipt(router, "-t", "nat", "-A", "PREROUTING", "-j", CHAIN, family=4)
    ipt(router, "-t", "nat", "-A", "PREROUTING", "-j", CHAIN, family=4)  # and a double jump
    ok(netsetup(router, "disable"))
    assert ruleset(router) == before
    ipt(router, "-t", "nat", "-N", CHAIN, family=6)
    ok(netsetup(router, "enable"))
    assert sum(x == f"-A PREROUTING -j {CHAIN}" for x in ruleset(router).splitlines()) == 2


def test_ipv6_only(router):
    before = ruleset(router)
    ok(netsetup(router, "enable", "--ipv6"))
    v4, v6 = ruleset(router).split("== ip6tables-legacy-save")
    assert CHAIN not in v4
    assert f"-A {CHAIN} -i lan0 -p tcp -m tcp --dport 25 -j REDIRECT --to-ports {PROXY_PORT}" in v6
    status = ok(netsetup(router, "status", "--ipv6")).stdout
    assert "IPv6 (ip6tables-legacy, table nat): installed" in status
    assert "IPv4 (" not in status
    ok(netsetup(router, "disable", "--ipv6"))
    assert ruleset(router) == before


def test_proxy_port_from_config_listen(router, tmp_path):
    config = tmp_path / "clamsmtpd.conf"
    config.write_text("OutAddress: 10025\nListen: 0.0.0.0:10031\nUser: clamsmtp\n")
    result = ok(netsetup(router, "enable", "-f", str(config), "--ipv4"))
    assert f"proxy port:  10031 (Listen 0.0.0.0:10031 from {config}:2)" in result.stdout
    assert "-j REDIRECT --to-ports 10031" in ruleset(router)
    ok(netsetup(router, "disable", "-f", str(config)))
    assert "CLAMSMTP" not in ruleset(router)


@pytest.mark.skipif(not shutil.which("nft"), reason="needs the nft command (apt package nftables)")
def test_nftables_host_forced_iptables_works_and_warns(router):
    """auto uses nft on such a host (test_nft_netns.py); --backend iptables still works."""
    nslab.run_in(
        router,
        [
            "nft",
            "add table inet fw; add chain inet fw input "
            "{ type filter hook input priority 0; policy accept; }",
        ],
        check=True,
    )
    before = nslab.run_in(router, ["nft", "list", "ruleset"], check=True).stdout
    forced = ok(netsetup(router, "enable", "--backend", "iptables"))  # explicit: works, warns
    assert "iptables-nft" in forced.stderr
    assert f"-A PREROUTING -j {CHAIN}" in ruleset(router)
    ok(netsetup(router, "disable"))  # auto finds our legacy chains
    assert "CLAMSMTP" not in ruleset(router)
    assert nslab.run_in(router, ["nft", "list", "ruleset"], check=True).stdout == before


# -- end to end: a redirected connection really arrives ---------------------------------------

LISTENER = r"""
import socket, struct, sys
port, family = int(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == 6:
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # next to the IPv4 listener
sock.bind(("0.0.0.0" if family == 4 else "::", port))
sock.listen(5)
sock.settimeout(30)
print("ready", flush=True)
while True:
    conn, peer = sock.accept()
    if family == 4:  # SO_ORIGINAL_DST -> struct sockaddr_in
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)
        dport, addr = struct.unpack("!2xH4s8x", raw)
        host = socket.inet_ntop(socket.AF_INET, addr)
    else:  # IP6T_SO_ORIGINAL_DST on SOL_IPV6 -> struct sockaddr_in6
        raw = conn.getsockopt(41, 80, 28)
        dport, addr = struct.unpack("!2xH4x16s4x", raw)
        host = socket.inet_ntop(socket.AF_INET6, addr)
    line = f"{host} {dport} {peer[0]}"
    print(line, flush=True)
    conn.sendall(line.encode() + b"\n")
    conn.close()
"""

CLIENT = r"""
import encodings.idna, os, socket, sys  # imported before setuid: /root may be unreadable
if len(sys.argv) > 2:
    os.setuid(int(sys.argv[2]))
try:
    sock = socket.create_connection((sys.argv[1], 25), timeout=10)
except ConnectionRefusedError:
    print("refused")
else:
    print(sock.makefile().readline().strip())
"""


@pytest.fixture
def listener(lab):
    """Start the SO_ORIGINAL_DST listener in the gateway: listener(family) -> Popen."""
    started = []

    def start(family: int):
        proc = nslab.popen_in(
            lab.gateway, [sys.executable, "-c", LISTENER, str(PROXY_PORT), str(family)]
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes


def connect(ns: str, destination: str, uid: int | None = None) -> str:
    args = [destination] + ([str(uid)] if uid is not None else [])
    return nslab.python_in(ns, CLIENT, *args, check=True).stdout.strip()


@pytest.mark.parametrize(
    ("family", "server", "client"),
    [(4, nslab.SERVER_V4, nslab.CLIENT_V4), (6, nslab.SERVER_V6, nslab.CLIENT_V6)],
    ids=["ipv4", "ipv6"],
)
def test_redirected_connection_arrives_with_original_destination(
    lab, listener, family, server, client
):
    ok(netsetup(lab.gateway, "enable"))  # discovers g0 and g1: no default route in the gateway
    proc = listener(family)
    assert connect(lab.client, server) == f"{server} 25 {client}"
    assert proc.stdout.readline().strip() == f"{server} 25 {client}"
    status = ok(netsetup(lab.gateway, "status")).stdout
    counted = re.search(rf"IPv{family} .*?\n(?:.*\n)*?\s+1\s+\d+  -A {CHAIN} -i g0 ", status)
    assert counted, status

    ok(netsetup(lab.gateway, "disable"))
    assert connect(lab.client, server) == "refused"  # straight to the server, where 25 is closed


def test_local_mail_redirected_except_the_daemons_own(lab, listener):
    """--local: the gateway's own mail is caught in nat OUTPUT; the daemon's user is not."""
    ok(netsetup(lab.gateway, "enable", "--ipv4", "--local", "--user", "65534"))
    listener(4)
    # the source address was chosen by the route to the server, before the REDIRECT
    seen = f"{nslab.SERVER_V4} 25 {nslab.GATEWAY_OUT_V4}"
    assert connect(lab.gateway, nslab.SERVER_V4) == seen
    assert connect(lab.gateway, nslab.SERVER_V4, uid=65534) == "refused"  # no loop back
