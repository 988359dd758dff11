"""Fixtures of clamsmtp-netsetup's unit tests: the backend's kernel access faked (FakeNat)."""

from __future__ import annotations

import pytest
from netsetup_fakes import FakeNat

from netsetup.backends.iptables import FAIL_AFTER_ENV, IptablesBackend


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
