"""appliance/shared.py: what stays one for a daemon with `Workers` > 1. Two workers' views of
one DaemonState in one process see the same memory a forked pair does (an anonymous MAP_SHARED
mapping); the real fork is in tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from appliance.shared import FIRST_ID, DaemonState


@pytest.fixture
def daemon():
    """DaemonState(workers), closed after the test."""
    made = []

    def make(workers: int) -> DaemonState:
        made.append(DaemonState(workers))
        return made[-1]

    yield make
    for state in made:
        state.close()


def test_max_connections_counts_every_worker(daemon):
    state = daemon(2)
    a, b = state.worker(0), state.worker(1)
    assert [a.claim(3), b.claim(3), b.claim(3)] == [True, True, True]
    assert not a.claim(3) and not b.claim(3)  # the daemon has 3, whoever asks
    b.release()
    assert a.claim(3) and state.open_connections() == 3


def test_a_dead_workers_places_are_given_back(daemon):
    state = daemon(2)
    a, b = state.worker(0), state.worker(1)
    assert a.claim(2) and a.claim(2) and not b.claim(2)
    state.forget(0)
    assert b.claim(2) and state.open_connections() == 1


def test_sessions_leaving_give_their_place_back_once(daemon):
    state = daemon(1)
    worker = state.worker(0)
    sessions = worker.sessions()
    session = object()
    assert worker.claim(1)
    sessions.add(session)
    sessions.discard(session)
    sessions.discard(session)  # (relay's _release may run twice)
    assert state.open_connections() == 0


def test_ids_are_unique_across_workers_and_replacements(daemon):
    state = daemon(3)
    ids = [state.worker(i).connection_ids() for i in range(3)]
    seen = [next(ids[i % 3]) for i in range(30)]
    state.forget(1)
    seen += [next(state.worker(1).connection_ids()) for _ in range(5)]  # a replacement
    assert len(set(seen)) == len(seen) == 35
    assert min(seen) == FIRST_ID
    assert all(re.fullmatch("[0-9A-F]{6}", f"{i:06X}") for i in seen)


def test_the_loop_guard_sees_another_workers_connection(daemon):
    """Worker A bound and connected from port P; a connection from P that B accepts is ours.
    The same port from another address, or a port nobody holds, is not."""
    async def run() -> None:
        state = daemon(2)
        a, b = state.worker(0).own_connections(), state.worker(1).own_connections()
        port = 40000 + os.getpid() % 1000
        a.bound(port)
        waiting = asyncio.create_task(b.is_ours(("127.0.0.1", port), wait=2))
        await asyncio.sleep(0.05)  # B waits while A's connect() has not returned
        a.connected(port, ("127.0.0.1", port))
        assert await waiting
        assert await b.is_ours(("::ffff:127.0.0.1", port))  # a dual-stack listener's form
        assert not await b.is_ours(("192.0.2.7", port))
        assert not await b.is_ours(("127.0.0.1", port + 1))
        a.closed(port)
        assert not await b.is_ours(("127.0.0.1", port))

    asyncio.run(run())


def test_a_dead_workers_ports_are_forgotten(daemon):
    async def run() -> None:
        state = daemon(2)
        a, b = state.worker(0).own_connections(), state.worker(1).own_connections()
        a.bound(2525)
        a.connected(2525, ("127.0.0.1", 2525))
        state.forget(0)
        assert not await b.is_ours(("127.0.0.1", 2525), wait=0.1)

    asyncio.run(run())


def test_infected_host_limit_counts_and_blocks_for_the_daemon(daemon):
    """InfectedHostLimit 2 per 60 s: one infected message through each worker blocks the
    host in both (logged and counted once, by the worker that saw the second); a replacement
    worker asks for the blocks running and has them too."""
    async def run() -> None:
        state = daemon(2)
        a, b = state.worker(0).infected_hosts(), state.worker(1).infected_hosts()
        for hosts in (a, b):
            hosts.configure((2, 60), 30)
            hosts.start()
        assert not a.record("192.0.2.9")
        assert b.record("192.0.2.9")  # the second for the daemon: blocked now, by b
        assert 29 < a.blocked_for("192.0.2.9") <= 30 and b.blocked_for("192.0.2.9") > 29
        assert not a.blocked_for("192.0.2.10")
        a.stop()
        state.forget(0)
        replacement = state.worker(0).infected_hosts()
        replacement.configure((2, 60), 30)
        replacement.start()  # asks b
        await asyncio.sleep(0.05)  # b answers from its loop
        assert 29 < replacement.blocked_for("192.0.2.9") <= 30
        for hosts in (b, replacement):
            hosts.configure(None, 30)  # (lift the blocks: their timers are this loop's)
            hosts.stop()

    asyncio.run(run())


def test_a_clamd_one_worker_takes_out_is_out_for_every_worker(daemon):
    state = daemon(2)
    state.set_clamds(["/run/a.ctl", "b.example:3310"])
    a0, a1 = (state.worker(i).clamd_health("/run/a.ctl") for i in (0, 1))
    assert a0.up and a1.up and a0.shared
    a0.out(100.0)
    assert not a1.up and a1.next_probe == 101.0 and a1.wait == 1.0
    assert state.clamd_health() == [("/run/a.ctl", False), ("b.example:3310", True)]
    a1.up = True  # worker 1's PING answered: back for worker 0 too
    assert a0.up
    assert state.worker(0).clamd_health("not-listed:3310") is None  # (its own view then)


def test_a_reload_keeps_a_listed_clamds_health_and_gives_a_gone_ones_slot_to_a_new_one(daemon):
    state = daemon(2)
    state.set_clamds(["a:3310", "b:3310"])
    old_a, b = (state.worker(0).clamd_health(name) for name in ("a:3310", "b:3310"))
    b.out(5.0)
    state.set_clamds(["b:3310", "c:3310"])  # SIGHUP: a is gone, c new
    assert state.clamd_health() == [("c:3310", True), ("b:3310", False)]  # c took a's slot
    c = state.worker(0).clamd_health("c:3310")
    old_a.out(7.0)  # an old pool still scanning on a: its view is its own now
    assert c.up and not old_a.up
    assert state.worker(1).clamd_health("a:3310") is None
    state.set_clamds(["c:3310"])
    state.set_clamds(["b:3310", "c:3310"])  # b listed again later: afresh, not as it was
    assert state.worker(0).clamd_health("b:3310").up


def test_a_replacement_worker_gets_the_counts_below_the_limit_and_every_block(daemon):
    """InfectedHostLimit 2 per 60 s. Worker 0 dies; its replacement asks worker 1, and gets
    the blocks running (1000 here: one datagram each would overflow the inbox's buffer) and
    the infections still counted below the limit: one more infected message from a host that
    had one blocks it, as it would have with worker 0 alive."""
    async def run() -> None:
        state = daemon(2)
        a, b = state.worker(0).infected_hosts(), state.worker(1).infected_hosts()
        for hosts in (a, b):
            hosts.configure((2, 60), 30)
            hosts.start()
        blocked = [f"2001:db8::{i:x}" for i in range(1000)]
        for host in blocked:  # (b's own: the news to a, one datagram each, is not the point)
            b.record(host)
            b.record(host)
        assert not a.record("192.0.2.9")  # one of two: counted, not blocked
        await asyncio.sleep(0.05)  # b reads the news as it comes
        a.stop()
        state.forget(0)
        replacement = state.worker(0).infected_hosts()
        replacement.configure((2, 60), 30)
        replacement.start()  # asks b
        await asyncio.sleep(0.2)
        assert all(replacement.blocked_for(host) > 29 for host in blocked)
        assert replacement.record("192.0.2.9")  # the second for the daemon: blocked
        for hosts in (b, replacement):
            hosts.configure(None, 30)
            hosts.stop()

    asyncio.run(run())
