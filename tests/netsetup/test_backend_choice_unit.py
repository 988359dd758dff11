"""Unit tests of choosing the backend (auto, explicit) and of which nft tables are ours."""

from __future__ import annotations

import pytest
from netsetup_fakes import NFT_HOST, PLAN, FakeNft, quiet

from netsetup.backends import choose, get_backend
from netsetup.backends.iptables import IptablesBackend
from netsetup.backends.nft import NftBackend
from netsetup.discovery import NftTable
from netsetup.errors import KernelSupportError, UsageError


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
    assert not backend.survey(PLAN, (netdev, NftTable("bridge", "clamsmtp-10025", 1, 1))).ours
    assert backend.status(PLAN) == [
        "nftables table inet clamsmtp-10025 (IPv4, IPv6): not installed"
    ]


def test_auto_without_python_iptables_names_what_is_missing(nat, monkeypatch):
    monkeypatch.setattr(IptablesBackend, "is_supported", classmethod(lambda cls: False))
    monkeypatch.setattr(NftBackend, "nft_path", classmethod(lambda cls: "/usr/sbin/nft"))
    choice = choose("auto", PLAN, (), log=quiet)
    assert choice.backend.name == "nft"
    assert choice.reason == "chosen by auto: python-iptables cannot be imported"
    assert choice.host == "legacy xtables: none; nftables: none"
    monkeypatch.setattr(NftBackend, "nft_path", classmethod(lambda cls: None))
    with pytest.raises(KernelSupportError, match=r"no backend works here: tried iptables "
                       r"\(legacy xtables through python-iptables\), nft \(nftables through"):
        choose("auto", PLAN, (), log=quiet)
