"""InfectedHostLimit's table on its own: counting within the window, blocking, the end of a
block, the bound on its size, reconfiguration."""

import asyncio
import logging

import pytest

from appliance import containment
from appliance.containment import InfectedHosts


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(containment.time, "monotonic", lambda: now[0])
    return now


def table(count=3, window=60, block=300, **kw) -> InfectedHosts:
    hosts = InfectedHosts(**kw)
    hosts.configure((count, window), block)
    return hosts


def test_blocks_at_the_count_within_the_window(clock):
    hosts = table()
    assert not hosts.record("192.0.2.1") and not hosts.record("192.0.2.1")
    assert hosts.blocked_for("192.0.2.1") == 0
    assert hosts.record("192.0.2.1")  # the third: blocked now
    assert hosts.blocked_for("192.0.2.1") == 300
    assert not hosts.record("192.0.2.1")  # already blocked: not "just blocked" again
    assert hosts.blocked_for("192.0.2.2") == 0


def test_infections_older_than_the_window_do_not_count(clock):
    hosts = table()
    hosts.record("192.0.2.1")
    hosts.record("192.0.2.1")
    clock[0] += 61
    assert not hosts.record("192.0.2.1")
    assert not hosts.record("192.0.2.1")
    assert hosts.record("192.0.2.1")


def test_a_block_ends(clock, caplog):
    caplog.set_level(logging.INFO, logger="clamsmtpd")
    hosts = table(count=1)
    assert hosts.record("2001:db8::7")
    assert "host 2001:db8::7 blocked for 300 s: 1 infected messages within 60 s" in caplog.text
    clock[0] += 299
    assert hosts.blocked_for("2001:db8::7") == pytest.approx(1)
    clock[0] += 1
    assert hosts.blocked_for("2001:db8::7") == 0
    assert "host 2001:db8::7 no longer blocked" in caplog.text
    assert len(hosts) == 0


def test_the_end_is_logged_on_time_without_a_new_connection(caplog):
    caplog.set_level(logging.INFO, logger="clamsmtpd")
    async def run():
        hosts = table(count=1, block=0.05)
        assert hosts.record("192.0.2.9")
        await asyncio.sleep(0.2)
        return hosts

    hosts = asyncio.run(run())
    assert "host 192.0.2.9 no longer blocked" in caplog.text and len(hosts) == 0


def test_the_table_is_bounded(clock, caplog):
    hosts = table(count=2, max_hosts=100)
    for i in range(1000):
        hosts.record(f"10.0.{i // 256}.{i % 256}")
    assert len(hosts._recent) == 100
    for i in range(150):
        hosts.record(f"10.9.0.{i}")
        hosts.record(f"10.9.0.{i}")
    assert len(hosts) == 100
    assert "infected host table full (100): 10.9.0.0 unblocked early" in caplog.text


def test_off_by_default_and_turning_it_off_lifts_blocks(clock):
    hosts = InfectedHosts()
    assert not any(hosts.record("192.0.2.1") for _ in range(100))
    hosts.configure((1, 60), 300)
    assert hosts.record("192.0.2.1")
    hosts.configure((1, 60), 600)  # a reload that keeps the limit keeps the block
    assert hosts.blocked_for("192.0.2.1") == 300
    hosts.configure(None, 600)
    assert hosts.blocked_for("192.0.2.1") == 0 and len(hosts) == 0
