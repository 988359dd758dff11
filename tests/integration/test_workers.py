"""`Workers: 2`: one daemon to the admin, two processes serving (issue #15). The real daemon,
the private clamd, a recording next hop. The fault matrix's flood, the SIGHUP/SIGTERM tests and
the loop guard run with `Workers: 2` too (parametrized where they are)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request

import pytest
import replies as R
from helpers import EICAR, free_port, read_reply, reload_with, send_raw, smtp_client, wait_until

CLEAN = b"Subject: clean\r\n\r\nhello\r\n"
TWO = pytest.mark.appliance_config(Workers=2)
ID = re.compile(r"^clamsmtpd: ([0-9A-F]{6}): accepted connection from", re.M)
HELO_C = re.compile(r"^clamsmtpd: ([0-9A-F]{6}): CLIENT < HELO c$", re.M)


def worker_pids(appliance) -> list[int]:
    """The workers' pids in index order, from the parent's log line."""
    text = appliance.wait_log("workers serving (pids ")
    return [int(p) for p in re.findall(r"workers serving \(pids ([\d ]+)\)", text)[-1].split()]


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@TWO
def test_two_workers_serve_and_ids_are_unique_across_them(appliance, next_hop):
    """~200 connections: every id six hex digits, none twice, and both workers served (a
    worker's ids are FIRST_ID + k * 2 + its index, so both parities appear)."""
    pids = worker_pids(appliance)
    assert len(pids) == 2 and sorted(pids) == sorted(children(appliance.proc.pid))
    for _ in range(200):
        send_raw(appliance.host, appliance.port, ["QUIT"])
    ids = wait_until(lambda: len(ID.findall(appliance.log())) > 200 and ID.findall(appliance.log()),
                     what="200 accepted connections in the log")  # (+ the fixture's probe)
    assert len(ids) == len(set(ids)) == 201
    assert {int(i, 16) % 2 for i in ids} == {0, 1}, "one worker took every connection"
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    assert len(next_hop.wait_for(1)) == 1


@TWO
def test_a_sigkilled_worker_is_logged_replaced_and_its_client_never_gets_250(appliance,
                                                                               next_hop):
    pids = worker_pids(appliance)
    sock = socket.create_connection(appliance.address, timeout=15)
    buf = bytearray()
    try:
        assert read_reply(sock, buf).startswith("220")
        for command in ("HELO c", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"):
            sock.sendall(command.encode() + b"\r\n")
            read_reply(sock, buf)
        sock.sendall(b"Subject: cut\r\n\r\nfirst half\r\n")
        # this client's id: by its HELO (the fixture's probe may be accepted after it, by the
        # other worker, so the last "accepted" line is not always this one's)
        conn_id = wait_until(lambda: HELO_C.findall(appliance.log()), what="the HELO line")[-1]
        victim = pids[int(conn_id, 16) % 2]  # the worker that holds this client
        os.kill(victim, signal.SIGKILL)
        try:
            sock.sendall(b"second half\r\n.\r\n")
            reply = read_reply(sock, buf)
        except OSError:
            reply = None
        assert reply is None or reply.startswith("4"), reply  # dropped, never a 250
    finally:
        sock.close()
    index = pids.index(victim)
    log = appliance.wait_log(f"worker {index} (pid {victim}) killed by signal 9 (SIGKILL)")
    assert "a new worker starts" in log
    appliance.wait_log(f"worker {index} started (pid ")
    for _ in range(6):  # whichever worker takes them, the next connections work
        with smtp_client(appliance) as client:
            client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    received = next_hop.wait_for(6)
    assert len(received) == 6 and not any(b"first half" in m.original_content for m in received)
    assert len(children(appliance.proc.pid)) == 2


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the metrics:\n{text}"
    return float(match.group(1))


@pytest.mark.appliance_config(Workers=2, MetricsListen=lambda hop: f"127.0.0.1:{free_port()}")
def test_metrics_are_the_sum_over_the_workers(appliance, next_hop):
    port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    worker_pids(appliance)
    for _ in range(20):
        with smtp_client(appliance) as client:
            client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    ids = ID.findall(appliance.log())
    assert {int(i, 16) % 2 for i in ids} == {0, 1}, "one worker took every connection"
    held = socket.create_connection(appliance.address, timeout=10)
    try:
        held.recv(100)  # a session open now
        for _ in range(4):  # whichever worker answers the scrape, it shows the whole daemon
            text = scrape(port)
            assert value(text, 'clamsmtpd_messages_total{status="clean"}') == 20
            # every connection, the fixture's probe and the one held open too
            assert value(text, "clamsmtpd_connections_total") == len(ID.findall(appliance.log()))
            assert value(text, "clamsmtpd_connections_active") == 1
            assert value(text, "clamsmtpd_scan_seconds_count") == 20
    finally:
        held.close()


@pytest.mark.appliance_config(Workers=2, MaxConnections=4)
def test_max_connections_is_the_daemons_however_the_sessions_spread(appliance, next_hop):
    """4 sessions open, held by both workers (a worker alone would accept up to 4 itself):
    every further connection gets the 421 of a busy daemon; one closed, one served again."""
    time.sleep(0.5)  # the fixture's probe session is over
    for _ in range(10):
        before = len(ID.findall(appliance.log()))
        held = [socket.create_connection(appliance.address, timeout=10) for _ in range(4)]
        for sock in held:
            assert read_reply(sock, bytearray()).startswith("220")
        ids = ID.findall(appliance.log())[before:]
        if {int(i, 16) % 2 for i in ids} == {0, 1}:
            break
        for sock in held:  # the kernel gave all four to one worker: again
            sock.close()
        time.sleep(0.5)
    else:
        pytest.fail("ten times, one worker took all four sessions")
    try:
        for _ in range(6):
            with socket.create_connection(appliance.address, timeout=10) as extra:
                assert read_reply(extra, bytearray()) == R.BUSY
        held.pop().close()
        time.sleep(0.5)
        with smtp_client(appliance) as client:
            client.sendmail("a@example.com", ["b@example.com"], CLEAN)
        assert len(next_hop.wait_for(1)) == 1
    finally:
        for sock in held:
            sock.close()


@TWO
def test_a_worker_started_after_a_reload_has_the_reloaded_configuration(appliance, next_hop):
    """SIGHUP (Action: bounce), then a worker dies: its replacement bounces too, not what the
    file said at start-up (drop)."""
    pids = worker_pids(appliance)
    reload_with(appliance, Action="bounce")
    os.kill(pids[0], signal.SIGKILL)
    appliance.wait_log("worker 0 started (pid ", timeout=15)
    replies = set()
    seen = len(ID.findall(appliance.log()))
    for sent in range(1, 61):  # until both workers took one (the kernel chooses which)
        with smtp_client(appliance) as client:
            client.ehlo()
            client.mail("a@example.com")
            client.rcpt("b@example.com")
            code, text = client.data(b"Subject: v\r\n\r\n" + EICAR + b"\r\n")
            replies.add(f"{code} {text.decode()}")
        ids = ID.findall(appliance.log())[seen:]
        if sent >= 4 and {int(i, 16) % 2 for i in ids} == {0, 1}:
            break
    assert {int(i, 16) % 2 for i in ids} == {0, 1}, "one worker took every connection"
    assert replies == {R.REJECTED}


@pytest.mark.appliance_config(Workers=2, ClamAddress=lambda hop: f"/nonexistent/clamd-{hop.port}")
def test_start_up_and_reload_lines_are_logged_once_per_daemon(appliance, next_hop):
    """What an admin with `Workers: 1` sees once is seen once with `Workers: 2` too: the
    start-up warning that clamd does not answer, and a SIGHUP's lines (worker 0 speaks)."""
    appliance.wait_log("clamd is not answering at")
    worker_pids(appliance)
    reload_with(appliance, Header="X-Once: yes", Workers=3)
    time.sleep(1.0)  # the other worker would have said it by now
    log = appliance.log()
    assert log.count("clamd is not answering at") == 1, log
    assert log.count("SIGHUP: configuration reloaded") == 1, log
    assert log.count("SIGHUP: Workers changed: restart clamsmtpd to apply it") == 1, log
    with smtp_client(appliance) as client:  # both workers took the reload: the header is new
        client.ehlo()
        assert client.mail("a@example.com")[0] == 250
