"""The relay and its DATA phase in one process: a real RelaySession on one end of a socket
pair, a scripted next hop on a unix socket, a fake scanner. No clamd, no daemon, no port: each
test runs in well under a second. The real-peer tests (tests/integration, tests/faults) stay
the proof of behaviour; these pin the seams (docs/dev/relay.md) where a failure is quick to read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import replies as R
from tlskit import client_context, server_context

from appliance.actions import VirusActions
from appliance.addresses import Address
from appliance.channel import HIGH_WATER, ClientChannel, ClientGone, LineBuffer, LineTooLong
from appliance.config import parse_config
from appliance.instream import CLEAN, ERROR, VIRUS, ScanResult
from appliance.relay import MAX_LINE, RelayContext, RelaySession
from appliance.spool import Spool
from appliance.tls import TLSContexts

WAIT = 5.0  # seconds any one step may take before the test fails (never reached when green)


# -- the sans-IO line buffer -------------------------------------------------------------------


def test_line_buffer_gives_lines_as_they_complete():
    buffer = LineBuffer()
    buffer.feed(b"NOOP\r\nMAIL FROM:<a>\r\nRC")
    assert buffer.line(MAX_LINE) == b"NOOP\r\n"
    assert buffer.peek_line(MAX_LINE) == b"MAIL FROM:<a>\r\n"
    assert buffer.line(MAX_LINE) == b"MAIL FROM:<a>\r\n"
    assert buffer.line(MAX_LINE) is None
    buffer.feed(b"PT TO:<b>\r\n")
    assert buffer.line(MAX_LINE) == b"RCPT TO:<b>\r\n"


def test_line_buffer_drops_an_overlong_line_as_it_comes_and_resumes_after_it():
    buffer = LineBuffer()
    buffer.feed(b"x" * (MAX_LINE - 2) + b"\r")  # one byte short of the limit, no LF yet
    assert buffer.line(MAX_LINE) is None  # it is too long, but it has not ended
    assert len(buffer) == 0  # ...and its bytes are not kept
    buffer.feed(b"y" * 100_000)
    assert buffer.line(MAX_LINE) is None and len(buffer) == 0
    buffer.feed(b"z\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        buffer.line(MAX_LINE)
    assert buffer.line(MAX_LINE) == b"NOOP\r\n"


def test_line_buffer_limit_counts_the_line_ending():
    ok = b"x" * (MAX_LINE - 3) + b"\r\n"  # MAX_LINE - 1 bytes
    too_long = b"x" * (MAX_LINE - 2) + b"\r\n"  # MAX_LINE bytes: refused, as the original
    buffer = LineBuffer()
    buffer.feed(ok + too_long + b"QUIT\r\n")
    assert buffer.line(MAX_LINE) == ok
    with pytest.raises(LineTooLong):
        buffer.line(MAX_LINE)
    assert buffer.line(MAX_LINE) == b"QUIT\r\n"


def test_line_buffer_unread_puts_bytes_back_in_front():
    buffer = LineBuffer()
    buffer.feed(b"body\r\n")
    assert buffer.take(100) == b"body\r\n"
    buffer.feed(b"T\r\n")
    buffer.unread(b"QUI")
    assert buffer.line(MAX_LINE) == b"QUIT\r\n"


# -- the channel on a real socket -----------------------------------------------------------


def on_channel(scenario: Callable[[ClientChannel, socket.socket], Awaitable[None]],
               timeout: float = 0.2) -> None:
    """A ClientChannel on one end of a socket pair, the test's raw socket on the other."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        made: list[ClientChannel] = []
        lost: list[bool] = []
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(
            lambda: ClientChannel(timeout, made.append, lambda: lost.append(True)), sock=ours)
        theirs.setblocking(False)
        try:
            await asyncio.wait_for(scenario(made[0], theirs), WAIT)
        finally:
            theirs.close()
            made[0].close()

    asyncio.run(main())


def test_channel_times_out_after_timeout_of_silence():
    async def scenario(channel: ClientChannel, peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await channel.read_line(MAX_LINE)
        assert loop.time() - started >= 0.2

    on_channel(scenario)


def test_channel_timeout_counts_from_the_last_byte_not_from_the_read():
    """A slow but steady client is not cut off in the middle of a line (as the original's
    socket timeout): five bytes 0.1 s apart take longer than TimeOut (0.2 s) in all."""

    async def scenario(channel: ClientChannel, peer: socket.socket) -> None:
        async def trickle() -> None:
            for byte in b"NOOP\n":
                await asyncio.sleep(0.1)
                peer.send(bytes([byte]))

        task = asyncio.get_running_loop().create_task(trickle())
        assert await channel.read_line(MAX_LINE) == b"NOOP\n"
        await task

    on_channel(scenario)


def test_channel_stops_reading_past_the_high_water_mark_until_the_relay_takes_some():
    async def scenario(channel: ClientChannel, peer: socket.socket) -> None:
        data = b"x" * 65536
        sent = 0
        while sent < 2 * HIGH_WATER:
            try:
                sent += peer.send(data)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if channel.transport is not None and not channel.transport.is_reading():
                break
        assert channel.transport is not None and not channel.transport.is_reading()
        assert len(channel.buffer) <= HIGH_WATER + 65536 * 4  # bounded, not 2 x HIGH_WATER
        received = 0
        while received < sent:
            received += len(await channel.read_chunk(1 << 18))
        assert received == sent and channel.transport.is_reading()

    on_channel(scenario, timeout=5)


def test_channel_end_of_stream_ends_a_line_read_and_gives_b_empty_in_data():
    async def scenario(channel: ClientChannel, peer: socket.socket) -> None:
        peer.send(b"half a li")
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(ClientGone):  # a line cut by the end is no command
            await channel.read_line(MAX_LINE)
        assert await channel.read_chunk(100) == b"half a li"  # (DATA takes what came)
        assert await channel.read_chunk(100) == b""  # then the end: "unexpected end of data"

    on_channel(scenario)


# -- a scripted next hop, a fake scanner, the client ----------------------------------------


@dataclass
class NextHop:
    """An SMTP server on a unix socket that records what it reads. `drop_at_data`: it closes
    the connection when it gets DATA (a next hop lost mid-message)."""

    path: Path
    ehlo: tuple[str, ...] = ("250-nexthop.test", "250-PIPELINING", "250 8BITMIME")
    drop_at_data: bool = False
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    reads: list[bytes] = field(default_factory=list)  # each read as it came (pipelining)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 nexthop.test ESMTP\r\n")
        pending = b""
        try:
            while True:
                while b"\n" not in pending:
                    data = await reader.read(65536)
                    if not data:
                        return
                    self.reads.append(data)
                    pending += data
                line, _, pending = pending.partition(b"\n")
                line = line.rstrip(b"\r")
                self.commands.append(line)
                verb = line.split(b" ", 1)[0].upper()
                if verb == b"EHLO":
                    writer.write("".join(r + "\r\n" for r in self.ehlo).encode())
                elif verb == b"AUTH":
                    writer.write(b"334 \r\n")  # a challenge: the client's answer is next
                elif verb == b"DATA":
                    if self.drop_at_data:
                        writer.close()
                        return
                    writer.write(b"354 go ahead\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + pending:
                        data = await reader.read(65536)
                        if not data:
                            return
                        pending += data
                    body, _, pending = (b"\r\n" + pending).partition(b"\r\n.\r\n")
                    self.messages.append(body[2:] + b"\r\n")
                    writer.write(b"250 2.0.0 Ok: queued as NEXTHOP1\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
        finally:
            writer.close()


class FakeScanner:
    """The Scanner interface of the DATA phase: a fixed answer, and what it was given."""

    def __init__(self, result: ScanResult) -> None:
        self.result = result
        self.scanned: list[bytes] = []

    async def scan(self, spool: Spool, log: logging.LoggerAdapter | None = None) -> ScanResult:
        self.scanned.append(b"".join(spool.chunks(b"")))
        return self.result


class Client:
    """The test's SMTP client: raw lines in, replies (str, CRLF removed) out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), WAIT)
            assert line, f"connection closed; replies so far: {lines}"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def say(self, data: bytes) -> str:
        self.writer.write(data)
        return await self.reply()

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), WAIT) == b""


Scenario = Callable[[Client, NextHop], Awaitable[None]]


CLEAN_RESULT = ScanResult(CLEAN)


def run(tmp_path: Path, scenario: Scenario, *, result: ScanResult = CLEAN_RESULT,
        config: str = "", next_hop: dict | None = None,
        tls: TLSContexts | None = None,
        timeout: float | None = None) -> tuple[NextHop, FakeScanner]:
    """A RelaySession between the test's client and a scripted next hop, in one event loop."""
    hop = NextHop(tmp_path / "nexthop.sock", **(next_hop or {}))
    scanner = FakeScanner(result)
    spool = tmp_path / "spool"
    spool.mkdir()
    text = f"OutAddress: 10025\nTempDirectory: {spool}\nTimeOut: 10\n{config}"

    async def main() -> None:
        server = await asyncio.start_unix_server(hop.serve, path=str(hop.path))
        parsed = parse_config(text, "inprocess.conf")
        if timeout is not None:  # (TimeOut takes whole seconds; a test need not wait one)
            parsed = dataclasses.replace(parsed, timeout=timeout)
        context = RelayContext(
            parsed, scanner,
            lambda ip, transport: Address(path=str(hop.path)), VirusActions(None),
            tls=tls or TLSContexts(None, None, None),
        )
        ours, theirs = socket.socketpair()
        session = RelaySession(context)
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: session.channel, sock=ours)
        client = Client(*await asyncio.open_connection(sock=theirs))
        try:
            assert (await client.reply()).startswith("220 ")
            await asyncio.wait_for(scenario(client, hop), WAIT)
        finally:
            client.writer.close()
            server.close()
            for _ in range(50):  # the session ends on its own once the client is gone
                if not context.sessions:
                    break
                await asyncio.sleep(0.01)
            assert not context.sessions

    asyncio.run(main())
    return hop, scanner


MESSAGE = b"Subject: test\r\n\r\nhello\r\n.line with a dot\r\n"
STUFFED = b"Subject: test\r\n\r\nhello\r\n..line with a dot\r\n.\r\n"


async def envelope(client: Client) -> None:
    assert (await client.say(b"EHLO client.test\r\n")).startswith("250-smtp.passthru")
    assert (await client.say(b"MAIL FROM:<a@example.com>\r\n")).startswith("250")
    assert (await client.say(b"RCPT TO:<b@example.com>\r\n")).startswith("250")


# -- the DATA phase --------------------------------------------------------------------------


def test_clean_message_is_relayed_and_the_next_hops_reply_is_the_clients(tmp_path):
    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        assert await client.say(b"DATA\r\n") == R.START_DATA
        assert await client.say(STUFFED) == "250 2.0.0 Ok: queued as NEXTHOP1"
        assert await client.say(b"QUIT\r\n") == "221 2.0.0 Bye"

    hop, scanner = run(tmp_path, scenario)
    assert scanner.scanned == [MESSAGE]
    # dot-stuffed again on the way out; the scan header goes in after the first header line
    assert hop.messages == [
        b"Subject: test\r\n" + R.DEFAULT_HEADER + b"\r\n\r\nhello\r\n..line with a dot\r\n"
    ]


def test_virus_is_dropped_and_never_reaches_the_next_hop(tmp_path):
    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        await client.say(b"DATA\r\n")
        assert await client.say(STUFFED) == R.DISCARDED
        assert await client.say(b"NOOP\r\n") == "250 2.0.0 Ok"  # the session goes on

    hop, _ = run(tmp_path, scenario, result=ScanResult(VIRUS, virus="Eicar-Test-Signature"))
    assert hop.messages == []
    assert b"DATA" not in hop.commands and b"RSET" in hop.commands


def test_virus_is_bounced_with_action_bounce(tmp_path):
    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        await client.say(b"DATA\r\n")
        assert (await client.say(STUFFED)).startswith("5")

    hop, _ = run(tmp_path, scenario, result=ScanResult(VIRUS, virus="Eicar-Test-Signature"),
                 config="Action: bounce\n")
    assert hop.messages == []


def test_scan_error_defers_the_message(tmp_path):
    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        await client.say(b"DATA\r\n")
        assert await client.say(STUFFED) == R.LOCAL_ERROR

    hop, _ = run(tmp_path, scenario, result=ScanResult(ERROR, detail="clamd is down"))
    assert hop.messages == []


def test_next_hop_lost_mid_message_is_a_451_and_the_end_of_the_session(tmp_path):
    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        await client.say(b"DATA\r\n")
        assert await client.say(STUFFED) == R.LOCAL_ERROR
        assert await client.closed()

    hop, _ = run(tmp_path, scenario, next_hop={"drop_at_data": True})
    assert hop.messages == []


def test_command_behind_the_final_dot_is_read_as_the_next_command(tmp_path):
    async def scenario(client: Client, hop: NextHop) -> None:
        await envelope(client)
        await client.say(b"DATA\r\n")
        assert await client.say(STUFFED + b"NOOP\r\n") == "250 2.0.0 Ok: queued as NEXTHOP1"
        assert await client.reply() == "250 2.0.0 Ok"  # the NOOP's, from the DataDecoder's rest

    hop, _ = run(tmp_path, scenario)
    assert hop.commands[-1] == b"NOOP"


# -- the command loop --------------------------------------------------------------------------


def test_pipelined_group_reaches_the_next_hop_in_one_write(tmp_path):
    group = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"

    async def scenario(client: Client, hop: NextHop) -> None:
        assert "PIPELINING" in await client.say(b"EHLO client.test\r\n")
        client.writer.write(group)
        replies = [await client.reply() for _ in range(3)]
        assert replies == ["250 2.0.0 Ok"] * 3

    hop, _ = run(tmp_path, scenario)
    assert group in hop.reads


def test_starttls_drops_what_the_client_sent_behind_it_in_clear(tmp_path, tls_certs):
    tls = TLSContexts(server_context(tls_certs.proxy), None, None)

    async def scenario(client: Client, hop: NextHop) -> None:
        assert "STARTTLS" in await client.say(b"EHLO client.test\r\n")
        # an injected command in the same packet as STARTTLS (CVE-2011-0411)
        assert await client.say(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n") == (
            R.TLS_READY
        )
        context = client_context(tls_certs)
        await client.writer.start_tls(context, server_hostname="proxy.test")
        assert (await client.say(b"EHLO client.test\r\n")).startswith("250-smtp.passthru")
        assert await client.say(b"NOOP\r\n") == "250 2.0.0 Ok"

    config = (f"ClientTLS: on\nTLSCertificate: {tls_certs.proxy.cert}\n"
              f"TLSKey: {tls_certs.proxy.key}\n")
    hop, _ = run(tmp_path, scenario, config=config, tls=tls)
    assert not any(b"injected" in command for command in hop.commands)
    assert hop.commands[-1] == b"NOOP"


@pytest.mark.parametrize("line, reply", [
    (b"NOOP " + b"x" * MAX_LINE + b"\r\n", R.LINE_TOO_LONG),
    (b"NOOP\rDATA\r\n", R.BARE_CR),
    (b"DATA\0x\r\n", R.NUL),
], ids=["overlong", "bare-CR", "NUL"])
def test_bad_command_line_is_refused_and_never_relayed(tmp_path, line, reply):
    async def scenario(client: Client, hop: NextHop) -> None:
        assert await client.say(line) == reply
        assert await client.say(b"NOOP\r\n") == "250 2.0.0 Ok"  # in step after it

    hop, _ = run(tmp_path, scenario)
    assert hop.commands == [b"NOOP"]


def test_a_client_silent_in_the_middle_of_auth_is_told_and_logged(tmp_path, caplog):
    async def scenario(client: Client, hop: NextHop) -> None:
        assert (await client.say(b"EHLO client.test\r\n")).startswith("250-smtp.passthru")
        assert await client.say(b"AUTH LOGIN\r\n") == "334 "
        assert await client.reply() == R.TIMEOUT  # (said nothing for TimeOut)
        assert await client.closed()

    with caplog.at_level(logging.WARNING):
        run(tmp_path, scenario, timeout=0.2)
    assert "network read operation timed out (client)" in caplog.text
