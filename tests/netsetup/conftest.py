"""Fixtures of clamsmtp-netsetup's unit tests: the backend's kernel access faked (FakeNat)."""

from __future__ import annotations

import pytest
from netsetup_fakes import FakeNat, FakeRouting

from netsetup import routing
from netsetup.backends.iptables import FAIL_AFTER_ENV, IptablesBackend
from netsetup.errors import OperationFailed


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
    real_apply = routing.PolicyRouting._apply

    def kernel_apply(self, op):
        if self.dry_run:
            return real_apply(self, op)
        self.log(f"  {op}")
        self.changes += 1
        try:
            fake.apply(op)
        except OSError as error:
            raise OperationFailed(op, str(error)) from error

    monkeypatch.setattr(routing.PolicyRouting, "_apply", kernel_apply)
    monkeypatch.setattr(routing.PolicyRouting, "read", lambda self, plan, f: fake.state(f))
    return fake
