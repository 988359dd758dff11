"""TimeOut on the client's connection, as the channel and the relay keep it: silence counts
only while the proxy waits for the client, and a client that stops reading loses its
connection (and its MaxConnections place) within TimeOut. Found in review: each test failed
on 34930b3 (docs/dev/relay.md, "TimeOut")."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import replies as R
import test_relay_inprocess as inprocess
from test_relay_inprocess import (
    CLEAN_RESULT,
    MAX_LINE,
    STUFFED,
    Client,
    FakeScanner,
    NextHop,
    envelope,
    on_channel,
    run,
)
from tlskit import client_context, server_context

from appliance.actions import VirusActions
from appliance.addresses import Address
from appliance.channel import ClientChannel
from appliance.config import parse_config
from appliance.relay import RelayContext, RelaySession
from appliance.spool import Spool
from appliance.tls import TLSContexts


def test_time_the_proxy_was_busy_is_not_the_clients_silence():
    """TimeOut 0.2 s: after a line, the relay is busy for 0.3 s (a scan, the next hop), then
    the client's next line comes 0.05 s after the relay asks for it: it is read, not a
    timeout."""

    async def scenario(channel: ClientChannel, peer: socket.socket) -> None:
        peer.send(b"DATA\n")
        assert await channel.read_line(MAX_LINE) == b"DATA\n"
        await asyncio.sleep(0.3)
        asyncio.get_running_loop().call_later(0.05, peer.send, b"QUIT\n")
        assert await channel.read_line(MAX_LINE) == b"QUIT\n"

    on_channel(scenario)


class SlowScanner(FakeScanner):
    """A scan that takes longer than TimeOut (a big message, a busy clamd)."""

    async def scan(self, spool: Spool, log: logging.LoggerAdapter | None = None):
        await asyncio.sleep(1.5)
        return await super().scan(spool, log)


def test_a_scan_longer_than_timeout_does_not_time_the_client_out_after_its_250(
        tmp_path, monkeypatch):
    """TimeOut: 1 and a 1.5 s scan: the client gets its 250, then its next command an answer
    (it got `421 timeout` at once, before it could send anything)."""
    monkeypatch.setattr(inprocess, "FakeScanner", SlowScanner)

    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        assert await client.say(b"DATA\r\n") == R.START_DATA
        assert (await client.say(STUFFED)).startswith("250 ")
        assert (await client.say(b"NOOP\r\n")).startswith("250")
        assert await client.say(b"QUIT\r\n") == "221 2.0.0 Bye"

    run(tmp_path, scenario, config="TimeOut: 1\n")


def test_a_client_that_never_reads_loses_its_place_within_timeout(tmp_path, caplog):
    """A client pipelines commands and never reads the replies: after TimeOut the session
    logs the write timeout and its connection is cut. A graceful close waited, with no limit,
    for the client to take the replies: the session kept its MaxConnections place for as long
    as the client kept its window shut."""
    hop = NextHop(tmp_path / "nexthop.sock")
    spool = tmp_path / "spool"
    spool.mkdir()
    text = f"OutAddress: 10025\nTempDirectory: {spool}\nTimeOut: 1\n"

    async def main() -> None:
        server = await asyncio.start_unix_server(hop.serve, path=str(hop.path))
        context = RelayContext(
            parse_config(text, "inprocess.conf"), FakeScanner(CLEAN_RESULT),
            lambda ip, transport: Address(path=str(hop.path)), VirusActions(None),
            tls=TLSContexts(None, None, None),
        )
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        session = RelaySession(context)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: session.channel, sock=ours)
        flood = b"BDAT 1\r\n" * 400_000  # each answered by the proxy itself, never read
        sent = 0
        try:
            end = loop.time() + 4
            while loop.time() < end and sent < len(flood):
                try:
                    sent += theirs.send(flood[sent:sent + 65536])
                except BlockingIOError:
                    await asyncio.sleep(0.05)
                except OSError:  # the proxy cut the connection
                    break
            while loop.time() < end and context.sessions:
                await asyncio.sleep(0.05)
            assert not context.sessions, "the client that never reads still holds its place"
        finally:
            theirs.close()
            server.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "network write operation timed out (client)" in caplog.text


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_tls_connection_closed_twice_still_ends_within_timeout(loop, tls_certs):
    """The relay closes a session's channel twice (after its 421, then in its `finally`). A
    second close() of a TLS transport drops its SSL protocol (asyncio's and uvloop's alike),
    and with it the abort TimeOut after the first: a client that neither reads nor answers
    the close_notify kept its connection, and its MaxConnections place, for the TLS layer's own
    30 s shutdown timeout (review, session 3)."""
    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    async def main() -> float | None:
        aio = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        made: list[ClientChannel] = []
        lost = aio.create_future()
        await aio.connect_accepted_socket(
            lambda: ClientChannel(0.3, made.append, lambda: lost.done() or lost.set_result(1)),
            sock=ours)
        client = aio.run_in_executor(None, lambda: client_context(tls_certs).wrap_socket(
            theirs, server_hostname="proxy.test"))  # then it reads nothing, ever
        await made[0].start_tls(server_context(tls_certs.proxy), 5)
        tls_client = await client
        started = aio.time()
        made[0].close()
        made[0].close()
        try:
            await asyncio.wait_for(lost, 3)
            return aio.time() - started
        except TimeoutError:
            return None
        finally:
            made[0].abort()
            tls_client.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        took = runner.run(main())
    assert took is not None, "the connection outlived TimeOut (0.3 s) by more than 3 s"
