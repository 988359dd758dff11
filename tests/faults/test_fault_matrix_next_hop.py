"""The fault matrix: the next hop refusing, hanging, closing, resetting at every stage.

What every row promises and checks, and the rows' shared driver (transaction, CLIENT_LEG,
...): matrixkit.py. The misbehaving peers are faultkit.py's. docs/reliability.md lists every row.
"""

from __future__ import annotations

import contextlib
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
)
from helpers import read_reply, send_raw
from matrixkit import (
    CLIENT_LEG,
    ENVELOPE,
    assert_nothing_delivered,
    big_message,
    connect,
    final_reply,
    transaction,
)

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
