"""Timeouts on the loop's one shared timer (appliance/deadline.py SharedDeadlines), on both
loops: many waits at once (stalled clients, each cut at its own TimeOut, beside normal sessions
whose every wait is shorter than TimeOut but spans the others' expiries: neither delayed nor
cut); a next hop that stalls in the middle of a reply line; a clamd whose connect never completes
(a listener with a full accept queue drops the SYN), alone (451 at ScanTimeout) or before a real
one (which scans)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest
import replies as R
from faultkit import assert_still_serving, delivered_contents
from helpers import free_port, read_reply
from matrixkit import connect, open_session, timed_transaction

LOOPS = pytest.mark.parametrize("event_loop_choice", ["asyncio", "uvloop"], indirect=True)

STALLED = 25
NORMAL = 25


@pytest.mark.appliance_config(TimeOut=2, MaxConnections=100)
@pytest.mark.parametrize("event_loop_choice", [
    "asyncio", "uvloop",
    pytest.param("uvloop", id="uvloop-workers-2", marks=pytest.mark.appliance_config(Workers=2)),
], indirect=True)
def test_many_stalled_and_normal_sessions_share_the_timer(event_loop_choice, appliance,
                                                          next_hop):
    results: dict[str, object] = {}
    start = time.monotonic() + 0.5

    def stalled(i: int) -> None:
        sock, buf = open_session(appliance, 15)
        with sock:
            sock.sendall(b"DATA\r\n")
            assert read_reply(sock, buf) == R.START_DATA
            time.sleep(max(0.0, start + i * 0.06 - time.monotonic()))  # stalls one after another
            sock.sendall(b"Subject: stalled\r\n\r\nhalf a bo")
            silent_from = time.monotonic()
            reply = read_reply(sock, buf)
            results[f"stalled {i}"] = (reply, round(time.monotonic() - silent_from, 2))

    def normal(i: int) -> None:
        done = []
        for n in range(3):
            sock, buf = open_session(appliance, 15)
            with sock:
                time.sleep(1.2)  # each wait well within TimeOut, across others' expiries
                sock.sendall(b"DATA\r\n")
                assert read_reply(sock, buf) == R.START_DATA
                time.sleep(1.2)
                sock.sendall(f"Subject: normal {i} {n}\r\n\r\nbody\r\n".encode())
                time.sleep(1.2)
                sock.sendall(b".\r\n")
                done.append(read_reply(sock, buf))
                sock.sendall(b"QUIT\r\n")
                read_reply(sock, buf)
        results[f"normal {i}"] = done

    threads = [threading.Thread(target=stalled, args=(i,)) for i in range(STALLED)]
    threads += [threading.Thread(target=normal, args=(i,)) for i in range(NORMAL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == STALLED + NORMAL, sorted(results)
    for i in range(STALLED):
        reply, after = results[f"stalled {i}"]
        assert reply == R.TIMEOUT and 1.9 <= after < 3.5, (i, reply, after)
    for i in range(NORMAL):
        assert all(r is not None and r.startswith("250 ") for r in results[f"normal {i}"]), \
            results[f"normal {i}"]
    assert len(delivered_contents(next_hop)) == 3 * NORMAL
    assert_still_serving(appliance, next_hop)


class _StallingMidReply(socketserver.ThreadingTCPServer):
    """A next hop that answers MAIL with the first bytes of a reply line, then says nothing."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        super().__init__((self.host, self.port), _StallingHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _StallingHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(30)
        self.wfile.write(b"220 stalling.test ESMTP\r\n")
        for line in self.rfile:
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 stalling.test\r\n")
            elif verb == b"MAIL":
                self.wfile.write(b"250-2.1.0 O")  # ... and no more
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


class _BlackholedNextHop:
    def __init__(self) -> None:
        self.hole = _FullBacklog()
        self.host, self.port = "127.0.0.1", self.hole.port


@pytest.fixture
def next_hop(request):
    if "blackholed_next_hop" in request.fixturenames:
        hop = _BlackholedNextHop()
        try:
            yield hop
        finally:
            hop.hole.close()
        return
    if "stalling_next_hop" not in request.fixturenames:
        yield request.getfixturevalue("recording_next_hop")
        return
    server = _StallingMidReply()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def recording_next_hop():
    from lab import RecordingNextHop
    with RecordingNextHop("127.0.0.1", 0) as hop:
        yield hop


@pytest.fixture
def stalling_next_hop():
    return None


@pytest.fixture
def blackholed_next_hop():
    return None


@pytest.mark.appliance_config(TimeOut=2)
@LOOPS
def test_next_hop_stalling_mid_reply_line(event_loop_choice, stalling_next_hop, appliance,
                                          next_hop):
    sock, buf = socket.create_connection(appliance.address, timeout=15), bytearray()
    with sock:
        assert read_reply(sock, buf).startswith("220")
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(sock, buf).startswith("250")
        sock.sendall(b"MAIL FROM:<a@example.com>\r\n")
        started = time.monotonic()
        reply = read_reply(sock, buf)
        took = time.monotonic() - started
    assert reply is not None and reply[:1] == "4", reply
    assert 1.8 < took < 4, took


class _FullBacklog:
    """A listener on loopback whose accept queue is full: a connect to it never completes."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(0)
        self.waiting: list[socket.socket] = []
        for _ in range(4):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(0.2)
            try:
                sock.connect(("127.0.0.1", self.port))
            except OSError:
                sock.close()
                break
            self.waiting.append(sock)

    def close(self) -> None:
        for sock in self.waiting:
            sock.close()
        self.listener.close()


class _Clamds:
    def __init__(self, *addresses: str) -> None:
        self.socket_path = ", ".join(addresses)


@pytest.fixture
def appliance_clamd(request, clamd):
    if "blackholed_clamd" not in request.fixturenames:
        return clamd
    hole = request.getfixturevalue("blackholed_clamd")
    if request.node.callspec.params.get("clamds") == "alone":
        return _Clamds(f"127.0.0.1:{hole.port}")
    return _Clamds(f"127.0.0.1:{hole.port}", clamd.socket_path)


@pytest.fixture
def blackholed_clamd():
    hole = _FullBacklog()
    try:
        yield hole
    finally:
        hole.close()


@pytest.mark.appliance_config(TimeOut=6, ScanTimeout=2)
@pytest.mark.parametrize("clamds", ["alone", "before a real one"])
@LOOPS
def test_clamd_whose_connect_never_completes(event_loop_choice, clamds, blackholed_clamd,
                                             appliance_clamd, appliance, next_hop):
    replies, took = timed_transaction(appliance, b"Subject: c\r\n\r\nclean\r\n")
    final = replies[5] if len(replies) > 5 else ""
    if clamds == "alone":
        assert final.startswith("451"), replies
        assert 1.8 < took < 4.5, took  # ScanTimeout, not TimeOut
        assert "timed out" in appliance.log()
    else:
        assert final.startswith("250"), (replies, took)
        assert len(delivered_contents(next_hop)) == 1


@pytest.mark.appliance_config(TimeOut=10, ScanTimeout=2)
@pytest.mark.fake_clamd(behaviour="silent", faulty=5)
@LOOPS
def test_stalled_scans_in_flight_each_end_at_its_scan_timeout(event_loop_choice, appliance,
                                                              next_hop, own_clamd):
    """Five scans that clamd never answers, started 0.3 s apart, each 451 at its own
    ScanTimeout, while five others (answered) go through meanwhile, undelayed."""
    results: dict[str, tuple[str, float]] = {}

    def send(name: str, after: float) -> None:
        time.sleep(after)
        replies, took = timed_transaction(appliance, f"Subject: {name}\r\n\r\nclean\r\n".encode())
        results[name] = (replies[5] if len(replies) > 5 else "", took)

    threads = [threading.Thread(target=send, args=(f"stalled {i}", 0.3 * i)) for i in range(5)]
    threads += [threading.Thread(target=send, args=(f"normal {i}", 1.6 + 0.1 * i))
                for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for i in range(5):
        final, took = results[f"stalled {i}"]
        assert final.startswith("451") and 1.8 < took < 4, (i, final, took)
        final, took = results[f"normal {i}"]
        assert final.startswith("250") and took < 1.5, (i, final, took)
    assert len(delivered_contents(next_hop)) == 5


@pytest.mark.appliance_config(TimeOut=2, MaxConnections=1)
@LOOPS
def test_a_client_silent_before_helo_gives_its_place_back_at_timeout(event_loop_choice,
                                                                      appliance, next_hop):
    """MaxConnections 1: a client that never says HELO is cut at TimeOut (421), and its place
    serves the next one (refused with 421 busy while it was held)."""
    for _ in range(50):  # (the fixture's start-up probe may still hold the place)
        silent = socket.create_connection(appliance.address, timeout=10)
        if silent.recv(100).startswith(b"220"):
            break
        silent.close()
        time.sleep(0.1)
    with silent:
        started = time.monotonic()
        with socket.create_connection(appliance.address, timeout=10) as other:
            assert other.recv(100) == (R.BUSY + "\r\n").encode()
        assert silent.recv(200) == (R.TIMEOUT + "\r\n").encode()
        assert 1.8 < time.monotonic() - started < 4
    time.sleep(0.2)
    replies, _ = timed_transaction(appliance, b"Subject: next\r\n\r\nclean\r\n")
    assert replies[5].startswith("250 "), replies


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.client_tls
@LOOPS
def test_a_client_silent_inside_tls_is_told_at_timeout(event_loop_choice, appliance, next_hop):
    """After STARTTLS and half a command, silence: the 421 comes inside TLS at TimeOut."""
    sock, buf = connect(appliance, tls=True)
    with sock:
        sock.sendall(b"EHLO client.test\r\n")
        assert read_reply(sock, buf).startswith("250")
        sock.sendall(b"MAIL FROM:<sil")
        started = time.monotonic()
        assert read_reply(sock, buf) == R.TIMEOUT
        assert 1.8 < time.monotonic() - started < 4


@pytest.mark.appliance_config(TimeOut=2)
@LOOPS
def test_a_next_hop_whose_connect_never_completes(event_loop_choice, blackholed_next_hop,
                                                  next_hop, appliance):
    """OutAddress is a listener whose accept queue is full (the SYN is dropped): the client
    is told 4xx at TimeOut, and the daemon goes on serving others (told the same)."""
    started = time.monotonic()
    sock, buf = socket.create_connection(appliance.address, timeout=15), bytearray()
    with sock:
        sock.sendall(b"EHLO client.test\r\n")
        reply = read_reply(sock, buf)
    took = time.monotonic() - started
    assert reply is not None and reply[:1] == "4", reply
    assert 1.8 < took < 4, took
