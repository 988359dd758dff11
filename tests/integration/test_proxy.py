"""The proxy between a real client, a real clamd and a real next hop (aiosmtpd).

Each test runs the daemon as a user would (`clamsmtpd -d 4 -f conf`) and checks what the client
is told, what the next hop received (byte for byte), and what was logged.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import time

import pytest
import replies as R
from helpers import EICAR, make_message, raw_session_in_data, send_raw, smtp_client, zip_bytes

CLEAN = (
    b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: clean\r\n"
    b"\r\nHello Bob.\r\nNothing to see here.\r\n"
)


def with_header(message: bytes, header: bytes = R.DEFAULT_HEADER) -> bytes:
    head, sep, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n" + header + b"\r\n" + sep[2:] + body if sep else header + b"\r\n" + message


def send(appliance, message: bytes, sender="alice@example.com", rcpts=("bob@example.com",)):
    """Send one message; return the (code, text) the proxy answered at the end of DATA."""
    with smtp_client(appliance) as client:
        client.ehlo()
        code, text = client.mail(sender)
        assert code == 250, text
        for rcpt in rcpts:
            client.rcpt(rcpt)
        return client.data(message)


# -- clean mail ------------------------------------------------------------------------------


def test_clean_mail_is_delivered_byte_exact_with_the_header(appliance, next_hop):
    code, text = send(appliance, CLEAN)
    assert (code, text) == (250, b"2.0.0 OK queued as lab")  # the next hop's own reply
    [received] = next_hop.wait_for(1)
    assert received.original_content == with_header(CLEAN)
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ["bob@example.com"]
    log = appliance.wait_log("status=CLEAN")
    assert "accepted connection from: 127.0.0.1" in log
    assert "from=alice@example.com, to=bob@example.com, status=CLEAN" in log


def test_dot_stuffed_lines_round_trip(appliance, next_hop):
    message = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\nend.\r\n"
    code, _ = send(appliance, message)  # smtplib stuffs, the proxy unstuffs and restuffs
    assert code == 250
    assert next_hop.wait_for(1)[0].original_content == with_header(message)


def test_8bit_and_nul_bytes_round_trip(appliance, next_hop):
    body = bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n\xc3\xa9t\xc3\xa9\r\n"
    message = b"Subject: 8bit\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "MAIL FROM:<a@example.com> BODY=8BITMIME", "RCPT TO:<b@example.com>",
        "DATA", message + b".\r\n", "QUIT"])
    assert replies[5].startswith("250"), replies
    assert next_hop.wait_for(1)[0].original_content == with_header(message)


def test_empty_body_gets_only_the_header(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, [
        "HELO client.test", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA",
        b".\r\n", "QUIT"])
    assert replies[4] == R.START_DATA and replies[5].startswith("250"), replies
    assert next_hop.wait_for(1)[0].original_content == R.DEFAULT_HEADER + b"\r\n"


def test_message_without_blank_line_gets_header_first(appliance, next_hop):
    message = b"Subject: only headers\r\nX-Foo: bar\r\n"
    assert send(appliance, message)[0] == 250
    assert next_hop.wait_for(1)[0].original_content == R.DEFAULT_HEADER + b"\r\n" + message


@pytest.mark.appliance_config(Header="X-Scanned-For: %i via %l")
def test_header_template_expands_addresses(appliance, next_hop):
    send(appliance, CLEAN)
    received = next_hop.wait_for(1)[0]
    expected = with_header(CLEAN, b"X-Scanned-For: 127.0.0.1 via 127.0.0.1")
    assert received.original_content == expected


@pytest.mark.appliance_config(Header="")
def test_empty_header_directive_adds_nothing(appliance, next_hop):
    send(appliance, CLEAN)
    assert next_hop.wait_for(1)[0].original_content == CLEAN


@pytest.mark.appliance_config(Header="Received: from scanner by clamsmtpd")
def test_received_header_goes_first(appliance, next_hop):
    send(appliance, CLEAN)
    assert next_hop.wait_for(1)[0].original_content == (
        b"Received: from scanner by clamsmtpd\r\n" + CLEAN
    )


def test_two_messages_in_one_session(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
        client.sendmail("c@example.com", ["d@example.com"], CLEAN.replace(b"clean", b"second"))
    first, second = next_hop.wait_for(2)
    assert (first.mail_from, second.mail_from) == ("a@example.com", "c@example.com")
    assert b"second" in second.original_content
    log = appliance.wait_log("from=c@example.com")
    assert log.count("status=CLEAN") == 2


def test_rset_mid_transaction(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail("first@example.com")
        client.rcpt("dropped@example.com")
        assert client.rset()[0] == 250
        client.sendmail("second@example.com", ["kept@example.com"], CLEAN)
    [received] = next_hop.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == ("second@example.com", ["kept@example.com"])
    assert "to=kept@example.com, status=CLEAN" in appliance.wait_log("status=CLEAN")
    assert "dropped@example.com, status" not in appliance.log()


def test_large_message_memory_is_bounded(appliance, next_hop):
    """50 MB through the proxy: delivered intact, and the daemon's peak RSS stays small."""
    line = b"0123456789" * 7 + b"\r\n"
    body = line * (50 * 1024 * 1024 // len(line))
    message = b"Subject: big\r\n\r\n" + body
    with smtp_client(appliance, timeout=120) as client:
        client.sendmail("a@example.com", ["b@example.com"], message)
    received = next_hop.wait_for(1, timeout=60)[0]
    assert received.original_content == with_header(message)
    peak_kb = _peak_rss_kb(appliance.proc.pid)
    assert peak_kb < 80 * 1024, f"peak RSS {peak_kb} kB for a 50 MB message"


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


# -- viruses ---------------------------------------------------------------------------------


def _infected_messages():
    return {
        "inline": b"Subject: inline\r\n\r\n" + EICAR + b"\r\n",
        "base64 attachment": bytes(make_message("b64", attachments=[("eicar.com", EICAR)])),
        "zip": bytes(
            make_message("zip", attachments=[("eicar.zip", zip_bytes("eicar.com", EICAR))])
        ),
    }


@pytest.mark.parametrize("kind", list(_infected_messages()))
def test_eicar_is_discarded_by_default(appliance, next_hop, kind):
    message = _infected_messages()[kind]
    code, text = send(appliance, message)
    assert f"{code} {text.decode()}" == R.DISCARDED
    log = appliance.wait_log("status=VIRUS:")
    assert "status=VIRUS:Eicar-Test-Signature" in log
    time.sleep(0.2)
    assert next_hop.messages == []


@pytest.mark.appliance_config(Action="bounce")
def test_action_bounce(appliance, next_hop):
    code, text = send(appliance, _infected_messages()["inline"])
    assert f"{code} {text.decode()}" == R.REJECTED
    # the session goes on: the next hop was RSET and takes the next clean message
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    assert len(next_hop.wait_for(1)) == 1
    assert all(EICAR not in m.original_content for m in next_hop.messages)


@pytest.mark.appliance_config(Action="pass")
def test_action_pass_marks_the_message(appliance, next_hop):
    message = _infected_messages()["inline"]
    code, _ = send(appliance, message)
    assert code == 250
    received = next_hop.wait_for(1)[0]
    assert received.original_content == with_header(
        message, R.DEFAULT_HEADER + b"\r\n" + R.INFECTED_HEADER
    )


def test_virus_then_clean_in_one_session(appliance, next_hop):
    with smtp_client(appliance) as client:
        with pytest.raises(smtplib.SMTPResponseException):
            # smtplib treats the 250 "Discarded" as success; force a check via data()
            client.ehlo()
            client.mail("a@example.com")
            client.rcpt("b@example.com")
            code, text = client.data(_infected_messages()["inline"])
            raise smtplib.SMTPResponseException(code, text)
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    [received] = next_hop.wait_for(1)
    assert received.original_content == with_header(CLEAN)


# -- the next hop's answers ------------------------------------------------------------------


@pytest.mark.next_hop_replies({"RCPT:bad@example.com": "550 5.1.1 <bad@example.com>: no such user"})
def test_recipient_rejected_by_next_hop(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail("a@example.com")
        assert client.rcpt("bad@example.com") == (550, b"5.1.1 <bad@example.com>: no such user")
        assert client.rcpt("good@example.com")[0] == 250
        assert client.data(CLEAN)[0] == 250
    [received] = next_hop.wait_for(1)
    assert received.rcpt_tos == ["good@example.com"]
    assert "to=good@example.com, status=CLEAN" in appliance.wait_log("status=CLEAN")
    assert "to=bad@example.com" not in appliance.log()


@pytest.mark.next_hop_replies(MAIL="451 4.3.0 try again later")
def test_tempfail_at_mail_is_relayed(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>", "DATA", "QUIT"])
    assert replies[2] == "451 4.3.0 try again later"
    assert replies[4] == R.NEED_RCPT  # nothing was accepted, so nothing is read as a message
    assert next_hop.messages == []


@pytest.mark.next_hop_replies(DATA="554 5.7.1 content refused")
def test_next_hop_refusing_the_message_is_relayed(appliance, next_hop):
    code, text = send(appliance, CLEAN)
    assert (code, text) == (554, b"5.7.1 content refused")


def test_multiline_reply_is_relayed_verbatim(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test", "HELP", "QUIT"])
    assert replies[0] == R.GREETING
    assert replies[1].splitlines()[0] == R.EHLO_FIRST
    assert replies[2].startswith("250 Supported commands:") or replies[2].startswith("250")


def test_next_hop_down_gets_421(appliance, next_hop):
    next_hop.stop()
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test"])
    assert replies == [R.NEXT_HOP_DOWN]
    assert "couldn't connect to" in appliance.wait_log("couldn't connect to")


@pytest.mark.next_hop_replies(greeting="554 5.3.2 not now")
def test_refusing_greeting_is_relayed(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["QUIT"])
    assert replies[0] == "554 5.3.2 not now"


# -- clamd trouble ---------------------------------------------------------------------------


def test_clamd_down_defers_and_delivers_nothing(appliance, next_hop, own_clamd):
    own_clamd.kill()
    code, text = send(appliance, CLEAN)
    assert f"{code} {text.decode()}" == R.LOCAL_ERROR
    assert "status=CLAMAV-ERROR" in appliance.wait_log("status=CLAMAV-ERROR")
    time.sleep(0.2)
    assert next_hop.messages == []


@pytest.mark.appliance_config(ClamAddress="127.0.0.1:1")
def test_clamd_unreachable_over_tcp_defers(appliance, next_hop):
    code, text = send(appliance, CLEAN)
    assert f"{code} {text.decode()}" == R.LOCAL_ERROR
    # the session survives, the next hop was RSET and nothing was delivered
    assert next_hop.messages == []


# -- protocol rules --------------------------------------------------------------------------


@pytest.mark.next_hop_replies(ehlo_extensions=[
    "PIPELINING", "SIZE 1000000", "STARTTLS", "8BITMIME", "XCLIENT ADDR NAME", "DSN", "CHUNKING"])
def test_ehlo_extensions_are_filtered(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test", "QUIT"])
    assert replies[1].splitlines() == [
        R.EHLO_FIRST, "250-PIPELINING", "250-SIZE 1000000", "250-8BITMIME", "250-DSN",
        R.XFILTERED]


def test_refused_commands(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "STARTTLS", "BDAT 10 LAST", "XCLIENT ADDR=192.0.2.1", "NOOP", "QUIT"])
    assert replies[2:5] == [R.NOT_IMPLEMENTED, R.NOT_IMPLEMENTED, R.INSUFFICIENT_AUTHORIZATION]
    assert replies[5].startswith("250")
    assert "client attempted use of privileged XCLIENT feature" in appliance.log()


def test_unknown_verbs_are_relayed(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test", "FROBNICATE x", "QUIT"])
    assert replies[2].startswith("500") and "FROBNICATE" in replies[2]  # aiosmtpd's own answer


def test_a_refused_quit_does_not_end_the_session(appliance, next_hop):
    """The next hop answers "QUIT now" with 501 and carries on: so does the proxy."""
    replies = send_raw(appliance.host, appliance.port,
                       ["EHLO client.test", "QUIT now", "NOOP", "QUIT"])
    assert replies[2].startswith("501"), replies
    assert replies[3].startswith("250") and replies[4].startswith("221"), replies


def test_line_over_the_limit(appliance, next_hop):
    # The original's limit: 4222 bytes with the CRLF are refused, 4221 are relayed.
    replies = send_raw(appliance.host, appliance.port, [
        "EHLO client.test", "NOOP " + "x" * 5000, "NOOP " + "x" * 4215, "NOOP " + "x" * 4214,
        "NOOP", "QUIT"])
    assert replies[2] == R.LINE_TOO_LONG
    assert replies[3] == R.LINE_TOO_LONG
    assert not replies[4].startswith("500 Line")  # the next hop's answer to a long NOOP
    assert replies[5].startswith("250")  # still in step


def test_data_without_recipients(appliance, next_hop):
    replies = send_raw(appliance.host, appliance.port, ["HELO client.test", "DATA", "QUIT"])
    assert replies[2] == R.NEED_RCPT


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.appliance_config(MaxConnections=2)
def test_max_connections(appliance, next_hop):
    # the fixture's own start-up probe holds a slot until its session has ended: retry until
    # both slots are ours
    for _ in range(50):
        held = [socket.create_connection(appliance.address, timeout=10) for _ in range(2)]
        greetings = [sock.recv(100) for sock in held]
        if all(g.startswith(b"220") for g in greetings):
            break
        for sock in held:
            sock.close()
        time.sleep(0.1)
    try:
        assert all(g.startswith(b"220") for g in greetings), greetings
        with socket.create_connection(appliance.address, timeout=10) as third:
            assert third.recv(100) == (R.BUSY + "\r\n").encode()
            assert third.recv(100) == b""
        assert "too many connections open (max 2)" in appliance.log()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert send(appliance, CLEAN)[0] == 250  # slots are freed


@pytest.mark.appliance_config(TimeOut=2)
def test_idle_client_times_out(appliance, next_hop):
    with socket.create_connection(appliance.address, timeout=10) as sock:
        assert sock.recv(100).startswith(b"220")
        started = time.monotonic()
        assert sock.recv(200) == (R.TIMEOUT + "\r\n").encode()
        assert sock.recv(100) == b""
        assert 1.5 < time.monotonic() - started < 6


@pytest.mark.appliance_config(TimeOut=2)
def test_client_stalling_in_data_times_out_and_nothing_is_delivered(appliance, next_hop):
    with raw_session_in_data(appliance) as (sock, f):
        sock.sendall(b"Subject: half\r\n\r\nhalf a mess")
        assert f.readline() == (R.TIMEOUT + "\r\n").encode()
    time.sleep(0.3)
    assert next_hop.messages == []


def test_client_vanishing_mid_data_delivers_nothing(appliance, next_hop):
    with raw_session_in_data(appliance) as (sock, _):
        sock.sendall(b"Subject: half\r\n\r\n" + base64.b64encode(b"x" * 100000))
    appliance.wait_log("unexpected end of data from client")
    time.sleep(0.2)
    assert next_hop.messages == []
