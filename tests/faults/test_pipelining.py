"""PIPELINING both ways (RFC 2920, issue #14): a group the client sends in one write reaches a
pipelining next hop in one write; the replies come back in order, verbatim; DATA ends a group
and its 354 is the proxy's; every rule that holds one command at a time still holds.

The next hop is the raw-socket FakeSMTPServer (it records each read, so a group in one write is
seen as one) or the aiosmtpd recording next hop; the client is a raw socket that sends a whole
group in one write, as Postfix's smtp client does.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import replies as R
from faultkit import CLOSE, assert_no_spool_files, assert_still_serving
from helpers import EICAR, read_reply, starttls

PIPELINING_EHLO = ("250-fake.test", "250-PIPELINING", "250-8BITMIME", "250 SIZE 200000000")
BODY = b"Subject: pipelined\r\n\r\nhello\r\n.\r\n"


def session(appliance, writes: list[tuple[bytes, int]], *, ehlo: bool = True,
            tls: bool = False) -> list[str]:
    """Greeting (and EHLO), then each write in one sendall, reading `n` replies after it.
    `tls`: STARTTLS first (the appliance marked client_tls), the rest inside it."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection(appliance.address, timeout=15))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        got = [read_reply(sock, buf)]
        if tls:
            sock = stack.enter_context(starttls(sock, buf))
        if ehlo:
            sock.sendall(b"EHLO client.test\r\n")
            got.append(read_reply(sock, buf))
        for data, n in writes:
            try:
                sock.sendall(data)
            except OSError:
                break
            for _ in range(n):
                try:
                    reply = read_reply(sock, buf)
                except ConnectionResetError:
                    reply = None
                got.append(reply)
                if reply is None:
                    return got
    return got


def group(*lines: str) -> bytes:
    return b"".join(line.encode() + b"\r\n" for line in lines)


def reads_holding(hop_session, needle: bytes) -> list[bytes]:
    return [r for r in hop_session.reads if needle in r]


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_group_reaches_the_next_hop_in_one_write(appliance, next_hop):
    """MAIL, 2 RCPT, DATA in one write: 250 250 250 354 in order; MAIL and both RCPT reached
    the next hop in one read; the body was scanned and delivered once."""
    next_hop.arm()
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>",
               "RCPT TO:<c@example.com>", "DATA"), 4),
        (BODY, 1), (b"QUIT\r\n", 1)])
    assert "250-PIPELINING" in got[1].splitlines(), got[1]
    assert got[2:5] == ["250 2.1.0 OK", "250 2.1.5 OK", "250 2.1.5 OK"], got
    assert got[5] == R.START_DATA and got[6].startswith("250 2.0.0 Ok: queued"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    first = reads_holding(hop, b"MAIL FROM")
    assert len(first) == 1 and first[0].count(b"RCPT TO") == 2, hop.reads
    assert len(next_hop.delivered()) == 1
    assert "status=CLEAN" in appliance.wait_log("status=CLEAN")


@pytest.mark.fake_next_hop()  # DEFAULT_EHLO: no PIPELINING
def test_next_hop_without_pipelining_gets_one_command_at_a_time(appliance, next_hop):
    """The client is not offered PIPELINING; if it pipelines anyway, the next hop still gets
    one command per write, each after the reply to the one before."""
    next_hop.arm()
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>",
               "RCPT TO:<c@example.com>", "DATA"), 4),
        (BODY, 1), (b"QUIT\r\n", 1)])
    assert "PIPELINING" not in got[1], got[1]
    assert got[5] == R.START_DATA and got[6].startswith("250"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    for read in hop.reads:
        assert read.count(b"\r\n") == 1 or read.startswith(b"Received") or b"DATA" not in read, \
            hop.reads
    assert all(r.count(b"RCPT") <= 1 and not (b"MAIL" in r and b"RCPT" in r) for r in hop.reads)
    assert len(next_hop.delivered()) == 1


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_refusals_in_a_group_keep_their_place(appliance, next_hop):
    """A bare CR, a NUL and an overlong line inside a group get the proxy's own refusal in their
    place; a refused RCPT is relayed verbatim; DATA without an accepted RCPT is 503 and RSET
    after it lets the next transaction through."""
    next_hop.arm({"RCPT": "550 5.1.1 <x@example.com>: no such user"})
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<x@example.com>") + b"RCPT TO:<y\r@z>\r\n"
         + b"RCPT TO:<y\0@z>\r\n" + b"RCPT TO:<" + b"y" * 5000 + b">\r\n" + group("DATA"), 6),
        (group("RSET", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 4),
        (BODY, 1), (b"QUIT\r\n", 1)])
    assert got[2:8] == ["250 2.1.0 OK", "550 5.1.1 <x@example.com>: no such user", R.BARE_CR,
                        R.NUL, R.LINE_TOO_LONG, R.NEED_RCPT], got
    assert got[8:12] == ["250 2.0.0 OK", "250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA], got
    assert got[12].startswith("250") and got[13].startswith("221"), got
    assert [t.rcpts for t in next_hop.delivered()] == [[b"<b@example.com>"]]


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_next_hop_dropping_mid_group(appliance, next_hop):
    """The next hop closes at the second RCPT: the client gets the MAIL's 250, then a 4xx for
    every command still owed (the other RCPTs and the DATA), and nothing is delivered."""
    next_hop.arm({"RCPT": CLOSE})
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>",
               "RCPT TO:<c@example.com>", "DATA"), 5)])
    assert got[2] == "250 2.1.0 OK", got
    assert got[3:6] == [R.NEXT_HOP_LOST] * 3 and got[6] is None, got
    assert next_hop.delivered() == []
    assert_no_spool_files(appliance)
    next_hop.disarm()
    assert_still_serving(appliance, next_hop)


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_client_vanishing_mid_group(appliance, next_hop):
    """A group, then the client is gone before its replies: nothing delivered, no spool file,
    the next hop's session ends, the proxy serves the next client."""
    next_hop.arm()
    with socket.create_connection(appliance.address, timeout=15) as sock:
        buf = bytearray()
        read_reply(sock, buf)
        sock.sendall(b"EHLO client.test\r\n")
        read_reply(sock, buf)
        sock.sendall(group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>",
                           "RCPT TO:<c@example.com>", "DATA") + b"Subject: half")
    next_hop.wait_ended(next_hop.armed_session().index)
    assert next_hop.delivered() == []
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("next_hop_options", [{}, {"mode": "lf"}, {"mode": "any"}],
                         ids=["strict", "splits-on-LF", "splits-on-CR-or-LF"])
@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_smuggling_in_one_packet_with_pipelining(next_hop_options, appliance, next_hop):
    """MAIL, RCPT, DATA, a body hiding a second transaction behind `<LF>.<LF>`, the end, QUIT:
    all in one write. The next hop gets one message with the smuggled text inside it."""
    next_hop.arm()
    smuggled = (b"Subject: outer\r\n\r\nouter\n.\nMAIL FROM:<evil@attacker.test>\r\n"
                b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA") + smuggled
         + b"QUIT\r\n", 5)])
    assert got[2:4] == ["250 2.1.0 OK", "250 2.1.5 OK"] and got[4] == R.START_DATA, got
    assert got[5].startswith("250") and got[6].startswith("221"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    assert len(next_hop.delivered()) == 1 and len(hop.transactions) == 1
    assert b"evil@attacker.test" in next_hop.delivered()[0].content
    assert b"MAIL FROM:<evil" not in b"".join(c + b"\n" for c in hop.commands)


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_a_thousand_commands_in_one_write(appliance, next_hop):
    """MAIL, 1001 RCPT, DATA, the body and QUIT in one write: every reply in order (the 1001st
    RCPT the proxy's 452), one message with 1000 recipients, each group at most MAX_GROUP."""
    from appliance.relay import MAX_GROUP

    next_hop.arm()
    rcpts = [f"RCPT TO:<u{i}@example.com>" for i in range(1001)]
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", *rcpts, "DATA") + BODY + b"QUIT\r\n", 1005)])
    assert got[2] == "250 2.1.0 OK"
    assert got[3:1003] == ["250 2.1.5 OK"] * 1000
    assert got[1003] == R.TOO_MANY_RECIPIENTS, got[1000:]
    assert got[1004] == R.START_DATA and got[1005].startswith("250"), got[1003:]
    assert got[1006].startswith("221"), got[1003:]
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    delivered = next_hop.delivered()
    assert len(delivered) == 1 and len(delivered[0].rcpts) == 1000
    # the proxy wrote at most MAX_GROUP commands before it waited for their replies
    assert max(r.count(b"RCPT") for r in hop.reads) <= MAX_GROUP


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
def test_virus_in_a_pipelined_session_never_reaches_the_next_hop(appliance, next_hop):
    """Two messages pipelined back to back, the first EICAR: it is dropped (250 from the proxy,
    the next hop gets RSET), the second delivered; the next hop never sees the virus."""
    next_hop.arm()
    virus = b"Subject: v\r\n\r\n" + EICAR + b"\r\n.\r\n"
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 3),
        (virus + group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 4),
        (BODY + b"QUIT\r\n", 2)])
    assert got[4] == R.START_DATA and got[5].startswith("250"), got
    assert got[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA], got
    assert got[9].startswith("250") and got[10].startswith("221"), got
    next_hop.wait_ended(next_hop.armed_session().index)
    assert len(next_hop.delivered()) == 1
    assert all(EICAR not in t.content for t in next_hop.transactions(complete_only=False))


EXTENSIONS = ("250-fake.test", "250-PIPELINING", "250-SIZE 1000000", "250-8BITMIME",
              "250-SMTPUTF8", "250-DSN", "250-ENHANCEDSTATUSCODES", "250 CHUNKING")


@pytest.mark.fake_next_hop(ehlo=EXTENSIONS)
def test_extensions_pass_through_with_their_parameters(appliance, next_hop):
    """SIZE, 8BITMIME, SMTPUTF8, DSN, ENHANCEDSTATUSCODES offered as the next hop offers them,
    CHUNKING hidden; their MAIL/RCPT parameters reach the next hop verbatim, in a group."""
    next_hop.arm()
    mail = "MAIL FROM:<a@example.com> SIZE=40 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x1"
    rcpt = "RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com"
    got = session(appliance, [(group(mail, rcpt, "DATA"), 3), (BODY, 1), (b"QUIT\r\n", 1)])
    assert got[1].splitlines() == [R.EHLO_FIRST, *EXTENSIONS[1:-1], R.XFILTERED], got[1]
    assert got[4] == R.START_DATA and got[5].startswith("250"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    assert mail.encode() in hop.commands and rcpt.encode() in hop.commands
    assert len(reads_holding(hop, b"MAIL FROM")) == 1
    assert b"NOTIFY" in reads_holding(hop, b"MAIL FROM")[0]


@pytest.mark.fake_next_hop(ehlo=("250 fake.test",))
def test_next_hop_offering_nothing(appliance, next_hop):
    """A one-line EHLO reply: the client is offered nothing, and a pipelining client still
    gets its message through one command at a time."""
    next_hop.arm()
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 3),
        (BODY, 1), (b"QUIT\r\n", 1)])
    assert got[1] == "250 smtp.passthru", got
    assert got[4] == R.START_DATA and got[5].startswith("250"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    assert not reads_holding(hop, b"RCPT TO") or all(
        b"MAIL" not in r for r in reads_holding(hop, b"RCPT TO"))


@pytest.mark.fake_next_hop(ehlo=PIPELINING_EHLO)
@pytest.mark.client_tls
def test_group_inside_client_tls(appliance, next_hop):
    """ClientTLS: on: PIPELINING is offered again in the EHLO after STARTTLS, and a group sent
    in one TLS write reaches the next hop in one write."""
    next_hop.arm()
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>",
               "RCPT TO:<c@example.com>", "DATA"), 4),
        (BODY, 1), (b"QUIT\r\n", 1)], tls=True)
    assert "250-PIPELINING" in got[1].splitlines(), got
    assert got[2:6] == ["250 2.1.0 OK", "250 2.1.5 OK", "250 2.1.5 OK", R.START_DATA], got
    assert got[6].startswith("250"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    first = reads_holding(hop, b"MAIL FROM")
    assert len(first) == 1 and first[0].count(b"RCPT TO") == 2, hop.reads
    assert len(next_hop.delivered()) == 1


@pytest.mark.appliance_config(XClient="on")
@pytest.mark.next_hop_replies(ehlo_extensions=["PIPELINING", "XCLIENT ADDR NAME HELO PROTO"])
def test_group_after_xclient(appliance, next_hop):
    """XClient: on: XCLIENT and the repeated EHLO come first, then the group; the next hop's
    access rules judged the client's address, and the message went through once."""
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 3),
        (BODY, 1), (b"QUIT\r\n", 1)])
    assert "250-PIPELINING" in got[1].splitlines() and "XCLIENT" not in got[1], got
    assert got[4] == R.START_DATA and got[5].startswith("250"), got
    [received] = next_hop.wait_for(1)
    assert received.xclient_addr == "127.0.0.1"
    events = next_hop.event_names()
    assert events[:3] == ["EHLO client.test",
                          "XCLIENT ADDR=127.0.0.1 NAME=localhost HELO=client.test PROTO=ESMTP",
                          "EHLO client.test"], events


@pytest.mark.fake_next_hop(ehlo=("250-fake.test", "250-PIPELINING", "250 SIZE 200"))
def test_over_the_next_hops_size_in_a_pipelined_session(appliance, next_hop):
    """A body over the next hop's SIZE: the proxy's 552 after it (nothing of it sent on), the
    next hop's transaction ended with RSET, and the next group, sent right behind the dot in
    the same write, goes through."""
    next_hop.arm()
    big = b"Subject: big\r\n\r\n" + b"x" * 400 + b"\r\n.\r\n"
    got = session(appliance, [
        (group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 3),
        (big + group("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"), 4),
        (BODY + b"QUIT\r\n", 2)])
    assert got[5] == R.TOO_BIG, got
    assert got[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA], got
    assert got[9].startswith("250") and got[10].startswith("221"), got
    hop = next_hop.wait_ended(next_hop.armed_session().index)
    assert len(next_hop.delivered()) == 1 and b"x" * 400 not in bytes(hop.raw)
    assert b"RSET" in hop.commands
