"""Unit tests of clamsmtp-netsetup: no root, no kernel, no python-iptables calls.

As sshuttle's tests/client/test_methods_nat.py does with its ``ipt`` function, these tests
record every operation the single choke point ``_apply`` receives and compare the full ordered
list with the expected rule listing.  The kernel is a small in-memory model of the nat table
(``FakeNat``) standing in for the one line that talks to python-iptables (``_kernel``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import textwrap

import pytest

from netsetup import cli, discovery
from netsetup.backends import choose, get_backend
from netsetup.backends.iptables import (
    FAIL_AFTER_ENV,
    HOOKS,
    IptablesBackend,
    NatState,
    Op,
    disable_ops,
    enable_ops,
    rule_args,
)
from netsetup.backends.nft import NftBackend, render_script
from netsetup.daemonconf import Listen, parse_listen, read_listen
from netsetup.discovery import HostFacts, Interface, NftTable
from netsetup.errors import (
    ExitCode,
    KernelSupportError,
    OperationFailed,
    UsageError,
)
from netsetup.plan import RedirectPlan, Rule, chain_layout

net = ipaddress.ip_network

# -- an in-memory nat table ------------------------------------------------------------------


class FakeNat:
    """Both families' nat tables as {chain: [Rule]}, changed only by Ops."""

    BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

    def __init__(self):
        self.tables = {f: {c: [] for c in self.BUILTIN} for f in (4, 6)}
        self.fail_on: str | None = None  # str(op) that fails, like a kernel refusal
        self.race_on: str | None = None  # str(op) that someone else does first: ENOENT

    def snapshot(self):
        return {f: {c: list(rules) for c, rules in t.items()} for f, t in self.tables.items()}

    def apply(self, op: Op) -> None:
        if self.fail_on == str(op):
            raise OSError("Invalid argument")
        if self.race_on == str(op):
            self.race_on = None
            self.apply(op)
            raise OSError("No such file or directory")
        table = self.tables[op.family]
        if op.action == "new-chain":
            if op.chain in table:
                raise OSError("File exists")
            table[op.chain] = []
        elif op.action == "append":
            table[op.chain].append(op.rule)
        elif op.action == "insert":
            table[op.chain].insert(0, op.rule)
        elif op.action == "delete-jump":
            rules = table[op.chain]
            index = next(i for i, r in enumerate(rules) if r.target == op.rule.target)
            del rules[index]
        elif op.action == "flush":
            table[op.chain] = []
        elif op.action == "delete-chain":
            referenced = any(r.target == op.chain for rules in table.values() for r in rules)
            if table[op.chain] or referenced or op.chain in self.BUILTIN:
                raise OSError("Device or resource busy")
            del table[op.chain]

    def state(self, family: int) -> NatState:
        table = self.tables[family]
        return NatState(frozenset(table), {h: tuple(r.target for r in table[h]) for h in HOOKS})

    def rows(self, family: int, chain: str):
        return [(rule_args(r), 0, 0) for r in self.tables[family][chain]]


@pytest.fixture
def nat(monkeypatch):
    """Route the backend's kernel access to a FakeNat; record what _apply receives."""
    fake = FakeNat()
    fake.applied = []
    real_apply = IptablesBackend._apply

    def recording_apply(self, op):
        fake.applied.append(str(op))
        return real_apply(self, op)

    monkeypatch.delenv(FAIL_AFTER_ENV, raising=False)
    monkeypatch.setattr(IptablesBackend, "_apply", recording_apply)
    monkeypatch.setattr(IptablesBackend, "_kernel", lambda self, op: fake.apply(op))
    monkeypatch.setattr(IptablesBackend, "_read_state", lambda self, f: fake.state(f))
    monkeypatch.setattr(IptablesBackend, "_rows", lambda self, f, c: fake.rows(f, c))
    monkeypatch.setattr(IptablesBackend, "is_supported", classmethod(lambda cls: True))
    monkeypatch.setattr(IptablesBackend, "check", lambda self, plan: None)
    monkeypatch.setattr(IptablesBackend, "host_rules", lambda self: {})
    return fake


def quiet(_line: str) -> None:
    pass


PLAN = RedirectPlan(proxy_port=10025, interfaces=("lan0",))
FULL = RedirectPlan(
    proxy_port=10026,
    interfaces=("lan0", "dmz0"),
    ports=(25, 587),
    exempt_sources=(net("203.0.113.0/24"), net("2001:db8:ff::/48")),
    exempt_destinations=(net("198.51.100.25/32"),),
    local=True,
    owner_uid=105,
    owner_name="clamsmtp",
)

# -- clamsmtpd.conf: the Listen line only ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("10026", None, 10026),
        ("127.0.0.1:10026", "127.0.0.1", 10026),
        ("0.0.0.0", "0.0.0.0", 10025),
        ("[::]:10027", "::", 10027),
        ("[2001:db8::1]", "2001:db8::1", 10025),
        ("2001:db8::1", "2001:db8::1", 10025),
        ("localhost:10030", "localhost", 10030),
        ("  10031  ", None, 10031),
    ],
)
def test_listen_value_forms(value, host, port):
    listen = parse_listen(f"Listen: {value}\n", "clamsmtpd.conf")
    assert (listen.host, listen.port) == (host, port)
    assert listen.origin == "clamsmtpd.conf:1"


def test_listen_debian_file_last_line_wins_and_other_lines_ignored():
    text = textwrap.dedent(
        """\
        # Listen: 1
        OutAddress: 10025
        Listen: 127.0.0.1:10026
        Header: X-Virus-Scanned: ClamAV: using ClamSMTP
        this line has no colon and is not ours to judge
           listen : 0.0.0.0:10040
        """
    )
    listen = parse_listen(text, "/etc/clamsmtpd.conf")
    assert (listen.host, listen.port, listen.origin) == ("0.0.0.0", 10040, "/etc/clamsmtpd.conf:6")


def test_listen_default_when_absent():
    assert parse_listen("OutAddress: 10025\n", "c.conf").port == 10025


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/var/run/clamsmtpd.sock", "unix socket"),
        ("127.0.0.1:0", "invalid port"),
        ("127.0.0.1:65536", "invalid port"),
        ("1.2.3", "invalid IPv4"),
        ("[::1", "missing ']'"),
        ("[127.0.0.1]:25", "invalid IPv6"),
        ("", "empty value"),
    ],
)
def test_listen_errors_name_file_and_line(value, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse_listen(f"\n\nListen: {value}\n", "x.conf")
    assert str(caught.value).startswith("x.conf:3: ")


def test_read_listen_missing_file(tmp_path):
    missing = str(tmp_path / "nope.conf")
    assert read_listen(missing, explicit=False).port == 10025
    with pytest.raises(UsageError, match="no such config file"):
        read_listen(missing, explicit=True)


# -- the plan and the rule layout -------------------------------------------------------------


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


# -- exact operation lists -------------------------------------------------------------------


def test_enable_ops_ipv4_and_ipv6():
    assert [str(op) for fam in (4, 6) for op in enable_ops(PLAN, fam)] == [
        "iptables-legacy -t nat -N CLAMSMTP-10025",
        "iptables-legacy -t nat -A CLAMSMTP-10025 -m addrtype --dst-type LOCAL -j RETURN",
        "iptables-legacy -t nat -A CLAMSMTP-10025 -i lan0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10025",
        "iptables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10025",
        "ip6tables-legacy -t nat -N CLAMSMTP-10025",
        "ip6tables-legacy -t nat -A CLAMSMTP-10025 -m addrtype --dst-type LOCAL -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10025 -i lan0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10025",
        "ip6tables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10025",
    ]


def test_enable_ops_local_ipv6_keeps_only_ipv6_exemptions():
    assert [str(op) for op in enable_ops(FULL, 6)] == [
        "ip6tables-legacy -t nat -N CLAMSMTP-10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -s 2001:db8:ff::/48 -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -m addrtype --dst-type LOCAL -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i lan0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i lan0 -p tcp -m tcp --dport 587 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i dmz0 -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026 -i dmz0 -p tcp -m tcp --dport 587 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10026",
        "ip6tables-legacy -t nat -N CLAMSMTP-10026-LOCAL",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -m owner --uid-owner 105 -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -s 2001:db8:ff::/48 -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -m addrtype --dst-type LOCAL -j RETURN",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -p tcp -m tcp --dport 25 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -A CLAMSMTP-10026-LOCAL -p tcp -m tcp --dport 587 "
        "-j REDIRECT --to-ports 10026",
        "ip6tables-legacy -t nat -I OUTPUT 1 -j CLAMSMTP-10026-LOCAL",
    ]


def test_disable_ops_remove_only_our_objects_found():
    state = NatState(
        chains=frozenset(
            {
                "PREROUTING",
                "OUTPUT",
                "CLAMSMTP-10025",
                "CLAMSMTP-10025-LOCAL",
                "CLAMSMTP-10026",
                "MINE",
            }
        ),
        jumps={
            # a duplicate jump (crash between two runs), other instances' and the admin's own
            "PREROUTING": ("MINE", "CLAMSMTP-10025", "CLAMSMTP-10026", "CLAMSMTP-10025"),
            "OUTPUT": ("CLAMSMTP-10025-LOCAL",),
        },
    )
    assert [str(op) for op in disable_ops(PLAN, 4, state)] == [
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "iptables-legacy -t nat -D OUTPUT -j CLAMSMTP-10025-LOCAL",
        "iptables-legacy -t nat -F CLAMSMTP-10025",
        "iptables-legacy -t nat -F CLAMSMTP-10025-LOCAL",
        "iptables-legacy -t nat -X CLAMSMTP-10025",
        "iptables-legacy -t nat -X CLAMSMTP-10025-LOCAL",
    ]


def test_disable_ops_partial_enable_chain_without_jump():
    state = NatState(frozenset({"CLAMSMTP-10025"}), {"PREROUTING": (), "OUTPUT": ()})
    assert [str(op) for op in disable_ops(PLAN, 6, state)] == [
        "ip6tables-legacy -t nat -F CLAMSMTP-10025",
        "ip6tables-legacy -t nat -X CLAMSMTP-10025",
    ]
    assert disable_ops(PLAN, 6, NatState()) == []


# -- the backend through _apply --------------------------------------------------------------


def test_enable_starts_with_disable_and_twice_converges(nat):
    backend = IptablesBackend(log=quiet)
    backend.enable(PLAN)
    first = nat.snapshot()
    nat.applied.clear()
    backend.enable(PLAN)
    assert nat.snapshot() == first
    assert nat.applied == [
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "iptables-legacy -t nat -F CLAMSMTP-10025",
        "iptables-legacy -t nat -X CLAMSMTP-10025",
        "ip6tables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025",
        "ip6tables-legacy -t nat -F CLAMSMTP-10025",
        "ip6tables-legacy -t nat -X CLAMSMTP-10025",
        *[str(op) for fam in (4, 6) for op in enable_ops(PLAN, fam)],
    ]


def test_disable_restores_the_table_and_keeps_foreign_rules(nat):
    nat.tables[4]["PREROUTING"].append(Rule("ACCEPT", in_interface="wan0"))
    nat.tables[4]["OTHER"] = [Rule("RETURN")]
    nat.tables[4]["CLAMSMTP-10026"] = []  # another instance
    before = nat.snapshot()
    backend = IptablesBackend(log=quiet)
    backend.enable(dataclasses.replace(FULL, proxy_port=10025))
    backend.disable(PLAN)  # disable needs no --local: it removes both chains
    assert nat.snapshot() == before


def test_jump_inserted_at_position_one(nat):
    nat.tables[4]["PREROUTING"].append(Rule("DNAT", dport=25))
    IptablesBackend(log=quiet).enable(PLAN)
    assert [r.target for r in nat.tables[4]["PREROUTING"]] == ["CLAMSMTP-10025", "DNAT"]


def test_apply_wraps_kernel_errors_with_the_operation(nat):
    nat.fail_on = "iptables-legacy -t nat -I PREROUTING 1 -j CLAMSMTP-10025"
    with pytest.raises(OperationFailed) as caught:
        IptablesBackend(log=quiet).enable(PLAN)
    assert str(caught.value.op) == nat.fail_on
    assert caught.value.reason == "Invalid argument"


def test_fail_after_env_injects_one_failure(nat, monkeypatch):
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    backend = IptablesBackend(log=quiet)
    with pytest.raises(OperationFailed, match="injected failure") as caught:
        backend.enable(PLAN)
    assert str(caught.value.op) == str(enable_ops(PLAN, 4)[2])
    backend.disable(PLAN)  # the injection fired once: the rollback works
    assert nat.snapshot() == FakeNat().snapshot()


def test_disable_ignores_a_jump_that_vanished(nat):
    IptablesBackend(log=quiet).enable(PLAN)
    nat.race_on = "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10025"
    lines = []
    IptablesBackend(log=lines.append).disable(PLAN)
    assert "  (ignored: No such file or directory)" in lines
    assert nat.snapshot() == FakeNat().snapshot()


def test_disable_fatal_error_still_cleans_the_other_family(nat):
    IptablesBackend(log=quiet).enable(PLAN)
    nat.fail_on = "iptables-legacy -t nat -X CLAMSMTP-10025"
    with pytest.raises(OperationFailed, match="Invalid argument"):
        IptablesBackend(log=quiet).disable(PLAN)
    assert "CLAMSMTP-10025" not in nat.tables[6]  # IPv6 was still cleaned
    nat.fail_on = None
    IptablesBackend(log=quiet).disable(PLAN)
    assert nat.snapshot() == FakeNat().snapshot()


def test_dry_run_changes_nothing_and_prints_commands(nat):
    lines = []
    backend = IptablesBackend(dry_run=True, log=lines.append)
    backend.enable(PLAN)
    assert nat.snapshot() == FakeNat().snapshot()
    assert lines == [f"  {op}" for fam in (4, 6) for op in enable_ops(PLAN, fam)]
    assert backend.changes == len(lines)


def test_status_reports_counters_and_drift(nat):
    backend = IptablesBackend(log=quiet)
    backend.enable(PLAN)
    lines = backend.status(PLAN)
    assert lines[0] == "IPv4 (iptables-legacy, table nat): installed"
    assert any("-A PREROUTING -j CLAMSMTP-10025   [rule 1 of 1 in PREROUTING]" in x for x in lines)
    del nat.tables[4]["CLAMSMTP-10025"][-1]  # someone deleted the REDIRECT rule by hand
    lines = backend.status(PLAN)
    assert lines[0] == "IPv4 (iptables-legacy, table nat): installed, NOT as planned"
    assert "CLAMSMTP-10025 differs from the plan" in lines[1]
    backend.enable(PLAN)
    assert backend.status(PLAN)[0].endswith(": installed")


# -- nftables ---------------------------------------------------------------------------------


def test_nft_script_is_the_same_layout():
    plan = RedirectPlan(
        proxy_port=10026,
        interfaces=("lan0", "eth+"),
        exempt_sources=(net("203.0.113.0/24"), net("2001:db8:ff::/48")),
        local=True,
        owner_uid=105,
    )
    assert render_script(plan) == textwrap.dedent(
        """\
        #!/usr/sbin/nft -f
        # clamsmtp-netsetup: transparent SMTP redirect to port 10026
        # apply: nft -f FILE    remove: nft delete table inet clamsmtp-10026
        table inet clamsmtp-10026
        delete table inet clamsmtp-10026
        table inet clamsmtp-10026 {
        \tchain prerouting {
        \t\ttype nat hook prerouting priority -100; policy accept;
        \t\tip saddr 203.0.113.0/24 counter return
        \t\tip6 saddr 2001:db8:ff::/48 counter return
        \t\tfib daddr type local counter return
        \t\tiifname "lan0" tcp dport 25 counter redirect to :10026
        \t\tiifname "eth*" tcp dport 25 counter redirect to :10026
        \t}
        \tchain output {
        \t\ttype nat hook output priority -100; policy accept;
        \t\tmeta skuid 105 counter return
        \t\tip saddr 203.0.113.0/24 counter return
        \t\tip6 saddr 2001:db8:ff::/48 counter return
        \t\tfib daddr type local counter return
        \t\ttcp dport 25 counter redirect to :10026
        \t}
        }
        """
    )
    ipv4_only = RedirectPlan(proxy_port=10026, interfaces=("lan0",), families=(4,))
    assert "table ip clamsmtp-10026 {" in render_script(ipv4_only)


class FakeNft:
    """Stands in for the nft command: a table list, listings, and the scripts it was given."""

    def __init__(self, tables=(), listing="", fail=False):
        self.tables, self.listing, self.fail = list(tables), listing, fail
        self.scripts: list[str] = []

    def __call__(self, *args, script=None):  # set on the class: called without self
        import json
        import subprocess

        if args[:1] == ("-f",):
            self.scripts.append(script)
            failed = self.fail or "clamsmtp-injected-failure" in script  # as the kernel does
            return subprocess.CompletedProcess(args, int(failed), "", "Error: boom")
        if args == ("-j", "list", "tables"):
            items = [{"table": {"family": f, "name": n}} for f, n in self.tables]
            return subprocess.CompletedProcess(args, 0, json.dumps({"nftables": items}), "")
        return subprocess.CompletedProcess(args, 0, self.listing, "")


def test_nft_backend_applies_one_transaction(monkeypatch):
    fake = FakeNft(tables=[("inet", "fw"), ("ip6", "clamsmtp-10025"), ("ip", "clamsmtp-10026")])
    monkeypatch.setattr(NftBackend, "_nft", fake)
    shown = []
    NftBackend(log=shown.append).enable(PLAN)
    assert fake.scripts == [render_script(PLAN, ("ip6 clamsmtp-10025",))]
    assert "table ip6 clamsmtp-10025\ndelete table ip6 clamsmtp-10025\n" in fake.scripts[0]
    assert "clamsmtp-10026" not in fake.scripts[0] and "fw" not in fake.scripts[0]
    fake.tables.append(("inet", "clamsmtp-10025"))
    backend = NftBackend(log=shown.append)
    backend.disable(dataclasses.replace(PLAN, families=(4,)))  # ip6 is not asked for
    assert fake.scripts[-1] == "add table inet clamsmtp-10025\ndelete table inet clamsmtp-10025\n"
    assert "  nft delete table inet clamsmtp-10025" in shown
    assert any("removing it removes both" in line for line in shown)
    fake.tables = [("inet", "fw")]
    backend = NftBackend(log=quiet)
    backend.disable(PLAN)
    assert backend.changes == 0 and len(fake.scripts) == 2  # nothing of ours: no transaction


def test_nft_backend_dry_run_and_failure(monkeypatch):
    fake = FakeNft()
    monkeypatch.setattr(NftBackend, "_nft", fake)
    shown = []
    NftBackend(dry_run=True, log=shown.append).enable(PLAN)
    assert "\n".join(shown) + "\n" == render_script(PLAN)
    assert fake.scripts == []
    fake.fail = True
    with pytest.raises(OperationFailed, match="Error: boom; the transaction was aborted") as e:
        NftBackend(log=quiet).enable(PLAN)
    assert str(e.value.op) == "nft -f - (replace table inet clamsmtp-10025, one transaction)"
    monkeypatch.setenv("NETSETUP_FAIL_AFTER", "0")
    fake.fail = False
    with pytest.raises(OperationFailed, match="injected failure"):
        NftBackend(log=quiet).enable(PLAN)
    assert fake.scripts[-1].endswith("delete table ip clamsmtp-injected-failure\n")


def test_nft_missing_command_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(NftBackend, "nft_path", classmethod(lambda cls: None))
    assert not NftBackend.is_supported()
    with pytest.raises(KernelSupportError, match="nft command is missing.*nftables") as e:
        NftBackend(log=quiet).check(PLAN)
    assert e.value.exit_code == ExitCode.NO_KERNEL_SUPPORT
    shown = []
    NftBackend(dry_run=True, log=shown.append).enable(PLAN)  # a dry run still shows the script
    assert "#!/usr/sbin/nft -f" in shown


LISTED = """table inet clamsmtp-10025 {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip saddr 192.0.2.25 counter packets 3 bytes 180 return
\t\tfib daddr type local counter packets 0 bytes 0 return
\t\tiifname "lan0" tcp dport 25 counter packets 7 bytes 420 redirect to :10025
\t}
}
"""


def test_nft_status_parses_counters_and_compares_with_the_plan(monkeypatch):
    fake = FakeNft(tables=[("inet", "clamsmtp-10025"), ("ip", "clamsmtp-10026")], listing=LISTED)
    monkeypatch.setattr(NftBackend, "_nft", fake)
    plan = dataclasses.replace(PLAN, exempt_sources=(net("192.0.2.25/32"),))
    lines = NftBackend(log=quiet).status(plan)
    assert lines[0].endswith(": installed")
    redirect = 'iifname "lan0" tcp dport 25 counter redirect to :10025'
    assert f"           7          420    {redirect}" in lines
    assert lines[-1].endswith("ip clamsmtp-10026 (other --proxy-port)")
    lines = NftBackend(log=quiet).status(PLAN)  # without the exemption: drift
    assert lines[0].endswith(": installed, NOT as planned")
    assert "  ! chain prerouting differs from the plan" in lines
    lines = NftBackend(log=quiet).status(dataclasses.replace(PLAN, families=(4,)))
    assert "nftables table ip clamsmtp-10025 (IPv4): not installed" in lines
    assert any("plan asks for table ip clamsmtp-10025" in line for line in lines)


# -- choosing the backend ---------------------------------------------------------------------

NFT_HOST = (NftTable("ip", "filter", 3, 12), NftTable("inet", "fw", 1, 2))


def test_auto_prefers_nft_on_an_nftables_host(nat):
    choice = choose("auto", PLAN, NFT_HOST, log=quiet)
    assert choice.backend.name == "nft"
    assert "rules are in nftables" in choice.reason
    assert "nftables: ip filter (12 rules), inet fw (2 rules)" in choice.host


def test_auto_iptables_on_empty_or_legacy_host(nat):
    assert choose("auto", PLAN, (), log=quiet).backend.name == "iptables"
    assert choose("auto", PLAN, None, log=quiet).backend.name == "iptables"


def test_auto_keeps_the_backend_that_holds_our_chains(nat):
    IptablesBackend(log=quiet).enable(PLAN)
    choice = choose("auto", PLAN, NFT_HOST, log=quiet)
    assert choice.backend.name == "iptables"
    assert any("iptables-nft" in w for w in choice.warnings)


def test_explicit_iptables_on_nft_host_warns(nat):
    choice = choose("iptables", PLAN, NFT_HOST, log=quiet)
    assert choice.backend.name == "iptables"
    assert choice.warnings


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(UsageError):
        get_backend("pf")


# -- the CLI, with discovery faked ------------------------------------------------------------

FACTS = HostFacts(
    interfaces=(
        Interface("lo", 1, True, True, None, ("127.0.0.1/8",), ()),
        Interface("lan0", 2, True, False, None, ("192.0.2.1/24", "2001:db8:1::1/64"), ()),
        Interface("wan0", 3, True, False, None, ("198.51.100.1/24",), (4, 6)),
        Interface("br0p1", 4, True, False, "br0", (), ()),
        Interface("br0", 5, True, False, None, ("203.0.113.1/24",), ()),
    ),
    forwarding={4: True, 6: False},
    ipv6=True,
)


@pytest.fixture
def host(nat, monkeypatch, tmp_path):
    """Root, the interfaces above, no nftables rules, a config with Listen: 10030."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(discovery, "discover", lambda: FACTS)
    monkeypatch.setattr(discovery, "nft_tables", lambda: ())
    config = tmp_path / "clamsmtpd.conf"
    config.write_text("OutAddress: 10025\nListen: 10030\n")
    nat.config = str(config)
    return nat


def test_default_interfaces_skip_loopback_uplinks_and_bridge_ports():
    assert FACTS.default_interfaces() == ("lan0", "br0")
    assert FACTS.uplinks() == ("wan0",)


def test_cli_enable_dry_run_prints_plan_and_commands(host, capsys):
    code = cli.main(["enable", "--dry-run", "-f", host.config, "--ipv4"])
    out, err = capsys.readouterr()
    assert code == 0
    assert host.snapshot() == FakeNat().snapshot()
    assert "proxy port:  10030 (Listen 10030 from " in out
    assert "interfaces:  lan0 (192.0.2.1/24, 2001:db8:1::1/64, up); br0 (203.0.113.1/24, up)" in out
    assert "dry run: nothing is changed; enable would run:" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    expected = enable_ops(
        RedirectPlan(proxy_port=10030, interfaces=("lan0", "br0"), families=(4,)), 4
    )
    assert commands == [str(op) for op in expected]


def test_cli_dry_run_needs_no_root(host, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["enable", "--dry-run", "-f", host.config]) == 0
    assert cli.main(["enable", "-f", host.config]) == ExitCode.NOT_ROOT
    assert "needs root" in capsys.readouterr().err


def test_cli_enable_status_disable_roundtrip(host, capsys):
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    assert cli.main(["status", "-f", host.config, "-i", "lan0"]) == 0
    out, err = capsys.readouterr()
    assert "IPv4 (iptables-legacy, table nat): installed\n" in out
    assert "IPv6 (ip6tables-legacy, table nat): installed\n" in out
    assert "forwarding:  IPv4 on, IPv6 OFF" in out
    assert "net.ipv6.conf.all.forwarding = 0" in err
    assert "takes IPv4 only" not in err  # a bare-port Listen is dual-stack
    assert cli.main(["disable", "-f", host.config]) == 0
    assert host.snapshot() == FakeNat().snapshot()
    assert cli.main(["disable", "-f", host.config]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_cli_rollback_after_failure_half_way(host, monkeypatch, capsys):
    monkeypatch.setenv(FAIL_AFTER_ENV, "5")  # IPv4 done, IPv6 chain created, its 1st rule fails
    before = host.snapshot()
    code = cli.main(["enable", "-f", host.config, "-i", "lan0"])
    out, err = capsys.readouterr()
    assert code == ExitCode.FAILED
    failed = "ip6tables-legacy -t nat -A CLAMSMTP-10030 -m addrtype --dst-type LOCAL -j RETURN"
    assert f"enable failed at `{failed}`: injected failure" in err
    assert "rolled back" in err
    assert host.snapshot() == before
    assert host.applied[-6:] == [
        failed,
        "iptables-legacy -t nat -D PREROUTING -j CLAMSMTP-10030",
        "iptables-legacy -t nat -F CLAMSMTP-10030",
        "iptables-legacy -t nat -X CLAMSMTP-10030",
        "ip6tables-legacy -t nat -F CLAMSMTP-10030",
        "ip6tables-legacy -t nat -X CLAMSMTP-10030",
    ]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["enable", "-i", "eth9"], ExitCode.NO_INTERFACE, "interface 'eth9' not found"),
        (["enable", "--port", "0"], ExitCode.USAGE, "invalid port"),
        (["enable", "--exempt-source", "10.0.0.300"], ExitCode.USAGE, "invalid address"),
        (["enable", "--local", "--user", "no-such-user-x"], ExitCode.USAGE, "does not exist"),
        (["enable", "-f", "/nonexistent/clamsmtpd.conf"], ExitCode.USAGE, "no such config"),
        (["frobnicate"], ExitCode.USAGE, "invalid choice"),
    ],
)
def test_cli_errors_and_exit_codes(host, capsys, argv, code, message):
    if "-f" not in argv and argv != ["frobnicate"]:
        argv = [*argv, "-f", host.config]
    assert cli.main(argv) == code
    assert message in capsys.readouterr().err
    assert host.snapshot() == FakeNat().snapshot()


def test_cli_no_interface_to_intercept(host, monkeypatch, capsys):
    only_uplink = HostFacts(FACTS.interfaces[:1] + FACTS.interfaces[2:3], {4: True}, False)
    monkeypatch.setattr(discovery, "discover", lambda: only_uplink)
    assert cli.main(["enable", "-f", host.config]) == ExitCode.NO_INTERFACE
    assert "no interface to intercept" in capsys.readouterr().err


def test_cli_nftables_host_dry_run_prints_nft_script(host, monkeypatch, capsys):
    monkeypatch.setattr(discovery, "nft_tables", lambda: NFT_HOST)
    fake = FakeNft(tables=[("ip", "filter"), ("inet", "fw")])
    monkeypatch.setattr(NftBackend, "_nft", fake)
    assert cli.main(["enable", "--dry-run", "-f", host.config, "-i", "lan0"]) == ExitCode.OK
    out, err = capsys.readouterr()
    assert "backend:     nft" in out
    assert "table inet clamsmtp-10030 {" in out
    assert fake.scripts == []
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == ExitCode.OK
    assert len(fake.scripts) == 1
    fake.fail = True
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == ExitCode.FAILED
    out, err = capsys.readouterr()
    assert "nothing changed" in err and "rolling back" not in out
    assert len(fake.scripts) == 2  # no rollback transaction after an aborted one
    assert host.snapshot() == FakeNat().snapshot()


def test_cli_listen_loopback_warning(host, tmp_path, capsys):
    config = tmp_path / "debian.conf"
    config.write_text("Listen: 127.0.0.1:10026\n")
    assert cli.main(["status", "-f", str(config), "--ipv4"]) == 0
    out, err = capsys.readouterr()
    assert "proxy port:  10026 (Listen 127.0.0.1:10026 from " in out
    assert "loopback address" in err


def test_listen_str():
    assert str(Listen("2001:db8::1", 25, "x")) == "[2001:db8::1]:25"
    assert str(Listen(None, 25, "x")) == "25"


class FakeWorker:
    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append(method)


def test_check_names_missing_kernel_modules(monkeypatch):
    import netsetup.backends.iptables as module

    worker = FakeWorker()
    monkeypatch.setattr(IptablesBackend, "is_supported", classmethod(lambda cls: True))
    monkeypatch.setattr(IptablesBackend, "_worker", lambda self, family: worker)
    monkeypatch.setattr(module, "kernel_xt_names", lambda family, kind: frozenset({"tcp"}))
    with pytest.raises(KernelSupportError, match="lacks xt_REDIRECT, xt_addrtype, xt_owner") as e:
        IptablesBackend(log=quiet).check(FULL)
    assert e.value.family == 4
    assert worker.calls[:3] == ["check_rules", "check_rules", "open_nat"]
    assert worker.calls.count("load_module") == 3  # tried modprobe before giving up
    lines = []
    IptablesBackend(dry_run=True, log=lines.append).check(FULL)  # a dry run only notes it
    assert lines[0].startswith("  (IPv4: the kernel does not list xt_REDIRECT")


def test_cli_defaulted_ipv6_dropped_when_unsupported(host, monkeypatch, capsys):
    def check(self, plan):
        if 6 in plan.families:
            raise KernelSupportError("IPv6 legacy nat table unavailable", 6)

    monkeypatch.setattr(IptablesBackend, "check", check)
    assert cli.main(["enable", "-f", host.config]) == 0
    assert "continuing with IPv4 only" in capsys.readouterr().err
    assert "CLAMSMTP-10030" in host.tables[4] and "CLAMSMTP-10030" not in host.tables[6]
    assert cli.main(["enable", "-f", host.config, "--ipv6"]) == ExitCode.NO_KERNEL_SUPPORT


# -- review fixes: atomic enable never rolled back, interface names, both mechanisms ----------


class NftRun:
    """Stands in for subprocess.run inside the nft backend: lists ``tables``; every ``nft -f``
    is recorded and raises ``raising`` (a timeout, a Ctrl-C)."""

    def __init__(self, tables, raising):
        self.tables, self.raising, self.scripts = tables, raising, []

    def __call__(self, argv, input=None, **kwargs):
        import json
        import subprocess

        if argv[1:] == ["-j", "list", "tables"]:
            items = [{"table": {"family": f, "name": n}} for f, n in self.tables]
            return subprocess.CompletedProcess(argv, 0, json.dumps({"nftables": items}), "")
        assert argv[1:] == ["-f", "-"], argv
        self.scripts.append(input)
        raise self.raising


@pytest.mark.parametrize(
    ("raising", "code", "message"),
    [
        (
            __import__("subprocess").TimeoutExpired(["nft", "-f", "-"], 30),
            ExitCode.FAILED,
            "did not finish in 30s and was killed",
        ),
        (KeyboardInterrupt(), 130, "interrupted during one nft transaction"),
    ],
    ids=["timeout", "ctrl-c"],
)
def test_cli_nft_enable_timed_out_or_interrupted_is_never_rolled_back(
    host, monkeypatch, capsys, raising, code, message
):
    """A rollback would be `disable`: it would delete the earlier, working installation."""
    import netsetup.backends.nft as nft_module

    run = NftRun([("inet", "clamsmtp-10030")], raising)  # an earlier installation
    monkeypatch.setattr(nft_module.subprocess, "run", run)
    monkeypatch.setattr(NftBackend, "nft_path", classmethod(lambda cls: "/usr/sbin/nft"))
    assert cli.main(["enable", "--backend", "nft", "-f", host.config, "-i", "lan0"]) == code
    out, err = capsys.readouterr()
    assert message in err and "state unknown: run status" in err
    assert "rolling back" not in out
    assert len(run.scripts) == 1  # the enable transaction only: no `delete table` after it


@pytest.mark.parametrize(
    "name", ['x";redirect#+', "lan0;", "lan 0", "a#", "+x", "++", "", "a" * 16, "lan0\n", "é0"]
)
def test_plan_rejects_unsafe_interface_names(name):
    with pytest.raises(ValueError, match="invalid interface name"):
        RedirectPlan(proxy_port=10025, interfaces=(name,))


def test_plan_accepts_interface_names_and_wildcards():
    names = ("lan0", "eth+", "+", "br-lan.10", "wg_0@x", "a" * 15, "a" * 14 + "+")
    assert RedirectPlan(proxy_port=10025, interfaces=names).interfaces == names


@pytest.mark.parametrize("backend", ["iptables", "nft"])
@pytest.mark.parametrize("name", ['x";redirect#+', 'lan0"'])
def test_cli_unsafe_interface_name_is_a_usage_error(host, monkeypatch, capsys, backend, name):
    fake = FakeNft()
    monkeypatch.setattr(NftBackend, "_nft", fake)
    argv = ["enable", "--backend", backend, "-f", host.config, "-i", name]
    assert cli.main(argv) == ExitCode.USAGE  # not 5 (not found): it is never looked up
    assert f"invalid interface name {name!r}" in capsys.readouterr().err
    assert fake.scripts == [] and host.snapshot() == FakeNat().snapshot()


def test_cli_discovered_unsafe_interface_is_skipped_with_a_warning(host, monkeypatch, capsys):
    odd = Interface('we"ird;', 9, True, False, None, (), ())
    facts = dataclasses.replace(FACTS, interfaces=(*FACTS.interfaces, odd))
    monkeypatch.setattr(discovery, "discover", lambda: facts)
    assert cli.main(["enable", "--dry-run", "--backend", "nft", "-f", host.config]) == 0
    out, err = capsys.readouterr()
    assert "skipping discovered interface: invalid interface name 'we\"ird;'" in err
    assert 'iifname "lan0"' in out and "ird" not in out.split("#!/usr/sbin/nft -f")[1]


def test_bare_plus_matches_every_interface():
    script = render_script(RedirectPlan(proxy_port=10025, interfaces=("+",)))
    assert "\t\ttcp dport 25 counter redirect to :10025\n" in script
    assert "iifname" not in script
    # iptables-legacy-save prints "-i +" as nothing: status compares with that
    assert rule_args(Rule("REDIRECT", in_interface="+", protocol="tcp", dport=25, to_port=1)) == (
        "-p tcp -m tcp --dport 25 -j REDIRECT --to-ports 1"
    )


def test_auto_does_not_pick_nft_without_the_nft_command(nat, monkeypatch):
    monkeypatch.setattr(NftBackend, "nft_path", classmethod(lambda cls: None))
    choice = choose("auto", PLAN, NFT_HOST, log=quiet)
    assert choice.backend.name == "iptables"
    assert choice.reason == "chosen by auto: the nft command is missing"
    assert any(
        "nft command is missing" in w and "apt-get install nftables" in w for w in choice.warnings
    )
    ours = (*NFT_HOST, NftTable("inet", "clamsmtp-10025", 1, 3))
    choice = choose("auto", PLAN, ours, log=quiet)
    assert choice.backend.name == "iptables"
    assert any(w.startswith("our table is in nftables") for w in choice.warnings)


def test_only_ip_ip6_inet_tables_are_ours(nat, monkeypatch):
    netdev = NftTable("netdev", "clamsmtp-10025", 1, 1)
    choice = choose("auto", PLAN, (netdev,), log=quiet)
    assert choice.backend.name == "nft"  # the host's rules (netdev) are in nftables
    assert choice.reason == "chosen by auto: the host's rules are in nftables"
    assert choice.also == ()
    assert "nftables: netdev clamsmtp-10025 (1 rules)" in choice.host
    ours = NftTable("inet", "clamsmtp-10025", 2, 5)
    assert "nftables: none" in choose("auto", PLAN, (ours,), log=quiet).host  # not host rules
    fake = FakeNft(tables=[("netdev", "clamsmtp-10025"), ("bridge", "clamsmtp-10025")])
    monkeypatch.setattr(NftBackend, "_nft", fake)
    backend = NftBackend(log=quiet)
    backend.disable(PLAN)
    assert backend.changes == 0 and fake.scripts == []
    assert not backend.owns_objects(PLAN)
    assert backend.status(PLAN) == [
        "nftables table inet clamsmtp-10025 (IPv4, IPv6): not installed"
    ]


def test_nft_unreadable_table_list_is_a_clear_error(monkeypatch):
    import subprocess

    from netsetup.errors import NetsetupError

    monkeypatch.setattr(
        NftBackend, "_nft", lambda *a, **k: subprocess.CompletedProcess(a, 0, "{oops", "")
    )
    with pytest.raises(NetsetupError, match="cannot read `nft -j list tables`"):
        NftBackend(log=quiet).disable(PLAN)


DRIFTS = {
    "dormant": (
        "table inet clamsmtp-10025 {\n\tflags dormant\n",
        "the table is dormant (flags dormant)",
    ),
    "policy-drop": (
        "policy accept;",
        "policy drop;",
    ),
    "priority": ("priority dstnat;", "priority 0;"),
}


@pytest.mark.parametrize("drift", ["dormant", "policy-drop", "priority"])
def test_nft_status_reports_dormant_table_and_chain_drift(monkeypatch, drift):
    plan = dataclasses.replace(PLAN, exempt_sources=(net("192.0.2.25/32"),))
    if drift == "dormant":
        listing = LISTED.replace("table inet clamsmtp-10025 {\n", DRIFTS[drift][0])
        problem = DRIFTS[drift][1]
    else:
        listing = LISTED.replace(*DRIFTS[drift])
        problem = "chain prerouting is `type nat hook prerouting priority"
    fake = FakeNft(tables=[("inet", "clamsmtp-10025")], listing=listing)
    monkeypatch.setattr(NftBackend, "_nft", fake)
    lines = NftBackend(log=quiet).status(plan)
    assert lines[0].endswith(": installed, NOT as planned"), lines
    assert any(line.startswith(f"  ! {problem}") for line in lines), lines


def test_nft_status_accepts_output_chain_priority_minus_100(monkeypatch):
    listing = LISTED.replace(
        "}\n}\n",
        "}\n\tchain output {\n\t\ttype nat hook output "
        "priority -100; policy accept;\n\t\tmeta skuid 105 counter return\n"
        "\t\tip saddr 192.0.2.25 counter return\n"
        "\t\tfib daddr type local counter return\n"
        "\t\ttcp dport 25 counter redirect to :10025\n\t}\n}\n",
    )
    plan = dataclasses.replace(
        PLAN, exempt_sources=(net("192.0.2.25/32"),), local=True, owner_uid=105
    )
    monkeypatch.setattr(
        NftBackend, "_nft", FakeNft(tables=[("inet", "clamsmtp-10025")], listing=listing)
    )
    lines = NftBackend(log=quiet).status(plan)
    assert lines[0].endswith(": installed"), lines


def test_cli_rules_in_both_mechanisms(host, monkeypatch, capsys):
    """enable refuses to add a second mechanism; status shows both; auto disable removes both."""
    fake = FakeNft(tables=[("inet", "fw")])
    monkeypatch.setattr(NftBackend, "_nft", fake)
    options = ["-f", host.config, "-i", "lan0"]
    assert cli.main(["enable", "--backend", "iptables", *options]) == 0
    capsys.readouterr()
    assert cli.main(["enable", "--backend", "nft", *options]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "also installed with the iptables backend" in err
    assert "run `clamsmtp-netsetup disable --backend iptables` (with the same --proxy-port)" in err
    assert fake.scripts == []
    # both at once, as an earlier build left them
    fake.tables.append(("inet", "clamsmtp-10030"))
    monkeypatch.setattr(
        discovery, "nft_tables", lambda: (NftTable("inet", "clamsmtp-10030", 1, 3),)
    )
    assert cli.main(["enable", "--backend", "iptables", *options]) == ExitCode.USAGE
    assert "disable --backend nft`" in capsys.readouterr().err
    assert cli.main(["enable", *options]) == ExitCode.USAGE  # auto too
    capsys.readouterr()
    assert cli.main(["status", *options]) == 0
    out, err = capsys.readouterr()
    assert "IPv4 (iptables-legacy, table nat): installed\n" in out
    assert "also installed with backend nft (nftables through the nft command):\n" in out
    assert "nftables table inet clamsmtp-10030 (nft list table inet clamsmtp-10030)" in out
    assert "also installed with the nft backend" in err
    assert cli.main(["disable", "--backend", "iptables", *options]) == 0
    assert "remove them with `clamsmtp-netsetup disable --backend nft`" in capsys.readouterr().err
    assert fake.scripts == []  # an explicit backend removes its own only
    assert cli.main(["enable", "--backend", "iptables", *options]) == ExitCode.USAGE
    IptablesBackend(log=quiet).enable(RedirectPlan(proxy_port=10030, interfaces=("lan0",)))
    assert cli.main(["disable", *options]) == 0  # auto: from both
    out = capsys.readouterr().out
    assert "also removing ours from backend nft:" in out
    assert host.snapshot() == FakeNat().snapshot()
    assert fake.scripts == ["add table inet clamsmtp-10030\ndelete table inet clamsmtp-10030\n"]
