"""Unit tests of the nft backend: its script, one-transaction apply and status parsing."""

from __future__ import annotations

import dataclasses
import textwrap

import faultinject
import pytest
from netsetup_fakes import PLAN, FakeNft, net, quiet

from netsetup.backends.nft import NftBackend, render_script
from netsetup.errors import ExitCode, KernelSupportError, OperationFailed
from netsetup.plan import RedirectPlan


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
    faultinject.inject(monkeypatch, fail_after=0)
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
