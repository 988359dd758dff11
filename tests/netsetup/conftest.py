"""Fixtures of clamsmtp-netsetup's unit tests: the backend's kernel access faked (FakeNat)."""

from __future__ import annotations

import pytest
from netsetup_fakes import FakeNat, FakeRouting

from netsetup import routing
from netsetup.backends.iptables import IptablesBackend


@pytest.fixture
def nat(monkeypatch):
    """Route the backend's kernel access to a FakeNat; record what _apply receives."""
    fake = FakeNat()
    fake.applied = []
    real_apply = IptablesBackend._apply

    def recording_apply(self, op):
        fake.applied.append(str(op))
        return real_apply(self, op)

    monkeypatch.setattr(IptablesBackend, "_apply", recording_apply)
    monkeypatch.setattr(IptablesBackend, "_make", lambda self, op: fake.apply(op))
    monkeypatch.setattr(IptablesBackend, "_read_state",
                        lambda self, f, t="nat": fake.state(f, t))
    monkeypatch.setattr(IptablesBackend, "_rows", lambda self, f, c, t="nat": fake.rows(f, c, t))
    monkeypatch.setattr(IptablesBackend, "is_supported", classmethod(lambda cls: True))
    monkeypatch.setattr(IptablesBackend, "check", lambda self, plan: None)
    monkeypatch.setattr(IptablesBackend, "host_rules", lambda self: {})
    fake.routing = _fake_routing(monkeypatch)
    return fake


def _fake_routing(monkeypatch) -> FakeRouting:
    """PolicyRouting's netlink reads and writes go to a FakeRouting (no real ip rules)."""
    fake = FakeRouting()
    monkeypatch.setattr(routing.PolicyRouting, "_make", lambda self, op: fake.apply(op))
    monkeypatch.setattr(routing.PolicyRouting, "read", lambda self, plan, f: fake.state(f))
    return fake
