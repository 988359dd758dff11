"""The fault matrix: clamd stopped, silent, slow, trickling, dying and confused.

What every row promises and checks, and the rows' shared driver (transaction, CLIENT_LEG,
...): matrixkit.py. The misbehaving peers are faultkit.py's. docs/reliability.md lists every row.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import replies as R
from faultkit import assert_no_spool_files, assert_still_serving, clean_message, delivered_contents
from helpers import EICAR, wait_until
from matrixkit import (
    CLIENT_LEG,
    assert_nothing_delivered,
    big_message,
    final_reply,
    timed_transaction,
    transaction,
)

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
