"""Unit tests of the clamsmtp-netsetup command: output, exit codes, rollback, both backends."""

from __future__ import annotations

import dataclasses
import os
import time

import faultinject
import pytest
from netsetup_fakes import FACTS, NFT_HOST, FakeNat, FakeNft, fake_root_host, quiet

from netsetup import cli, discovery
from netsetup.backends.iptables import IptablesBackend, enable_ops
from netsetup.backends.nft import NftBackend
from netsetup.discovery import HostFacts, Interface, NftTable
from netsetup.errors import ExitCode, KernelSupportError
from netsetup.plan import RedirectPlan


@pytest.fixture
def host(nat, monkeypatch, tmp_path):
    """Root, the interfaces above, no nftables rules, a config with Listen: 10030."""
    return fake_root_host(nat, monkeypatch, tmp_path, "OutAddress: 10025\nListen: 10030\n")


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


def test_no_environment_variable_makes_netsetup_fail_or_wait(host, monkeypatch, capsys):
    """An admin's environment cannot make the firewall tool fail on purpose: the old test
    hooks NETSETUP_FAIL_AFTER and NETSETUP_CHANGE_DELAY are read by nothing in the product
    (the tests inject their faults with faultinject.py)."""
    monkeypatch.setenv("NETSETUP_FAIL_AFTER", "0")
    monkeypatch.setenv("NETSETUP_CHANGE_DELAY", "30")
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    assert "injected" not in capsys.readouterr().err
    assert slept == []
    assert cli.main(["disable", "-f", host.config]) == 0
    assert host.snapshot() == FakeNat().snapshot()


def test_cli_rollback_after_failure_half_way(host, monkeypatch, capsys):
    # IPv4 done, IPv6 chain created, its 1st rule fails
    faultinject.inject(monkeypatch, fail_after=5)
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


def test_cli_defaulted_ipv6_dropped_when_unsupported(host, monkeypatch, capsys):
    def check(self, plan):
        if 6 in plan.families:
            raise KernelSupportError("IPv6 legacy nat table unavailable", 6)

    monkeypatch.setattr(IptablesBackend, "check", check)
    assert cli.main(["enable", "-f", host.config]) == 0
    assert "continuing with IPv4 only" in capsys.readouterr().err
    assert "CLAMSMTP-10030" in host.tables[4] and "CLAMSMTP-10030" not in host.tables[6]
    assert cli.main(["enable", "-f", host.config, "--ipv6"]) == ExitCode.NO_KERNEL_SUPPORT


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


def test_without_the_netsetup_extra_it_says_what_to_install():
    """`pip install .` has no pyroute2 (it is the netsetup extra): the command died with
    `No module named 'pyroute2'` and nothing about what to do."""
    import subprocess
    import sys

    hide = "import sys; sys.modules['pyroute2'] = None; from netsetup.cli import main; " \
           "sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", hide, "enable", "-i", "lo", "--dry-run"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == ExitCode.FAILED, result.stderr
    assert "the Python module pyroute2 (package pyroute2) is missing" in result.stderr
    assert "pip install 'clamsmtp[netsetup]'" in result.stderr
    assert "apt-get install python3-pyroute2 python3-iptables" in result.stderr
    assert "Traceback" not in result.stderr
