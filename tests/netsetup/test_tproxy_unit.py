"""--mode tproxy (TransparentProxy: full): the mangle TPROXY layout, the policy routing, and
the CLI around them: exact ordered operations, as for REDIRECT (no root, no kernel)."""

from __future__ import annotations

import faultinject
import pytest
from netsetup_fakes import FakeNat, FakeNft, fake_root_host

from netsetup import cli, discovery
from netsetup.backends.iptables import enable_ops
from netsetup.backends.nft import NftBackend, render_script
from netsetup.discovery import NftTable
from netsetup.errors import ExitCode
from netsetup.plan import Mode, RedirectPlan
from netsetup.routing import RouteState, disable_ops
from netsetup.routing import enable_ops as route_ops

TPROXY = RedirectPlan(proxy_port=10025, interfaces=("lan0",), mode=Mode.TPROXY)

ROUTING_V4 = [
    "ip -4 route add local 0.0.0.0/0 dev lo table 10025",
    "ip -4 rule add fwmark 0x2729/0xffff lookup 10025 priority 9025",
]
MANGLE_V4 = [
    "iptables-legacy -t mangle -N CLAMSMTP-10025",
    "iptables-legacy -t mangle -A CLAMSMTP-10025 -p tcp -m socket --transparent "
    "-j MARK --set-xmark 0x2729/0xffff",
    "iptables-legacy -t mangle -A CLAMSMTP-10025 -p tcp -m socket --transparent -j RETURN",
    "iptables-legacy -t mangle -A CLAMSMTP-10025 -m addrtype --dst-type LOCAL -j RETURN",
    "iptables-legacy -t mangle -A CLAMSMTP-10025 -i lan0 -p tcp -m tcp --dport 25 -j TPROXY "
    "--on-port 10025 --on-ip 0.0.0.0 --tproxy-mark 0x2729/0xffff",
    "iptables-legacy -t mangle -I PREROUTING 1 -j CLAMSMTP-10025",
]


def test_tproxy_layout_marks_established_flows_then_exempts_then_tproxies():
    assert [str(op) for op in enable_ops(TPROXY, 4)] == MANGLE_V4
    v6 = [str(op) for op in enable_ops(TPROXY, 6)]
    assert v6[4].endswith("-j TPROXY --on-port 10025 --on-ip :: --tproxy-mark 0x2729/0xffff")
    assert all(op.startswith("ip6tables-legacy -t mangle ") for op in v6)


def test_policy_routing_ops_and_exact_removal():
    assert [str(op) for op in route_ops(TPROXY, 4)] == ROUTING_V4
    removal = [str(op) for op in disable_ops(TPROXY, 6, RouteState(2, 1, 0))]
    assert removal == ["ip -6 rule del fwmark 0x2729/0xffff lookup 10025 priority 9025"] * 2 + [
        "ip -6 route del local ::/0 dev lo table 10025"]


def test_local_cannot_be_tproxied():
    with pytest.raises(ValueError, match="--local cannot work with --mode tproxy"):
        RedirectPlan(proxy_port=10025, local=True, owner_uid=1, mode=Mode.TPROXY)


def test_nft_tproxy_script_is_one_mangle_priority_filter_chain():
    script = render_script(TPROXY)
    assert "\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; " \
           "policy accept;\n" in script
    assert ("\t\tmeta l4proto tcp socket transparent 1 counter "
            "meta mark set meta mark & 0xffff2729 | 0x00002729\n") in script
    assert ('\t\tiifname "lan0" tcp dport 25 counter meta mark set meta mark & 0xffff2729 | '
            "0x00002729 tproxy to :10025 accept\n") in script
    assert "redirect" not in script and "type nat" not in script


@pytest.fixture
def host(nat, monkeypatch, tmp_path):
    return fake_root_host(nat, monkeypatch, tmp_path, "TransparentProxy: full\nListen: 10025\n")


def _commands(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.startswith("  ")]


def test_transparent_proxy_full_in_the_config_means_tproxy(host, capsys):
    assert cli.main(["enable", "-f", host.config, "-i", "lan0", "--ipv4"]) == 0
    out = capsys.readouterr().out
    assert "mode:        tproxy (mode from " in out and ": TransparentProxy: full)" in out
    assert _commands(out) == ROUTING_V4 + MANGLE_V4  # the route before the rules that use it
    assert host.routing.rules == {4: 1, 6: 0} and host.routing.routes == {4: 1, 6: 0}
    assert "CLAMSMTP-10025" in host.mangle[4] and "CLAMSMTP-10025" not in host.tables[4]


def test_enable_twice_converges(host, capsys):
    for _ in range(2):
        assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    assert host.routing.rules == {4: 1, 6: 1} and host.routing.routes == {4: 1, 6: 1}
    assert [r.target for r in host.mangle[4]["PREROUTING"]] == ["CLAMSMTP-10025"]


def test_mode_redirect_overrides_the_config_and_removes_tproxy_leftovers(host, capsys):
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    assert cli.main(["enable", "-f", host.config, "-i", "lan0", "--mode", "redirect"]) == 0
    assert host.routing.rules == {4: 0, 6: 0} and host.routing.routes == {4: 0, 6: 0}
    assert "CLAMSMTP-10025" not in host.mangle[4] and "CLAMSMTP-10025" in host.tables[4]


def test_disable_removes_rules_then_routing_and_nothing_else(host, capsys):
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    host.routing.other_routes[4] = 0
    capsys.readouterr()
    assert cli.main(["disable", "-f", host.config]) == 0
    out = capsys.readouterr().out
    commands = _commands(out)
    assert commands.index("ip -4 rule del fwmark 0x2729/0xffff lookup 10025 priority 9025") > \
        commands.index("iptables-legacy -t mangle -X CLAMSMTP-10025")
    assert host.snapshot() == FakeNat().snapshot()
    assert host.routing.rules == {4: 0, 6: 0} and host.routing.routes == {4: 0, 6: 0}
    assert "removed: our rules for proxy port 10025 (IPv4, IPv6)" in out


def test_hand_deleted_route_is_shown_by_status_and_put_back_by_enable(host, capsys):
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    host.routing.routes[6] = 0  # ip -6 route del local ::/0 dev lo table 10025
    capsys.readouterr()
    assert cli.main(["status", "-f", host.config, "-i", "lan0"]) == 0
    out = capsys.readouterr().out
    assert "  policy rule IPv4: present: ip -4 rule fwmark 0x2729/0xffff lookup 10025 " \
           "priority 9025" in out
    assert "  ! policy route IPv6: MISSING: ip -6 route local ::/0 dev lo table 10025" in out
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == 0
    assert host.routing.routes == {4: 1, 6: 1}


def test_a_failed_mangle_change_rolls_back_rules_and_routing(host, capsys):
    host.fail_on = MANGLE_V4[4]
    code = cli.main(["enable", "-f", host.config, "-i", "lan0", "--ipv4"])
    assert code == ExitCode.FAILED
    assert "(rolled back)" in capsys.readouterr().err
    assert host.snapshot() == FakeNat().snapshot()
    assert host.routing.rules == {4: 0, 6: 0} and host.routing.routes == {4: 0, 6: 0}


def test_a_failed_route_rolls_back_before_any_rule(host, capsys):
    host.routing.fail_on = ROUTING_V4[1]
    assert cli.main(["enable", "-f", host.config, "-i", "lan0", "--ipv4"]) == ExitCode.FAILED
    assert host.snapshot() == FakeNat().snapshot()
    assert host.routing.routes == {4: 0, 6: 0}


def test_a_routing_table_with_foreign_routes_is_refused(host, capsys):
    host.routing.other_routes[4] = 1
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == ExitCode.FAILED
    assert "routing table 10025 holds routes that are not ours" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--local", "--user", "0"], "--local cannot work with --mode tproxy"),
    (["--mode", "tproxy", "-f", "LISTEN_ONE"], "TPROXY needs clamsmtpd on every address"),
])
def test_where_tproxy_cannot_work_it_is_refused_and_nothing_changes(host, capsys, tmp_path,
                                                                     args, message):
    one = tmp_path / "one.conf"
    one.write_text("TransparentProxy: full\nListen: 192.0.2.1:10025\n")
    args = [str(one) if a == "LISTEN_ONE" else a for a in args]
    if "-f" not in args:
        args += ["-f", host.config]
    assert cli.main(["enable", "-i", "lan0", *args]) == ExitCode.USAGE
    assert message in capsys.readouterr().err
    assert host.snapshot() == FakeNat().snapshot()
    assert host.routing.applied == []


def test_status_before_enable_says_not_installed(host, capsys):
    assert cli.main(["status", "-f", host.config, "-i", "lan0", "--ipv4"]) == 0
    out = capsys.readouterr().out
    assert "  policy routing IPv4: not installed (ip -4 rule fwmark 0x2729/0xffff lookup 10025 " \
           "priority 9025; ip -4 route local 0.0.0.0/0 dev lo table 10025)" in out
    assert "MISSING" not in out


def test_a_refused_route_removal_fails_disable_but_a_vanished_one_does_not(host, capsys):
    assert cli.main(["enable", "-f", host.config, "-i", "lan0", "--ipv4"]) == 0
    host.routing.fail_on = "ip -4 route del local 0.0.0.0/0 dev lo table 10025"
    assert cli.main(["disable", "-f", host.config, "--ipv4"]) == ExitCode.FAILED
    assert "Invalid argument" in capsys.readouterr().err
    assert host.routing.routes == {4: 1, 6: 0}  # still there, and said so
    host.routing.fail_on = None
    host.routing.routes[4] = 0  # gone by hand meanwhile, the rule still there
    assert cli.main(["disable", "-f", host.config, "--ipv4"]) == 0
    assert host.routing.rules == {4: 0, 6: 0}


def test_foreign_routes_with_the_nft_backend_remove_our_table_too(host, monkeypatch, capsys):
    """Refused after enable's first step removed our ip rule and route: the nft table of an
    earlier enable is removed as well (it would TPROXY without a route), as with iptables."""
    fake = FakeNft(tables=[("inet", "clamsmtp-10025")])
    monkeypatch.setattr(NftBackend, "_nft", fake)
    monkeypatch.setattr(discovery, "nft_tables", lambda: (NftTable("inet", "clamsmtp-10025",
                                                                   1, 5),))
    host.routing.rules, host.routing.routes, host.routing.other_routes[4] = {4: 1, 6: 1}, {
        4: 1, 6: 1}, 1
    assert cli.main(["enable", "-f", host.config, "-i", "lan0"]) == ExitCode.FAILED
    out, err = capsys.readouterr()
    assert "routing table 10025 holds routes that are not ours" in err
    assert "enable failed; rolling back" in out
    assert fake.scripts == ["add table inet clamsmtp-10025\ndelete table inet clamsmtp-10025\n"]
    assert host.routing.rules == {4: 0, 6: 0} and host.routing.routes == {4: 0, 6: 0}


def test_an_injected_routing_failure_is_rolled_back(host, monkeypatch, capsys):
    faultinject.inject(monkeypatch, fail_after=1)
    assert cli.main(["enable", "-f", host.config, "-i", "lan0", "--ipv4"]) == ExitCode.FAILED
    assert f"{ROUTING_V4[1]}`: injected failure" in capsys.readouterr().err
    assert host.routing.applied == ROUTING_V4[:1] + [
        "ip -4 route del local 0.0.0.0/0 dev lo table 10025"]
    assert host.snapshot() == FakeNat().snapshot()
