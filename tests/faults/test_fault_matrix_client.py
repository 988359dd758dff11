"""The fault matrix: the client resetting, leaving, flooding, dripping and stalling.

What every row promises and checks, and the rows' shared driver (transaction, CLIENT_LEG,
...): matrixkit.py. The misbehaving peers are faultkit.py's. docs/reliability.md lists every row.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import threading
import time

import pytest
import replies as R
from faultkit import (
    assert_no_spool_files,
    assert_still_serving,
    clean_message,
    delivered_contents,
    rst_close,
)
from helpers import ONE_AND_TWO_WORKERS, read_reply, wait_until
from matrixkit import CLIENT_LEG, ENVELOPE, connect, open_session

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


@pytest.mark.appliance_config(MaxConnections=1, TimeOut=1)
@ONE_AND_TWO_WORKERS
def test_client_that_never_reads(workers, appliance, next_hop):
    """A client pipelines commands and never reads a reply (its receive window stays shut): the
    proxy's writes time out, the connection is cut and its MaxConnections place comes back,
    so the next client is served. A polite close used to wait for the window to open, for
    ever: with MaxConnections 1 every later client got 421 busy (review R1)."""
    flood = b"BDAT 1\r\n" * 20_000  # answered by the proxy itself (502), never read
    sock = wait_until(lambda: _admitted(appliance), what="the flooding client admitted")
    sent = 0
    deadline = time.monotonic() + 30
    with sock:
        while time.monotonic() < deadline:  # until the proxy cuts the connection
            try:
                sent += sock.send(flood)
            except BlockingIOError:
                time.sleep(0.02)
            except OSError:
                break
        else:
            pytest.fail(f"the proxy kept a client that never reads for 30 s ({sent} bytes)")
    assert "network write operation timed out (client)" in appliance.log()
    assert_still_serving(appliance, next_hop)


def _admitted(appliance) -> socket.socket | None:
    """A connection past the greeting, non-blocking, with a small receive buffer; None while
    the place is still taken (the fixture's readiness probe may not have left yet)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(appliance.address)
    if read_reply(sock, bytearray()) != R.GREETING:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def test_client_half_closing_after_its_whole_session(appliance, next_hop):
    """The client writes its message and QUIT, then shuts its sending side (FIN) before any
    reply, as `nc -N` or a script does: it still gets the message's 250 and the 221 (a
    half-closed TCP connection still carries the replies), and the message is delivered once."""
    sock, buf = open_session(appliance)
    with sock:
        sock.sendall(b"DATA\r\n")
        assert read_reply(sock, buf) == R.START_DATA
        sock.sendall(clean_message("half-closed") + b".\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock, buf).startswith("250 ")
        assert read_reply(sock, buf).startswith("221")
        assert read_reply(sock, buf) is None  # then closed
    assert sum(b"half-closed" in c for c in delivered_contents(next_hop)) == 1
