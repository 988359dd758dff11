"""The fuzz rig: ONE daemon (module-scoped), in front of a recording next hop that also speaks
SASL (AUTH PLAIN / LOGIN, so the relay's continuation lines are exercised) and the session's
private clamd. Started as the `appliance` fixture of tests/conftest.py starts its daemon, with
TimeOut: 3 so that a hang would show within seconds.

The numbers of a run (sessions, lines, replies, messages) are kept in `STATS`, written to
`fuzz-summary.txt` in pytest's base temporary directory and shown in the terminal summary.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from fuzzkit import STATS, TIMEOUT, FuzzRig, SaslRecordingNextHop
from helpers import free_port, proxy_directives, start_daemon, wait_accepting

from lab import PrivateClamd


def pytest_terminal_summary(terminalreporter):
    if STATS.sessions:
        terminalreporter.write_line(STATS.summary())


@pytest.fixture(scope="module")
def rig(tmp_path_factory, clamd: PrivateClamd):
    """The daemon (-d 4, TimeOut 3) between the SASL recording next hop and clamd."""
    yield from _rig(tmp_path_factory, clamd)


@pytest.fixture(scope="module")
def tls_rig(tmp_path_factory, clamd: PrivateClamd, tls_certs):
    """The same with ClientTLS: on (the sessions run inside STARTTLS; the next hop is clear)."""
    yield from _rig(tmp_path_factory, clamd, tls=True, ClientTLS="on",
                    TLSCertificate=tls_certs.proxy.cert, TLSKey=tls_certs.proxy.key)


def _rig(tmp_path_factory, clamd: PrivateClamd, *, tls: bool = False, **more):
    work = tmp_path_factory.mktemp("fuzz")
    spool = work / "spool"
    spool.mkdir(mode=0o700)
    with SaslRecordingNextHop("127.0.0.1", 0, ehlo_extensions=None) as hop:
        port, metrics = free_port(), free_port()
        log_path = work / "clamsmtpd.stderr"
        directives = proxy_directives(port, hop, clamd, spool, TimeOut=TIMEOUT,
                                      MetricsListen=f"127.0.0.1:{metrics}", **more)
        proc = start_daemon(work / "clamsmtpd.conf", directives, log_path)
        running = FuzzRig(("127.0.0.1", port), proc, spool, log_path, hop,
                          ("127.0.0.1", metrics), tls=tls)
        try:
            wait_accepting(proc, running.address, running.log)
            running.new_log()
            yield running
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            summary = tmp_path_factory.getbasetemp() / "fuzz-summary.txt"
            if STATS.sessions:
                summary.write_text(STATS.summary() + "\n")
                print(f"\n{STATS.summary()} (also in {summary})")
    left = os.listdir(spool)
    assert left == [], f"spool files left behind: {left}"
