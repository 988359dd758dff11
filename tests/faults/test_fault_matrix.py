"""The fault matrix: every peer misbehaving in every way we could think of, with real processes.

The promise under test: a 250 from the proxy after DATA means the next hop has the message;
anything else is a 4xx (or, for a virus, what Action says); an infected message never gets
through; no spool file is left behind; and the daemon keeps serving afterwards. So each row
checks what the client was told, what the next hop got (nothing, or exactly one copy), that the
spool is empty while the daemon still runs, and that one more clean message goes through.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
import replies as R
from faultkit import (
    CLOSE,
    HANG,
    RESET,
    ThenClose,
    assert_no_spool_files,
    assert_still_serving,
    clean_message,
    delivered_contents,
    rst_close,
)
from helpers import (
    EICAR,
    ONE_AND_TWO_WORKERS,
    free_port,
    proxy_directives,
    read_reply,
    send_raw,
    start_daemon,
    starttls,
    wait_until,
    write_appliance_config,
)

from appliance.spool import MEMORY_LIMIT

ENVELOPE = ["EHLO client.test", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.com>"]


def big_message(size: int = 1 << 20, token: str = "big") -> bytes:
    """A clean message of about `size` bytes (76-column base64 lines)."""
    raw = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (f"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: {token}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + raw


def transaction(appliance, message: bytes, *, timeout: float = 30.0,
                tls: bool = False) -> list[str]:
    """EHLO, MAIL, RCPT, DATA, the message and its end, QUIT: every reply, greeting first.
    `tls`: all of it inside STARTTLS (a test marked client_tls)."""
    return send_raw(appliance.host, appliance.port,
                    [*ENVELOPE, "DATA", (message + b".\r\n", 1), "QUIT"], timeout=timeout,
                    tls=tls)


#: Rows run twice: in clear (as ever, ClientTLS off), and inside a TLS session the proxy
#: terminates (ClientTLS: on, the whole dialogue after STARTTLS). Every row whose client speaks
#: SMTP to the proxy has it. Rows without it, and why:
#:   test_next_hop_refusing_connections_then_back, test_next_hop_resetting_right_after_accepting,
#:   test_next_hop_that_never_greets, test_next_hop_closing_before_greeting_gets_421, and the
#:   "greeting"/"EHLO" stages of test_next_hop_hanging_up_right_after_a_positive_reply: the
#:   fault comes before (or as the answer to) the client's first EHLO, so there is no STARTTLS
#:   to run it inside;
#:   test_next_hop_dropping_the_connection_mid_handshake: the TLS under test is the next hop's;
#:   test_unusable_temp_directory_is_reported_at_start_up, ..._on_reload: no client at all;
#:   test_flood_of_twice_max_connections: the fault is at accept (half the burst gets 421 as
#:   its greeting); the served half is a clear transaction like the other rows.
CLIENT_LEG = pytest.mark.parametrize(
    "client_leg", ["clear", pytest.param("tls", marks=pytest.mark.client_tls)])


def final_reply(replies: list[str]) -> str:
    """The reply to the end of data in `transaction`'s list (or "" if the proxy never said)."""
    assert replies[:1] == [R.GREETING], replies
    assert replies[4] == R.START_DATA, replies
    return replies[5] if len(replies) > 5 else ""


def timed_transaction(appliance, message: bytes, *,
                      tls: bool = False) -> tuple[list[str], float]:
    started = time.monotonic()
    replies = transaction(appliance, message, tls=tls)
    return replies, time.monotonic() - started


def assert_nothing_delivered(hop) -> None:
    time.sleep(0.2)  # anything in flight would have landed by now
    assert delivered_contents(hop) == []


def connect(appliance, timeout: float = 10.0, *,
            tls: bool = False) -> tuple[socket.socket, bytearray]:
    """A raw client socket past the greeting; `tls`: and past STARTTLS (ClientTLS: on)."""
    sock = socket.create_connection(appliance.address, timeout=timeout)
    buf = bytearray()
    assert read_reply(sock, buf) == R.GREETING
    return (starttls(sock, buf) if tls else sock), buf


def open_session(appliance, timeout: float = 10.0, *,
                 tls: bool = False) -> tuple[socket.socket, bytearray]:
    """A raw client socket past EHLO, MAIL and RCPT (`tls`: all inside STARTTLS)."""
    sock, buf = connect(appliance, timeout, tls=tls)
    for command in ENVELOPE:
        sock.sendall(command.encode() + b"\r\n")
        assert read_reply(sock, buf)[:1] == "2", command
    return sock, buf


# -- clamd -------------------------------------------------------------------------------------


@CLIENT_LEG
def test_clamd_stopped_then_back_without_restarting_the_daemon(client_leg, appliance, next_hop,
                                                               own_clamd):
    """clamd not running (stopped cleanly: its socket file is gone) -> 451; once clamd is back,
    the same daemon scans and delivers again."""
    own_clamd.stop()
    assert not os.path.exists(own_clamd.socket_path)
    replies = transaction(appliance, clean_message("clamd-down"), tls=client_leg == "tls")
    assert final_reply(replies) == R.LOCAL_ERROR
    assert replies[6].startswith("221")  # the session went on
    assert "status=CLAMAV-ERROR" in appliance.wait_log("status=CLAMAV-ERROR")
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    own_clamd.start()
    assert_still_serving(appliance, next_hop)


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_clamd(behaviour="silent")
@CLIENT_LEG
def test_clamd_that_never_answers(client_leg, appliance, next_hop, own_clamd):
    """clamd takes the whole stream and never answers -> 451 after about TimeOut."""
    replies, took = timed_transaction(appliance, clean_message("silent-clamd"),
                                      tls=client_leg == "tls")
    assert final_reply(replies) == R.LOCAL_ERROR
    assert 1.5 < took < 2 * 2 + 5 + 2, took
    assert own_clamd.scans == 1
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)
    assert own_clamd.scans == 2  # the follow-up really went through (the real) clamd


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_clamd(behaviour="silent")
@CLIENT_LEG
def test_scanner_hangs_up_on_a_clamd_that_timed_out(client_leg, appliance, next_hop, own_clamd):
    replies = transaction(appliance, clean_message("silent-clamd"), tls=client_leg == "tls")
    assert final_reply(replies) == R.LOCAL_ERROR
    assert own_clamd.scans == 1
    assert own_clamd.faulty_done.wait(2), "the daemon still holds its connection to clamd"
    assert own_clamd.client_gave_up == [True]


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_clamd(behaviour="slow", delay=5.0, reply=b"stream: OK\n")
@CLIENT_LEG
def test_clamd_answering_after_timeout(client_leg, appliance, next_hop, own_clamd):
    """clamd answers "OK", but only after TimeOut -> 451; the late OK is never taken."""
    replies, took = timed_transaction(appliance, clean_message("late-clamd"),
                                      tls=client_leg == "tls")
    assert final_reply(replies) == R.LOCAL_ERROR
    assert own_clamd.scans == 1
    assert took < 5.0, f"the proxy waited for the late answer ({took:.1f} s)"
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.appliance_config(TimeOut=3)
@pytest.mark.fake_clamd(behaviour="slow", delay=1.0, reply=b"stream: OK\n")
@CLIENT_LEG
def test_clamd_slow_but_within_timeout_is_fine(client_leg, appliance, next_hop, own_clamd):
    """The control for the row above: a slow clamd inside TimeOut is waited for."""
    token = f"slow-ok-{time.time_ns()}"
    replies, took = timed_transaction(appliance, clean_message(token),
                                      tls=client_leg == "tls")
    assert final_reply(replies).startswith("250 2.0.0"), replies
    assert took >= 1.0 and own_clamd.scans == 1
    [content] = delivered_contents(next_hop)
    assert token.encode() in content


@pytest.mark.appliance_config(TimeOut=10, ScanTimeout=3)
@pytest.mark.fake_clamd(behaviour="trickle", delay=1.0, reply=b"stream: OK\n")
@CLIENT_LEG
def test_clamd_trickling_its_answer_is_cut_at_scan_timeout(client_leg, appliance, next_hop,
                                                           own_clamd):
    """clamd answers one byte a second (each read well inside TimeOut) -> 451 after
    ScanTimeout, not after TimeOut nor after the 11 s the whole "stream: OK" would take."""
    replies, took = timed_transaction(appliance, clean_message("trickling-clamd"),
                                      tls=client_leg == "tls")
    assert final_reply(replies) == R.LOCAL_ERROR
    assert 2.5 < took < 6, took
    assert "did not finish within ScanTimeout (3 s)" in appliance.wait_log("ScanTimeout (3 s)")
    assert own_clamd.scans == 1
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize(("clamd_options", "final"), [
    pytest.param({"reply": b"stream: OK\n"}, "250 2.0.0", id="clean"),
    pytest.param({"reply": b"stream: Eicar-Test-Signature FOUND\n"}, R.DISCARDED, id="virus"),
    pytest.param({"reply": b"stream: OK\n", "tcp": True}, "250 2.0.0", id="clean-tcp"),
])
@pytest.mark.appliance_config(TimeOut=10, ScanTimeout=10)
@pytest.mark.fake_clamd(behaviour="trickle", delay=0.05)
@CLIENT_LEG
def test_clamd_answer_in_pieces_is_read_whole(client_leg, clamd_options, final, appliance, next_hop,
                                              own_clamd):
    """A reply that arrives in pieces (as a clamd on another host may send it over TCP) is
    one answer, not a garbled one: a piece of a line is never taken for the whole line."""
    replies = transaction(appliance, clean_message("in-pieces"), tls=client_leg == "tls")
    assert own_clamd.scans == 1
    assert final_reply(replies).startswith(final), replies
    assert len(delivered_contents(next_hop)) == (final != R.DISCARDED)


@pytest.mark.parametrize("clamd_options", [
    pytest.param({}, id="unix"),
    pytest.param({"tcp": True}, id="tcp-fin"),
    pytest.param({"tcp": True, "reset": True}, id="tcp-rst"),
])
@pytest.mark.fake_clamd(behaviour="close_mid", after=1 << 16)
@CLIENT_LEG
def test_clamd_dying_mid_stream(clamd_options, client_leg, appliance, next_hop, own_clamd):
    """clamd goes away after 64 KiB of an 8 MiB INSTREAM -> 451, nothing delivered.

    The stream is larger than any socket buffer here (TCP send buffer <= 4 MiB, and the peer
    stops reading), so the daemon is surely still writing when clamd goes. With a stream that
    fits in the buffers, see test_clamd_dying_after_the_stream_before_answering.
    """
    replies = transaction(appliance, big_message(6 << 20), tls=client_leg == "tls")
    assert final_reply(replies) == R.LOCAL_ERROR
    assert own_clamd.faulty_done.wait(5) and own_clamd.stream_bytes == [1 << 16]
    assert "status=CLAMAV-ERROR" in appliance.wait_log("status=CLAMAV-ERROR")
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("clamd_options", [
    pytest.param({"behaviour": "close_at_end"}, id="after-the-stream-unix"),
    pytest.param({"behaviour": "close_at_end", "tcp": True}, id="after-the-stream-tcp"),
    pytest.param({"behaviour": "half_close_mid", "after": 1 << 16}, id="mid-stream-unix"),
    pytest.param({"behaviour": "half_close_mid", "after": 1 << 16, "tcp": True},
                 id="mid-stream-tcp"),
])
@pytest.mark.fake_clamd(behaviour="close_at_end")
@CLIENT_LEG
def test_clamd_dying_after_the_stream_before_answering(client_leg, clamd_options, appliance,
                                                       next_hop, own_clamd):
    """clamd hangs up without a verdict, and the daemon's writes all went through (the whole
    stream was read, or still fitted in the socket buffers) -> 451, never 250: only clamd's
    explicit "stream: OK" is clean, never its silence."""
    replies = transaction(appliance, big_message(1 << 20), tls=client_leg == "tls")
    assert own_clamd.faulty_done.wait(5) and own_clamd.client_gave_up == [False]
    assert final_reply(replies) == R.LOCAL_ERROR
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@CLIENT_LEG
def test_clamd_sigkilled_while_the_daemon_streams_to_it(client_leg, appliance, next_hop, own_clamd):
    """A real clamd, SIGKILLed while a 4 MiB INSTREAM to it is in progress -> 451; clamd
    restarted -> the same daemon delivers again.

    clamd is SIGSTOPped first, so the daemon is sure to be blocked in the middle of its
    INSTREAM (the socket buffers hold far less than 4 MiB) when the SIGKILL lands.
    """
    assert_still_serving(appliance, next_hop, "warm-up")  # scanner threads and clients exist
    next_hop.clear()
    os.kill(own_clamd.pid, signal.SIGSTOP)
    killed = False
    try:
        message = big_message(4 << 20)
        result: list = []
        client = threading.Thread(target=lambda: result.append(
            transaction(appliance, message, tls=client_leg == "tls")))
        client.start()
        # the whole body is spooled once the spool file holds it all; the scan starts right then
        wait_until(lambda: any(size >= len(message) - 4096 for size in appliance.spool_sizes()),
                   timeout=20,
                   what="the body to be spooled")
        time.sleep(0.5)
        assert client.is_alive() and not result, "the proxy answered while clamd was stopped"
        own_clamd.kill()  # SIGKILL (a stopped process dies all the same)
        killed = True
        client.join(15)
    finally:
        if not killed:
            os.kill(own_clamd.pid, signal.SIGCONT)
    assert result, "the client got no answer"
    assert final_reply(result[0]) == R.LOCAL_ERROR
    assert "status=CLAMAV-ERROR" in appliance.wait_log("status=CLAMAV-ERROR")
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    own_clamd.start()
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("reply", [
    pytest.param(b"stream: what? WEIRD\n", id="unknown-status"),
    pytest.param(b"stream: OKAY\n", id="almost-ok"),
    pytest.param(b"\n", id="blank-line"),
    pytest.param(b"no colon here at all\n", id="no-separator"),
    pytest.param(b"\x00\xff\xfe\x80junk\x01\x02\n", id="binary-junk"),
    pytest.param(b"PONG\n", id="wrong-answer"),
])
@pytest.mark.fake_clamd(behaviour="reply")
@CLIENT_LEG
def test_clamd_answering_garbage(client_leg, reply, appliance, next_hop, own_clamd):
    """clamd's answer to INSTREAM is not "stream: OK" nor "stream: NAME FOUND" -> 451."""
    own_clamd.reply = reply
    replies = transaction(appliance, clean_message("garbage-clamd"), tls=client_leg == "tls")
    assert own_clamd.faulty_done.wait(5) and own_clamd.scans >= 1
    assert final_reply(replies) == R.LOCAL_ERROR, replies
    assert_nothing_delivered(next_hop)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.fake_clamd(behaviour="reply", reply=b"stream: Eicar-Test-Signature FOUNDX\n")
@CLIENT_LEG
def test_infected_message_never_passes_a_confused_clamd(client_leg, appliance, next_hop, own_clamd):
    message = b"Subject: eicar\r\n\r\n" + EICAR + b"\r\n"
    replies = transaction(appliance, message, tls=client_leg == "tls")
    assert own_clamd.faulty_done.wait(5)
    assert final_reply(replies)[:1] == "4", replies
    time.sleep(0.2)
    assert all(EICAR not in c for c in delivered_contents(next_hop))


# -- the next hop ------------------------------------------------------------------------------


@pytest.mark.fake_next_hop()
def test_next_hop_refusing_connections_then_back(appliance, next_hop):
    """Connection refused -> 421 at once; the next hop back on its port -> served again."""
    from lab import RecordingNextHop

    port = next_hop.port
    next_hop.arm()  # (the fixture's probe session is over: see the next row for why it matters)
    next_hop.stop()
    started = time.monotonic()
    assert send_raw(appliance.host, appliance.port, ["EHLO client.test"]) == [R.NEXT_HOP_DOWN]
    assert time.monotonic() - started < 2
    assert_no_spool_files(appliance)
    with RecordingNextHop("127.0.0.1", port) as again:
        assert_still_serving(appliance, again)


@pytest.mark.fake_next_hop()
def test_next_hop_resetting_right_after_accepting(appliance, next_hop):
    """A next hop that accepts and at once resets (a crashing or overloaded MTA), with 8 clients
    at a time: every client gets the 421 of an unreachable next hop, and nothing crashes.

    The reset has to land in a window of one event-loop turn; 8 concurrent clients make the loop
    busy enough for that to happen to some 4-9 % of 800 connections (about 1 % one at a time).
    """
    next_hop.arm({"greeting": RESET}, faulty_sessions=10_000, repeat=True)
    got: list[tuple[str, ...]] = []

    def client() -> None:
        for _ in range(100):
            got.append(tuple(send_raw(appliance.host, appliance.port, ["QUIT"])))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    next_hop.disarm()
    assert len(got) == 800 and len(next_hop.sessions) > 800
    assert {reply for reply in got if reply != (R.NEXT_HOP_DOWN,)} == set()
    assert "Traceback" not in appliance.log()
    assert_still_serving(appliance, next_hop)


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_next_hop()
def test_next_hop_that_never_greets(appliance, next_hop):
    """The next hop accepts the connection and says nothing -> a 4xx after TimeOut, no hang."""
    next_hop.arm({"greeting": HANG})
    started = time.monotonic()
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test"], timeout=15)
    took = time.monotonic() - started
    assert replies == [R.NEXT_HOP_DOWN]
    assert 1.5 < took < 6, took
    session = next_hop.armed_session()
    assert next_hop.wait_ended(session.index).ended == "peer closed"  # the proxy hung up
    assert_still_serving(appliance, next_hop)


@pytest.mark.fake_next_hop()
def test_next_hop_closing_before_greeting_gets_421(appliance, next_hop):
    """Accepted, then closed before any greeting -> the same 421 as a refused connection (RFC
    5321 3.1: a greeting is 220 or 554, and 421 may come at any time)."""
    next_hop.arm({"greeting": CLOSE})
    replies = send_raw(appliance.host, appliance.port, ["EHLO client.test"])
    next_hop.armed_session()
    assert replies == [R.NEXT_HOP_DOWN]


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", "DOT"])
@pytest.mark.parametrize("reply", ["451 4.3.0 Try again later", "554 5.7.1 Go away"],
                         ids=["4xx", "5xx"])
@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_next_hop_refusing_at_each_stage(stage, reply, client_leg, appliance, next_hop):
    """The next hop's refusal at MAIL, RCPT, the DATA command or the end of data reaches the
    client verbatim; nothing is delivered."""
    next_hop.arm({stage: reply})
    tls = client_leg == "tls"
    if stage in ("MAIL", "RCPT"):  # the proxy refuses DATA itself then: no body to send
        replies = send_raw(appliance.host, appliance.port, [*ENVELOPE, "DATA", "QUIT"], tls=tls)
    else:
        replies = transaction(appliance, clean_message(f"refused-at-{stage}"), tls=tls)
    assert replies[0] == R.GREETING
    if stage == "MAIL":
        assert replies[2] == reply
        assert replies[4] == R.NEED_RCPT  # DATA: nothing to send
    elif stage == "RCPT":
        assert replies[3] == reply
        assert replies[4] == R.NEED_RCPT
    else:
        assert final_reply(replies) == reply  # after the client's end of data
    assert replies[-1].startswith("221")
    assert next_hop.wait_ended(next_hop.armed_session().index).ended == "quit"
    assert next_hop.delivered() == []
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("stage", ["DATA", "DOT"])
@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_same_session_goes_on_after_a_refused_message(client_leg, stage, appliance, next_hop):
    """RFC 5321 4.1.1.4: after the reply to the end of data the transaction is over, failed or
    not; the client's next MAIL in the same session (no RSET) must work."""
    next_hop.arm({stage: "554 5.7.1 Not this one"})
    second = clean_message("second-in-session")
    replies = send_raw(appliance.host, appliance.port, [
        *ENVELOPE, "DATA", (clean_message("first") + b".\r\n", 1),
        "MAIL FROM:<carol@example.com>", "RCPT TO:<dave@example.com>", "DATA",
        (second + b".\r\n", 1), "QUIT"], tls=client_leg == "tls")
    assert replies[5] == "554 5.7.1 Not this one"
    assert replies[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA], replies
    assert replies[9].startswith("250 2.0.0 Ok: queued as FAKE"), replies
    [delivered] = next_hop.delivered()
    assert delivered.content == second.replace(b"\r\n\r\n", b"\r\n" + R.DEFAULT_HEADER
                                               + b"\r\n\r\n", 1)


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.parametrize("stage", ["MAIL", "DATA", "DOT"])
@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_next_hop_hanging(client_leg, stage, appliance, next_hop):
    """The next hop stops answering (at MAIL, at the DATA command, after the final dot) -> the
    client gets a 4xx after about TimeOut, not a hang: 421 between commands, the original's 451
    as the answer to a message; nothing is delivered."""
    next_hop.arm({stage: HANG})
    started = time.monotonic()
    sock, buf = connect(appliance, 20, tls=client_leg == "tls")
    with sock:
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(sock, buf).startswith("250")
        for command in ENVELOPE[1:] + ["DATA"]:
            sock.sendall(command.encode() + b"\r\n")
            reply = read_reply(sock, buf)
            if reply is None or reply[:1] not in ("2", "3"):
                break
        else:
            started = time.monotonic()
            sock.sendall(clean_message("hang") + b".\r\n")
            reply = read_reply(sock, buf)
        took = time.monotonic() - started
        assert reply == (R.NEXT_HOP_LOST if stage == "MAIL" else R.LOCAL_ERROR)
        assert 1.5 < took < 6, took
    session = next_hop.wait_ended(next_hop.armed_session().index)
    assert session.ended == "peer closed"  # the proxy gave up on it
    if stage == "DOT":
        [txn] = next_hop.transactions()  # it has the whole message, and never said 250:
        assert txn.reply == HANG  # the client retries, at worst a duplicate, never a loss
    assert next_hop.delivered() == []
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("how", [
    pytest.param({"script": {"MAIL": RESET}}, id="rst-at-MAIL"),
    pytest.param({"script": {"DATA": CLOSE}}, id="at-DATA"),
    pytest.param({"close_in_body_after": 1 << 16}, id="fin-mid-body"),
    pytest.param({"close_in_body_after": 1 << 16, "reset_in_body": True}, id="rst-mid-body"),
    pytest.param({"script": {"DOT": CLOSE}}, id="after-dot-without-reply"),
])
@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_next_hop_closing(how, client_leg, appliance, next_hop):
    """The next hop drops the connection (FIN or RST) anywhere -> the client gets a 4xx and is
    never told 250 (421 between commands, 451 as the answer to the message); the next hop has
    no accepted message."""
    next_hop.arm(**how)
    replies = transaction(appliance, big_message(1 << 20), tls=client_leg == "tls")
    said = [r for r in replies if r[:1] in ("4", "5")]
    expected = R.NEXT_HOP_LOST if "MAIL" in how.get("script", {}) else R.LOCAL_ERROR
    assert said == [expected], replies  # and then the connection is closed
    assert next_hop.wait_ended(next_hop.armed_session().index).ended in ("we closed", "we reset")
    assert next_hop.delivered() == []
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


STARTTLS_EHLO = ("250-fake.test", "250-STARTTLS", "250 8BITMIME")


@pytest.mark.parametrize("out_tls", [
    pytest.param("may", marks=pytest.mark.appliance_config(OutTLS="may", TimeOut=3)),
    pytest.param("encrypt", marks=pytest.mark.appliance_config(OutTLS="encrypt", TimeOut=3)),
])
@pytest.mark.fake_next_hop(ehlo=STARTTLS_EHLO)
def test_next_hop_dropping_the_connection_mid_handshake(out_tls, appliance, next_hop):
    """The next hop offers STARTTLS, says 220, then drops the connection instead of doing the
    handshake. OutTLS: may connects again in clear and delivers (logged); encrypt tells the
    client 421 at its EHLO and sends nothing, in clear or otherwise."""
    # (STARTTLS is not a verb the fake knows: its "*" entry)
    next_hop.arm({"*": ThenClose("220 2.0.0 Ready to start TLS")})
    replies = transaction(appliance, clean_message(f"tls-{out_tls}"))
    log = appliance.wait_log("TLS handshake with server")
    if out_tls == "may":
        assert final_reply(replies).startswith("250 2.0.0 Ok: queued as FAKE"), replies
        assert len(next_hop.delivered()) == 1
        assert "connecting again, in clear" in log
    else:
        assert replies[1] == R.NEXT_HOP_INSECURE, replies
        assert next_hop.transactions(complete_only=False) == []
        assert_nothing_delivered(next_hop)
        assert appliance.proc.poll() is None
    assert_no_spool_files(appliance)


@pytest.mark.parametrize(("stage", "client_leg"), [
    *[(stage, "clear") for stage in ("greeting", "EHLO", "MAIL", "RCPT", "DOT")],
    # (not "greeting" nor "EHLO" inside TLS: that fault answers the client's first EHLO)
    *[pytest.param(stage, "tls", marks=pytest.mark.client_tls)
      for stage in ("MAIL", "RCPT", "DOT")],
])
@pytest.mark.fake_next_hop()
def test_next_hop_hanging_up_right_after_a_positive_reply(stage, client_leg, appliance, next_hop):
    """The next hop answers (220, 250, 250 to the message) and closes at once -> the client
    gets that reply, then the proxy's 421, never a connection dropped without a word. A
    message it said 250 to was delivered once."""
    replies = {"greeting": "220 fake.test ESMTP", "EHLO": "250 fake.test",
               "MAIL": "250 2.1.0 OK", "RCPT": "250 2.1.5 OK", "DOT": "250 2.0.0 Ok: queued"}
    next_hop.arm({stage: ThenClose(replies[stage])})
    steps = [*ENVELOPE, "DATA", clean_message("hang-up").decode() + "."]
    stop = {"greeting": 0, "EHLO": 1, "MAIL": 2, "RCPT": 3, "DOT": 5}[stage]
    sock, buf = connect(appliance, 20, tls=client_leg == "tls")
    with sock:
        said = [R.GREETING]
        for command in steps[:stop]:
            sock.sendall(command.encode() + b"\r\n")
            said.append(read_reply(sock, buf))
        assert all(reply[:1] in ("2", "3") for reply in said), said
        time.sleep(0.2)
        with contextlib.suppress(OSError):  # the proxy may have said 421 and closed already
            sock.sendall(b"NOOP\r\n")
        assert read_reply(sock, buf) == R.NEXT_HOP_LOST, said
        assert read_reply(sock, buf) is None  # and closed
    assert len(next_hop.delivered()) == (1 if stage == "DOT" else 0)
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)


# -- TempDirectory -----------------------------------------------------------------------------


def _mount_tmpfs(path, *options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("mode=0700", *options)), "tmpfs",
                    str(path)], check=True, capture_output=True)


def _umount(path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.root
@CLIENT_LEG
def test_temp_directory_full(client_leg, appliance, next_hop):
    """A 1 MiB TempDirectory and a 2 MiB message -> 451 (the whole body is still read, so the
    session stays in step); a small one in the same session then goes through."""
    spool = appliance.spool_dir
    _mount_tmpfs(spool, "size=1m")
    try:
        message = big_message(2 << 20, "too-big-for-the-disk")
        token = f"fits-{time.time_ns()}"
        replies = send_raw(appliance.host, appliance.port, [
            *ENVELOPE, "DATA", (message + b".\r\n", 1),
            *ENVELOPE[1:], "DATA", (clean_message(token) + b".\r\n", 1), "QUIT"],
            tls=client_leg == "tls")
        assert replies[5] == R.LOCAL_ERROR, replies[:6]
        assert replies[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA]
        assert replies[9].startswith("250 2.0.0"), replies
        assert "couldn't write to cache file" in appliance.log()
        [content] = wait_until(lambda: delivered_contents(next_hop), what="the small message")
        assert token.encode() in content
        assert os.listdir(spool) == []  # nothing left on the full disk either
    finally:
        _umount(spool)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("how", ["missing", "not-a-directory", "read-only"])
@CLIENT_LEG
def test_temp_directory_unusable(client_leg, how, appliance, next_hop):
    """TempDirectory missing, a file, or read-only: a body too big to keep in memory -> 451 and
    the session goes on; a small one in the same session never needed the disk and is delivered;
    once the directory is fixed the same daemon spools big ones again."""
    spool = appliance.spool_dir
    mounted = False
    if how != "read-only":
        spool.rmdir()
    if how == "not-a-directory":
        spool.write_bytes(b"not a directory\n")
    elif how == "read-only":
        if os.geteuid() == 0:  # root ignores modes: a read-only file system it is
            _mount_tmpfs(spool, "ro")
            mounted = True
        else:
            spool.chmod(0o500)
    big = big_message(MEMORY_LIMIT + 4096, f"spool-{how}")
    token = f"small-{how}-{time.time_ns()}"
    try:
        replies = send_raw(appliance.host, appliance.port, [
            *ENVELOPE, "DATA", (big + b".\r\n", 1),
            *ENVELOPE[1:], "DATA", (clean_message(token) + b".\r\n", 1), "QUIT"],
            tls=client_leg == "tls")
        assert replies[5] == R.LOCAL_ERROR, replies[:6]
        assert replies[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA]
        assert replies[9].startswith("250 2.0.0"), replies
        assert f"couldn't open cache file in {spool}" in appliance.log()
        [content] = wait_until(lambda: delivered_contents(next_hop), what="the small message")
        assert token.encode() in content
    finally:
        if mounted:
            _umount(spool)
        elif how == "read-only":
            spool.chmod(0o700)
        else:
            if how == "not-a-directory":
                spool.unlink()
            spool.mkdir(mode=0o700)
    next_hop.clear()
    replies = transaction(appliance, big, tls=client_leg == "tls")
    assert final_reply(replies).startswith("250 2.0.0"), replies
    assert_still_serving(appliance, next_hop)


def test_unusable_temp_directory_is_reported_at_start_up(tmp_path, clamd, next_hop):
    """Small bodies never touch TempDirectory, so a broken one is named at start-up, before a
    big message finds it."""
    missing = tmp_path / "no-such-spool"
    log = tmp_path / "clamsmtpd.stderr"
    proc = start_daemon(tmp_path / "clamsmtpd.conf",
                        proxy_directives(free_port(), next_hop, clamd, missing), log,
                        debug_level=3)
    try:
        wait_until(lambda: "is not usable" in log.read_text(), timeout=20,
                   what="the TempDirectory warning")
    finally:
        proc.terminate()
        proc.wait(10)
    said = log.read_text()
    assert f"TempDirectory {missing} is not usable (No such file or directory)" in said, said
    assert "will be deferred (451) until it is" in said


def test_unusable_temp_directory_is_reported_on_reload(appliance, tmp_path):
    """The same on SIGHUP, when the new configuration names a TempDirectory that is not there."""
    missing = tmp_path / "gone"
    write_appliance_config(appliance.conf_path, {**appliance.directives, "TempDirectory": missing})
    appliance.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: f"TempDirectory {missing} is not usable" in appliance.log(), timeout=20,
               what="the TempDirectory warning after SIGHUP")


# -- the client --------------------------------------------------------------------------------


@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_client_resetting_mid_data(client_leg, appliance, next_hop):
    """The client sends half a body, then an RST (SO_LINGER 0): nothing is delivered, the spool
    is cleaned up at once (not at shutdown), the next hop is hung up on, the daemon serves on."""
    next_hop.arm()
    sock, _ = open_session(appliance, tls=client_leg == "tls")
    sock.sendall(b"DATA\r\n")
    assert sock.recv(100).startswith(b"354")
    sock.sendall(b"Subject: half\r\n\r\n" + base64.b64encode(os.urandom(300_000)))
    wait_until(appliance.spool_files, what="the spool file")
    rst_close(sock)
    assert next_hop.wait_ended(next_hop.armed_session().index).ended == "peer closed"
    assert_no_spool_files(appliance)
    assert next_hop.transactions(complete_only=False)[-1].data == b""  # no DATA was sent on
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("close", ["rst", "fin"])
@pytest.mark.appliance_config(TimeOut=5)
@pytest.mark.fake_clamd(behaviour="slow", delay=1.0, reply=b"stream: OK\n")
@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_client_leaving_while_its_message_is_scanned(client_leg, close, appliance, next_hop,
                                                     own_clamd):
    """The client sends the whole message, then leaves while clamd is still busy. It was never
    told 250, so it will send again: the message may be delivered once (today: after a FIN the
    proxy finishes the job, an RST cancels the session) or dropped, never twice; nothing is
    left behind."""
    next_hop.arm()
    token = f"orphan-{time.time_ns()}".encode()
    sock, _ = open_session(appliance, tls=client_leg == "tls")
    sock.sendall(b"DATA\r\n")
    assert sock.recv(100).startswith(b"354")
    sock.sendall(clean_message(token.decode()) + b".\r\n")
    wait_until(lambda: own_clamd.scans, what="the scan to start")
    if close == "rst":
        rst_close(sock)
    else:
        sock.close()
    next_hop.wait_ended(next_hop.armed_session().index, timeout=10)
    copies = [c for c in delivered_contents(next_hop) if token in c]
    assert len(copies) <= 1
    assert_no_spool_files(appliance)
    assert_still_serving(appliance, next_hop)
    assert len([c for c in delivered_contents(next_hop) if token in c]) == len(copies)


def _burst(appliance, next_hop, n: int) -> list[socket.socket]:
    """`n` connections queued at once: the daemon is stopped while they connect."""
    next_hop.arm()  # the fixture's probe session is over at the next hop...
    time.sleep(0.2)  # ... and so in the daemon: it holds no slot any more
    pids = appliance.pids()  # (with Workers, its workers too)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        return [socket.create_connection(appliance.address, timeout=15) for _ in range(n)]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.appliance_config(MaxConnections=4)
@pytest.mark.fake_next_hop()
@ONE_AND_TWO_WORKERS
def test_flood_of_twice_max_connections(workers, appliance, next_hop):
    """2 x MaxConnections land in the listen queue at once (the daemon is SIGSTOPped meanwhile,
    as a busy moment would do), each then sending a message: MaxConnections are served (each
    message delivered exactly once), the rest told "421 Server busy"; nobody hangs or gets a
    250 for nothing; the daemon serves on afterwards. With two workers the same holds (a burst
    already queued is mostly taken by the worker that wakes first; sessions spread over both
    workers: test_workers.py::test_max_connections_is_the_daemons_however_the_sessions_spread)."""
    socks = _burst(appliance, next_hop, 8)
    results: dict[int, list[str]] = {}

    def talk(i: int, sock: socket.socket) -> None:
        buf = bytearray()
        first = read_reply(sock, buf)
        got = [first]
        if first == R.GREETING:
            body = clean_message(f"flood-{i}") + b".\r\n"
            for command in [*ENVELOPE, "DATA", body, "QUIT"]:
                sock.sendall(command if isinstance(command, bytes) else command.encode() + b"\r\n")
                got.append(read_reply(sock, buf))
        results[i] = got

    threads = [threading.Thread(target=talk, args=(i, s)) for i, s in enumerate(socks)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for sock in socks:
            sock.close()
    assert len(results) == 8
    served = [i for i, got in results.items() if got[0] == R.GREETING]
    busy = [i for i, got in results.items() if got == [R.BUSY]]
    assert (len(served), len(busy)) == (4, 4), results
    for i in served:
        assert results[i][5].startswith("250 "), results[i]
    contents = wait_until(lambda: len(delivered_contents(next_hop)) >= len(served) and
                          delivered_contents(next_hop), what="the served messages")
    for i in served:
        assert sum(f"flood-{i}.".encode() in c for c in contents) == 1
    for i in busy:
        assert not any(f"flood-{i}.".encode() in c for c in contents)
    assert_still_serving(appliance, next_hop)


def _drip(sock: socket.socket, data: bytes, gap: float) -> None:
    """Send `data` one byte every `gap` seconds (stop quietly if the peer hangs up)."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return
        time.sleep(gap)


@pytest.mark.appliance_config(TimeOut=1)
@CLIENT_LEG
def test_slow_drip_command_within_timeout(client_leg, appliance, next_hop):
    """A command dripped one byte every 0.2 s (TimeOut 1 s; the whole line takes 2.8 s) is
    accepted, since the client is never silent for TimeOut."""
    sock, buf = connect(appliance, tls=client_leg == "tls")
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"HELO client.test\r\n")
        assert read_reply(sock, buf).startswith("250")
        _drip(sock, b"MAIL FROM:<>\r\n", 0.2)
        reply = read_reply(sock, buf)
        assert reply is not None and reply.startswith("250"), reply
    assert_still_serving(appliance, next_hop)


@pytest.mark.appliance_config(TimeOut=1)
@CLIENT_LEG
def test_slow_drip_body_within_timeout(client_leg, appliance, next_hop):
    """A body dripped one byte every 0.2 s (TimeOut 1 s; 3 s in all) is delivered intact."""
    body = b"S: d\r\n\r\nhi\r\n"
    sock, buf = open_session(appliance, tls=client_leg == "tls")
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"DATA\r\n")
        assert read_reply(sock, buf) == R.START_DATA
        started = time.monotonic()
        _drip(sock, body + b".\r\n", 0.2)
        reply = read_reply(sock, buf)
        assert time.monotonic() - started > 2
        assert reply.startswith("250 "), reply
    [content] = delivered_contents(next_hop)
    assert content == b"S: d\r\n" + R.DEFAULT_HEADER + b"\r\n\r\nhi\r\n"
    assert_still_serving(appliance, next_hop)


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_next_hop()
@CLIENT_LEG
def test_client_stalling_mid_command(client_leg, appliance, next_hop):
    """Half a command, then silence past TimeOut -> the 421 timeout reply, the connection is
    closed, and the half command never reaches the next hop."""
    sock, buf = open_session(appliance, tls=client_leg == "tls")
    with sock:
        sock.sendall(b"DATA\r\n")
        assert read_reply(sock, buf) == R.START_DATA
        sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<stall")
        assert read_reply(sock, buf).startswith("250 ")  # the first message is through
        started = time.monotonic()
        assert read_reply(sock, buf) == R.TIMEOUT
        assert 1.5 < time.monotonic() - started < 5
        assert read_reply(sock, buf) is None  # closed
    assert len(next_hop.delivered()) == 1
    assert not any(b"stall" in c for s in next_hop.sessions for c in s.commands)
    assert_still_serving(appliance, next_hop)
