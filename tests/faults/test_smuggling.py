"""SMTP smuggling (2023) through the proxy: one DATA must stay one message.

A smuggler hides a second transaction behind an end-of-data marker that one server ignores and
another honours (`<LF>.<LF>`, `<CR>.<CR>`, ...). The proxy must neither end the data there
itself nor pass the ambiguity on: the next hop gets exactly one message, with the would-be second
one inside it as text (or the message is refused), and every line ending it receives is CRLF.
Payloads go over a raw socket, so no client library tidies them up first.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time

import pytest
import replies as R
from faultkit import FakeSMTPServer
from helpers import read_reply, send_raw, starttls

SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nPay the invoice.\r\n")
OUTER = b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: outer\r\n\r\nouter body"

VARIANTS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "LF.CR": b"\n.\r",
}


def payload(variant: str) -> bytes:
    """The DATA bytes: a message with the smuggled one behind the marker, then the real end."""
    if variant == "start:.LF":  # the marker as the very first line of the body
        return b".\n" + SMUGGLED + b".\r\n"
    return OUTER + VARIANTS[variant] + SMUGGLED + b".\r\n"


ALL_VARIANTS = [*VARIANTS, "start:.LF"]
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def send_message(appliance, data: bytes, *, drip: bool = False, tls: bool = False) -> list[str]:
    """HELO, MAIL, RCPT, DATA, `data` (as is, in one write or one byte per write), QUIT.
    `tls`: all of it inside STARTTLS (the appliance marked client_tls)."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(appliance.address, timeout=15))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        replies = [read_reply(sock, buf)]
        if tls:
            sock = stack.enter_context(starttls(sock, buf))
        for command in (b"HELO client.test", b"MAIL FROM:<alice@example.com>",
                        b"RCPT TO:<bob@example.com>", b"DATA"):
            sock.sendall(command + b"\r\n")
            replies.append(read_reply(sock, buf))
        assert replies[-1] == R.START_DATA, replies
        if drip:
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
                time.sleep(0.001)
        else:
            sock.sendall(data)
        replies.append(read_reply(sock, buf))
        sock.sendall(b"QUIT\r\n")
        replies.append(read_reply(sock, buf))
    return replies


def assert_one_message_and_no_smuggling(hop: FakeSMTPServer, replies: list[str]) -> None:
    """What the brief promises, checked on the bytes the next hop received."""
    assert replies[-1] is not None and replies[-1].startswith("221"), replies  # still in step
    session = hop.wait_ended(hop.armed_session().index)
    final = replies[-2]
    commands = [c.upper() for c in session.commands]
    assert not any(c.startswith(b"MAIL FROM:<EVIL") for c in commands), session.commands
    assert not any(c.startswith(b"RCPT TO:<VICTIM") for c in commands), session.commands
    assert BARE.search(bytes(session.raw)) is None, f"bare CR/LF sent on: {bytes(session.raw)!r}"
    if final[:1] in ("4", "5"):  # refused: then nothing at all went through
        assert hop.delivered() == [], final
        return
    assert final.startswith("250 2.0.0 Ok: queued as FAKE"), replies
    [txn] = session.transactions
    assert txn.mail_from == b"<alice@example.com>" and txn.rcpts == [b"<bob@example.com>"]
    assert b"\r\n.\r\n" not in b"\r\n" + txn.data  # no end-of-data line inside the data
    assert b"MAIL FROM:<evil@attacker.test>" in txn.content  # the smuggled text, as text
    assert b"Pay the invoice." in txn.content
    assert hop.delivered() == [txn]


@pytest.mark.parametrize("drip", [False, True], ids=["one-write", "byte-by-byte"])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.fake_next_hop()
def test_smuggling_variant_stays_one_message(variant, drip, appliance, next_hop):
    """A strict next hop: one message, the smuggled one inside it, CRLF only on the wire."""
    next_hop.arm()
    replies = send_message(appliance, payload(variant), drip=drip)
    assert_one_message_and_no_smuggling(next_hop, replies)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.fake_next_hop()
@pytest.mark.client_tls
def test_smuggling_inside_tls_stays_one_message(variant, appliance, next_hop):
    """The same inside a TLS session the proxy terminates (ClientTLS: on): TLS changes how the
    bytes arrive (in TLS records), never where the message ends."""
    next_hop.arm()
    replies = send_message(appliance, payload(variant), tls=True)
    assert_one_message_and_no_smuggling(next_hop, replies)


@pytest.mark.parametrize("next_hop_options", [{"mode": "lf"}, {"mode": "any"}],
                         ids=["splits-on-LF", "splits-on-CR-or-LF"])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.fake_next_hop()
def test_lenient_next_hop_still_sees_one_message(variant, next_hop_options, appliance, next_hop):
    """A next hop that takes bare LF (or bare CR) for a line end, which a smuggler counts on,
    still sees only one message, since the proxy sends CRLF only."""
    next_hop.arm()
    replies = send_message(appliance, payload(variant))
    assert_one_message_and_no_smuggling(next_hop, replies)


def _vulnerable(mode: str) -> list[str]:
    """The variants a next hop in `mode` reads as an end of data."""
    if mode == "any":
        return ALL_VARIANTS
    return ["LF.LF", "LF.CRLF", "CRLF.LF", "start:.LF"]


@pytest.mark.parametrize("mode", ["lf", "any"])
def test_the_lenient_next_hop_is_really_vulnerable(mode):
    """The control for the test above: fed the payload directly, without the proxy, the lenient
    fake does see the smuggled second transaction (so "one message" above is not vacuous)."""
    for variant in _vulnerable(mode):
        with FakeSMTPServer(mode=mode) as hop:
            replies = send_raw(hop.host, hop.port, [
                "HELO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.com>",
                "DATA", (payload(variant), 5), "QUIT"])
            assert replies[-1].startswith("221"), (variant, replies)
            froms = [t.mail_from for t in hop.wait_delivered(2)]
            assert froms == [b"<alice@example.com>", b"<evil@attacker.test>"], variant


def assert_delivered_as(appliance, next_hop: FakeSMTPServer, data: bytes,
                        content: bytes) -> None:
    """Send `data` through the proxy to the armed next hop: it must be queued, arrive as the one
    message `content` (dot-unstuffed) and no bare CR or LF may go on the wire."""
    next_hop.arm()
    replies = send_message(appliance, data)
    assert replies[-2].startswith("250 "), replies
    [txn] = next_hop.delivered()
    assert txn.content == content
    assert BARE.search(bytes(next_hop.armed_session().raw)) is None


def _in_crlf(subject: bytes) -> bytes:
    """The message of the two tests below, as the next hop must get it: CRLF line ends only."""
    return (b"From: alice@example.com\r\nSubject: " + subject + b"\r\n" + R.DEFAULT_HEADER
            + b"\r\n\r\nline1\r\nline2\r\n\r\nline4\r\n")


@pytest.mark.fake_next_hop()
def test_bare_lf_line_endings_become_crlf(appliance, next_hop):
    data = b"From: alice@example.com\nSubject: lf\n\nline1\nline2\n\nline4" + b"\r\n.\r\n"
    assert_delivered_as(appliance, next_hop, data, _in_crlf(b"lf"))


@pytest.mark.fake_next_hop()
def test_bare_cr_line_endings_become_crlf(appliance, next_hop):
    data = b"From: alice@example.com\rSubject: cr\r\rline1\rline2\r\rline4" + b"\r\n.\r\n"
    assert_delivered_as(appliance, next_hop, data, _in_crlf(b"cr"))


@pytest.mark.fake_next_hop()
def test_mixed_and_doubled_line_endings(appliance, next_hop):
    """LF CR, CR CR LF and friends: each bare CR and each bare LF is one line end."""
    data = b"Subject: mixed\r\n\r\na\n\rb\r\r\nc\n\nd\r\n.\r\n"
    assert_delivered_as(appliance, next_hop, data,
                        b"Subject: mixed\r\n" + R.DEFAULT_HEADER
                        + b"\r\n\r\na\r\n\r\nb\r\n\r\nc\r\n\r\nd\r\n")


@pytest.mark.fake_next_hop()
def test_dot_lines_made_by_normalising_are_restuffed(appliance, next_hop):
    """`a<LF>.<LF>b`: normalising makes a "." line, which must go out as ".." (else it would end
    the data at the next hop) and arrive as "." text."""
    next_hop.arm()
    replies = send_message(appliance, b"Subject: dots\r\n\r\na\n.\nb\r\n.\r\n")
    assert replies[-2].startswith("250 "), replies
    [txn] = next_hop.delivered()
    assert b"\r\n..\r\n" in txn.data
    assert txn.content.endswith(b"\r\n\r\na\r\n.\r\nb\r\n")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_real_next_hop_sees_one_message(variant, appliance, next_hop):
    """The same through aiosmtpd (the RecordingNextHop): one message, the smuggled one as text."""
    replies = send_message(appliance, payload(variant))
    assert replies[-2].startswith("250 ") and replies[-1].startswith("221"), replies
    [received] = next_hop.wait_for(1)
    time.sleep(0.1)
    assert len(next_hop.messages) == 1 and next_hop.rejected == []
    assert received.mail_from == "alice@example.com"
    assert b"MAIL FROM:<evil@attacker.test>" in received.original_content
    assert BARE.search(received.original_content) is None
