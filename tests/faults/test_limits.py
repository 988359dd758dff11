"""Limits: what the proxy caps (client lines, next-hop reply lines, message size against the
next hop's SIZE, recipients), what it must carry whole (many recipients, a huge header), and
that its memory stays flat over many messages.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import replies as R
from faultkit import assert_no_spool_files, assert_still_serving, clean_message
from helpers import EICAR, read_reply, send_raw, smtp_client

LIMIT = 4222  # a client line of this many bytes, line ending included, is refused


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) and Threads of a process, plus its open file descriptors."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


def line_of(total: int, prefix: bytes, ending: bytes = b"\r\n", suffix: bytes = b"") -> bytes:
    """A line of exactly `total` bytes, line ending included."""
    pad = total - len(prefix) - len(suffix) - len(ending)
    assert pad >= 0
    return prefix + b"x" * pad + suffix + ending


# -- client command lines ----------------------------------------------------------------------


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["CRLF", "LF"])
@pytest.mark.fake_next_hop()
def test_command_line_limit_at_the_next_hop(ending, appliance, next_hop):
    """A 4221-byte MAIL FROM reaches the next hop byte for byte; a 4222-byte one gets "500 Line
    too long" and never reaches it; the dialogue stays in step (each line one reply)."""
    next_hop.arm()
    ok = line_of(LIMIT - 1, b"MAIL FROM:<", ending, b"@example.com>")
    too_long = line_of(LIMIT, b"MAIL FROM:<", ending, b"@example.com>")
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", too_long, ok, "RCPT TO:<bob@example.com>", "RSET", "QUIT"])
    assert replies[2] == R.LINE_TOO_LONG
    assert replies[3:7] == ["250 2.1.0 OK", "250 2.1.5 OK", "250 2.0.0 OK", "221 2.0.0 Bye"]
    session = next_hop.wait_ended(next_hop.armed_session().index)
    mails = [c for c in session.commands if c.startswith(b"MAIL")]
    assert mails == [ok.rstrip(b"\r\n")]  # verbatim, and only the short one
    assert len(mails[0]) + 2 == LIMIT - 1 + (2 - len(ending))


def test_megabyte_line_is_one_refusal(appliance, next_hop):
    """A 1 MiB line (written in pieces, a NOOP pipelined right behind it) -> exactly one 500, then
    the NOOP's own reply; the daemon does not buffer the line."""
    before = proc_status(appliance.proc.pid)
    with socket.create_connection(appliance.address, timeout=20) as sock:
        buf = bytearray()
        assert read_reply(sock, buf) == R.GREETING
        line = b"NOOP " + b"y" * (1 << 20)
        for i in range(0, len(line), 50_000):
            sock.sendall(line[i:i + 50_000])
        sock.sendall(b"\r\nNOOP\r\n")
        assert read_reply(sock, buf) == R.LINE_TOO_LONG
        assert read_reply(sock, buf) == "250 OK"  # the pipelined NOOP, from the next hop
        sock.sendall(b"QUIT\r\n")
        assert read_reply(sock, buf).startswith("221")
    after = proc_status(appliance.proc.pid)
    assert after["VmHWM"] - before["VmHWM"] < 8 * 1024, (before, after)
    assert_still_serving(appliance, next_hop)


# -- next-hop reply lines ----------------------------------------------------------------------


@pytest.mark.fake_next_hop()
def test_ten_kilobyte_reply_lines_are_cut(appliance, next_hop):
    """The next hop answers with 10 KiB lines (greeting, EHLO, NOOP, end of data): the proxy cuts
    each to at most 4224 bytes, keeps the code, stays in step, and delivers the message."""
    huge = "h" * 10240
    next_hop.arm({
        "greeting": f"220 {huge}",
        "EHLO": ["250-fake.test", f"250-X-LONG {huge}", "250 8BITMIME"],
        "NOOP": f"250 {huge}",
        "DOT": f"250 2.0.0 queued {huge}",
    })
    token = f"long-replies-{time.time_ns()}"
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "NOOP", "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.com>", "DATA", (clean_message(token) + b".\r\n", 1), "NOOP",
        "QUIT"])
    assert replies[0] == R.GREETING  # one 220 line: replaced, whatever its length
    ehlo = replies[1].splitlines()
    assert ehlo[0] == R.EHLO_FIRST and ehlo[-1] == "250 8BITMIME"
    assert ehlo[1].startswith("250-X-LONG hhh") and len(ehlo[1]) <= 4224
    assert replies[2].startswith("250 hhh") and len(replies[2]) <= 4224
    assert replies[3:6] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA]
    assert replies[6].startswith("250 2.0.0 queued hhh") and len(replies[6]) <= 4224
    assert replies[7] == "250 2.0.0 OK"  # the second NOOP, in step
    assert replies[8].startswith("221")
    [txn] = next_hop.delivered()
    assert token.encode() in txn.content
    assert "Traceback" not in appliance.log()
    assert_still_serving(appliance, next_hop)


@pytest.mark.fake_next_hop()
def test_reply_with_a_thousand_lines(appliance, next_hop):
    """A 1000-line reply (more than the proxy takes) -> a 4xx and a closed connection, no
    crash; the daemon serves on."""
    next_hop.arm({"NOOP": ["250-line"] * 999 + ["250 end"]})
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test", "NOOP", "NOOP"])
    assert replies[2][:1] == "4", replies[2][:200]
    assert len(replies) == 3  # and the connection was closed
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


# -- what must pass whole ----------------------------------------------------------------------


def test_five_hundred_recipients(appliance, next_hop):
    """500 RCPTs in one transaction: every one relayed, in order, and one copy delivered."""
    rcpts = [f"rcpt{i:03d}@example.com" for i in range(500)]
    before = proc_status(appliance.proc.pid)
    with smtp_client(appliance) as client:
        refused = client.sendmail("alice@example.com", rcpts, clean_message("many-rcpts"))
    assert refused == {}
    [received] = next_hop.wait_for(1)
    assert received.rcpt_tos == rcpts
    after = proc_status(appliance.proc.pid)
    assert after["VmRSS"] - before["VmRSS"] < 10 * 1024, (before, after)
    log = appliance.wait_log("status=CLEAN")
    [summary] = [line for line in log.splitlines() if "status=CLEAN" in line]
    assert "to=rcpt000@example.com" in summary and summary.endswith("..., status=CLEAN")


def test_megabyte_header_section(appliance, next_hop):
    """10 000 header lines (1 MiB) before the body: delivered byte for byte, our header after
    the last of them (where the empty line is, a megabyte in)."""
    head = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 90) for i in range(10_000))
    assert len(head) > 1 << 20
    message = b"From: alice@example.com\r\n" + head + b"Subject: big head\r\n\r\nbody\r\n"
    with smtp_client(appliance) as client:
        client.sendmail("alice@example.com", ["bob@example.com"], message)
    [received] = next_hop.wait_for(1)
    head_part, _, body = message.partition(b"\r\n\r\n")
    assert received.original_content == (head_part + b"\r\n" + R.DEFAULT_HEADER + b"\r\n\r\n"
                                          + body)


@pytest.mark.fake_next_hop()
def test_megabyte_single_header_line(appliance, next_hop):
    """One 1 MiB header line (DATA has no line limit): delivered intact."""
    next_hop.arm()
    value = (b"v" * 99 + b" ") * 10_486
    message = b"Subject: one long line\r\nX-Huge: " + value + b"\r\n\r\nbody\r\n"
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA",
        (message + b".\r\n", 1), "QUIT"])
    assert replies[5].startswith("250 "), replies[5][:200]
    [txn] = next_hop.delivered()
    assert txn.content == (b"Subject: one long line\r\nX-Huge: " + value + b"\r\n"
                           + R.DEFAULT_HEADER + b"\r\n\r\nbody\r\n")


def test_memory_is_flat_over_two_hundred_messages(appliance, next_hop):
    """20 connections x 10 messages of ~100 kB (every tenth infected): the daemon's RSS, threads
    and open files after them are about what they were after a warm-up."""
    filler = (b"0123456789abcdef" * 4 + b"\r\n") * 1500

    def batch(connections: int, tag: str) -> None:
        for c in range(connections):
            with smtp_client(appliance) as client:
                for m in range(10):
                    infected = m == 9
                    body = EICAR + b"\r\n" if infected else filler
                    message = (f"Subject: {tag}-{c}-{m}\r\n\r\n".encode() + body)
                    client.sendmail("alice@example.com", ["bob@example.com"], message)

    batch(2, "warm-up")
    time.sleep(0.2)
    before = proc_status(appliance.proc.pid)
    batch(20, "load")
    next_hop.wait_for(18 + 180)
    time.sleep(0.3)
    after = proc_status(appliance.proc.pid)
    assert len(next_hop.messages) == 198
    assert all(EICAR not in m.original_content for m in next_hop.messages)
    assert after["VmRSS"] - before["VmRSS"] < 12 * 1024, (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["Threads"] <= before["Threads"] + 8, (before, after)
    assert_no_spool_files(appliance)


# -- limits on what a client may ask ----------------------------------------------------------


@pytest.mark.fake_next_hop(ehlo=["250-fake.test", "250-8BITMIME", "250 SIZE 100000"],
                           max_data=100_000)
def test_message_over_the_next_hops_size_is_refused_by_the_proxy(appliance, next_hop):
    """The next hop says SIZE 100000; a 1 MB message (its SIZE undeclared, or understated) gets
    "552 5.3.4" from the proxy itself: not spooled past the limit, not scanned, never sent on.
    The session stays in step: the next message, under the limit, goes through."""
    next_hop.arm()
    big = b"Subject: too big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1000
    token = f"fits-{time.time_ns()}"
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "MAIL FROM:<alice@example.com> SIZE=5000", "RCPT TO:<bob@example.com>",
        "DATA", (big + b".\r\n", 1),
        "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.com>", "DATA",
        (clean_message(token) + b".\r\n", 1), "QUIT"])
    assert "250 SIZE 100000" in replies[1].splitlines()  # passed through to the client
    assert replies[5].startswith("552 5.3.4"), replies[5]
    assert replies[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA], replies
    assert replies[9].startswith("250 2.0.0"), replies
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert session.commands.count(b"DATA") == 1  # the small message's only
    [txn] = next_hop.delivered()
    assert token.encode() in txn.content
    log = appliance.wait_log("status=CLEAN")
    assert log.count("status=") == 1  # the big one was never scanned
    assert_no_spool_files(appliance)


def test_recipients_are_capped(appliance, next_hop):
    """With a next hop that takes every recipient, the proxy still stops at 1000 (as Postfix's
    smtpd_recipient_limit): the rest get "452 4.5.3" (RFC 5321 4.5.3.1.10), and the message
    goes to the first 1000, once."""
    n = 1010
    rcpts = [f"r{i:04d}@example.com" for i in range(n)]
    with socket.create_connection(appliance.address, timeout=60) as sock:
        buf = bytearray()
        read_reply(sock, buf)
        sock.sendall(b"HELO client.test\r\nMAIL FROM:<alice@example.com>\r\n"
                     + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts))
        replies = [read_reply(sock, buf) for _ in range(n + 2)]
        sock.sendall(b"DATA\r\n")
        assert read_reply(sock, buf) == R.START_DATA
        sock.sendall(clean_message("capped") + b".\r\nQUIT\r\n")
        assert read_reply(sock, buf).startswith("250 ")
    rcpt_replies = replies[2:]
    assert all(r.startswith("250") for r in rcpt_replies[:1000]), rcpt_replies[:3]
    assert all(r.startswith("452 4.5.3") for r in rcpt_replies[1000:]), rcpt_replies[1000:]
    [received] = next_hop.wait_for(1)
    assert received.rcpt_tos == rcpts[:1000]
