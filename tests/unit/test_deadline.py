"""deadline.Deadline (one timer per connection) and the next hop's reply reader built on it
(upstream.Upstream), against a real loop and a real socket pair: no mocks, well under a second."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from helpers import free_port

from appliance.addresses import Address
from appliance.deadline import Deadline, SharedDeadlines, current_expiry
from appliance.upstream import MAX_REPLY_LINE, READ_HIGH_WATER, Upstream, UpstreamError, _NextHop


def _expiries(script) -> list[float]:
    """Run `script(deadline)` on a fresh loop; the loop times (from its start) of each expiry."""
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(round(loop.time() - start, 2)))
        await script(deadline)
        deadline.close()
        return fired
    return asyncio.run(main())


def test_short_waits_never_expire():
    async def script(deadline: Deadline) -> None:
        for _ in range(20):
            deadline.start(0.1)
            await asyncio.sleep(0.01)
            deadline.stop()
        await asyncio.sleep(0.15)  # the timer fires, with no wait on: nothing happens
    assert _expiries(script) == []


def test_a_wait_gets_its_whole_time_even_when_the_timer_was_set_earlier():
    async def script(deadline: Deadline) -> None:
        deadline.start(0.2)  # the timer: at 0.2
        await asyncio.sleep(0.05)
        deadline.stop()
        await asyncio.sleep(0.05)
        deadline.start(0.2)  # from 0.1: ends at 0.3, not at the timer's 0.2
        await asyncio.sleep(0.4)
    (fired,) = _expiries(script)
    assert 0.29 <= fired <= 0.36


def test_a_shorter_wait_than_the_timer_is_set_for_expires_on_time():
    async def script(deadline: Deadline) -> None:
        deadline.start(10)
        deadline.stop()
        deadline.start(0.05)
        await asyncio.sleep(0.2)
    (fired,) = _expiries(script)
    assert fired < 0.15


def test_expires_once_per_wait():
    async def script(deadline: Deadline) -> None:
        deadline.start(0.05)
        await asyncio.sleep(0.2)
        deadline.start(0.05)
        await asyncio.sleep(0.2)
    assert len(_expiries(script)) == 2


def _with_next_hop(script):
    """`script(upstream, peer)`: an Upstream on one end of a socket pair, the other end
    (blocking) playing the next hop."""
    async def main():
        ours, theirs = socket.socketpair()
        theirs.settimeout(5)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(lambda: _NextHop(loop), sock=ours)
        upstream = Upstream(transport, protocol, 0.3, "peer")
        try:
            return await script(upstream, theirs)
        finally:
            upstream.close()
            theirs.close()
    return asyncio.run(main())


def test_a_reply_over_several_reads_and_lines():
    async def script(upstream: Upstream, peer: socket.socket):
        peer.sendall(b"250-first\r\n250-sec")
        read = asyncio.ensure_future(upstream.read_reply())
        await asyncio.sleep(0.02)
        peer.sendall(b"ond\r\n250 last\r\n220 next\r\n")
        return await read, await upstream.read_reply()
    reply, after = _with_next_hop(script)
    assert reply.code == 250 and reply.lines == (b"250-first", b"250-second", b"250 last")
    assert after.lines == (b"220 next",)


def test_an_over_long_line_is_cut_and_the_rest_thrown_away():
    async def script(upstream: Upstream, peer: socket.socket):
        peer.sendall(b"250 " + b"h" * (3 * READ_HIGH_WATER) + b"\r\n250 ok\r\n")
        return await upstream.read_reply(), await upstream.read_reply()
    long, after = _with_next_hop(script)
    assert long.lines == (b"250 " + b"h" * (MAX_REPLY_LINE - 4),)
    assert after.lines == (b"250 ok",)


@pytest.mark.parametrize(("said", "error"), [
    (b"", "network read operation timed out (server)"),
    (b"250 partial", "network read operation timed out (server)"),
    (b"hello\r\n", "unexpected reply from server: b'hello'"),
    (b"250-a\r\n251 b\r\n", "server reply changed its code mid-reply"),
])
def test_no_reply(said, error):
    async def script(upstream: Upstream, peer: socket.socket) -> str:
        peer.sendall(said)
        with pytest.raises(UpstreamError) as caught:
            await upstream.read_reply()
        return str(caught.value)
    assert _with_next_hop(script) == error


def test_the_next_hop_closing_before_its_reply():
    async def script(upstream: Upstream, peer: socket.socket) -> tuple[str, bool]:
        peer.sendall(b"250 cut sho")
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(UpstreamError) as caught:
            await upstream.read_reply()
        return str(caught.value), upstream.at_eof
    assert _with_next_hop(script) == ("server closed the connection", True)


def test_a_next_hop_that_talks_unasked_is_not_read_past_the_high_water_mark():
    async def script(upstream: Upstream, peer: socket.socket) -> tuple[int, bytes]:
        peer.setblocking(False)
        sent = 0
        try:
            while sent < 64 * READ_HIGH_WATER:  # until the socket buffers are full
                sent += peer.send(b"250 unasked\r\n" * 1000)
                await asyncio.sleep(0)
        except BlockingIOError:
            pass
        await asyncio.sleep(0.05)
        held = len(upstream._protocol.buffer)
        return held, (await upstream.read_reply()).lines[0]
    held, first = _with_next_hop(script)
    assert held <= READ_HIGH_WATER + 65536 and first == b"250 unasked"


def test_closing_a_next_hop_that_stopped_reading_lets_go_of_the_connection():
    """A next hop that never reads (a zero window): what was written to it stays in the
    transport's buffer; close() then aborts, instead of keeping the connection, its fd and the
    bytes for as long as the next hop keeps its window shut."""
    async def script(upstream: Upstream, peer: socket.socket) -> bool:
        protocol = upstream._protocol
        upstream._transport.set_write_buffer_limits(high=1 << 24)  # (send() does not wait)
        await upstream.send(b"x" * (8 << 20))  # far more than the socket buffers hold
        assert upstream._transport.get_write_buffer_size()
        upstream.close()
        for _ in range(10):
            await asyncio.sleep(0.01)
        return protocol.lost
    assert _with_next_hop(script)


# -- SharedDeadlines: many waits (the scans of one clamd), one timer --------------------------


def _shared(script) -> tuple[list[tuple[str, float]], int]:
    """Run `script(shared, fire)` on a fresh loop; (key, loop time from the start) of each
    expiry, and the TimerHandles the loop was given."""
    async def main() -> tuple[list[tuple[str, float]], int]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[tuple[str, float]] = []
        made = 0
        call_at = loop.call_at

        def counting_call_at(when, callback, *args, **kwargs):  # (the real one, counted)
            nonlocal made
            made += callback == shared._fire  # (not asyncio.sleep's own)
            return call_at(when, callback, *args, **kwargs)

        loop.call_at = counting_call_at  # type: ignore[method-assign]
        shared = SharedDeadlines(loop)

        def fire(key: str):
            return lambda: fired.append((key, round(loop.time() - start, 1)))

        await script(shared, fire, start)
        return fired, made
    return asyncio.run(main())


def test_shared_deadlines_expire_each_wait_at_its_own_end():
    async def script(shared: SharedDeadlines, fire, start: float) -> None:
        shared.arm("a", start + 0.2, fire("a"))
        shared.arm("b", start + 0.4, fire("b"))
        shared.arm("c", start + 0.3, fire("c"))
        await asyncio.sleep(0.1)
        shared.disarm("c")  # ended in time
        await asyncio.sleep(0.4)
    fired, _ = _shared(script)
    assert fired == [("a", 0.2), ("b", 0.4)]


def test_shared_deadlines_moved_later_and_many_short_waits_cost_one_timer():
    async def script(shared: SharedDeadlines, fire, start: float) -> None:
        loop = asyncio.get_running_loop()
        for i in range(50):  # fifty scans, each well within its time
            shared.arm(i, loop.time() + 0.3, fire(str(i)))
            await asyncio.sleep(0.002)
            shared.arm(i, loop.time() + 0.3, fire(str(i)))  # (the next operation of the scan)
            shared.disarm(i)
        shared.arm("late", loop.time() + 0.1, fire("late"))
        shared.arm("late", loop.time() + 0.2, fire("late"))  # moved: expires at its new end
        await asyncio.sleep(0.5)
    fired, made = _shared(script)
    assert [key for key, _ in fired] == ["late"]
    assert made <= 3  # the first arm, and the handle set again after it fired with waits left


def test_a_connect_that_does_not_complete_times_out_after_timeout():
    """The connect to the next hop is timed by the connection's Deadline (no timer of its own):
    a listener on loopback whose accept queue is full drops the SYN, so connect never ends."""
    port = free_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    waiting = []
    try:
        for _ in range(4):  # fill the accept queue (nobody accepts)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(0.2)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                break
            waiting.append(sock)

        async def main() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamError, match="connection timed out"):
                await Upstream.connect(Address(host="127.0.0.1", port=port), 0.3)
            return loop.time() - started

        assert 0.25 <= asyncio.run(main()) < 2
    finally:
        for sock in waiting:
            sock.close()
        listener.close()


def test_a_wait_whose_on_expiry_raises_leaves_the_others_their_timer():
    """Every wait of the loop shares one handle (781eb41): an on_expiry that raised left it
    unset, and every other wait, in the same batch or later, never expired (review, session 3:
    the scan's guard raised RuntimeError for an expiring Timeout)."""
    def boom() -> None:
        raise RuntimeError("an on_expiry that fails")

    async def script(shared: SharedDeadlines, fire, start: float) -> None:
        loop = asyncio.get_running_loop()
        errors: list[object] = []
        loop.set_exception_handler(lambda _, context: errors.append(context.get("exception")))
        shared.arm("boom", start + 0.1, boom)
        shared.arm("same batch", start + 0.1, fire("same batch"))
        shared.arm("later", start + 0.3, fire("later"))
        await asyncio.sleep(0.5)
        assert [str(e) for e in errors] == ["an on_expiry that fails"]

    fired, _ = _shared(script)
    assert sorted(key for key, _ in fired) == ["later", "same batch"]


def test_expiry_cancels_its_task_and_tells_its_own_cancellation_from_anothers():
    """deadline.Expiry, asyncio.timeout's cancel-and-convert without its context manager."""

    async def waits(expiry_holder: list) -> str:
        expiry = current_expiry(asyncio.get_running_loop())
        expiry_holder.append(expiry)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "timed out" if expiry.timed_out() else "cancelled"
        return "slept"

    async def main() -> tuple[str, str]:
        held: list = []
        mine = asyncio.get_running_loop().create_task(waits(held))
        await asyncio.sleep(0.01)
        held[0].expire()
        held[0].expire()  # (once only)
        other = asyncio.get_running_loop().create_task(waits(held))
        await asyncio.sleep(0.01)
        other.cancel()  # somebody else's cancellation: not a timeout
        return await mine, await other

    assert asyncio.run(main()) == ("timed out", "cancelled")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reply_that_moves_just_as_its_time_is_up_still_times_out(loop):
    """read_reply arms TimeOut once for a whole reply, over several waits. A part of the reply
    that arrives in the same loop iteration as the expiry has already woken the wait: the shared
    timer found its waiter done and dropped the entry, and the next wait, for the rest of the
    reply, had no deadline at all: a next hop that then stalled held the session for ever
    (review F6). Blocking the loop past TimeOut with the bytes already sent makes that race."""
    async def main() -> str:
        ours, theirs = socket.socketpair()
        running = asyncio.get_running_loop()
        transport, protocol = await running.create_connection(lambda: _NextHop(running), sock=ours)
        upstream = Upstream(transport, protocol, 0.3, "peer")
        try:
            read = asyncio.ensure_future(upstream.read_reply())
            await asyncio.sleep(0.05)  # read_reply waits, its TimeOut (0.3 s) armed
            theirs.sendall(b"250-part of a reply")
            time.sleep(0.4)  # past TimeOut: the bytes and the expiry come in one iteration
            with pytest.raises(UpstreamError) as caught:
                await asyncio.wait_for(read, 3)
            return str(caught.value)
        finally:
            upstream.close()
            theirs.close()

    factory = pytest.importorskip("uvloop").new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == "network read operation timed out (server)"


def test_an_on_expiry_that_arms_again_does_not_put_off_the_waits_left():
    """An on_expiry that arms a wait again (for later) set the one handle for that later end;
    `_fire` then left it there, and a wait left with an earlier end expired only at that later
    one (review F7)."""
    async def script(shared: SharedDeadlines, fire, start: float) -> None:
        loop = asyncio.get_running_loop()
        noted = fire("again")

        def again() -> None:
            noted()
            shared.arm("again", loop.time() + 0.6, fire("again, later"))

        shared.arm("again", start + 0.1, again)
        shared.arm("left", start + 0.2, fire("left"))
        await asyncio.sleep(0.9)

    fired, _ = _shared(script)
    assert fired == [("again", 0.1), ("left", 0.2), ("again, later", 0.7)]
