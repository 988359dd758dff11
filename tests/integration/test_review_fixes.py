"""Behaviours found in review: secrets in debug logs, SIGHUP with sessions open, clamd's own
reason when a message is over its StreamMaxLength (OutAddress 0.0.0.0: tests/faults/
test_security_review.py)."""

from __future__ import annotations

import signal

import pytest
import replies as R
from helpers import send_raw, smtp_client, wait_until

CLEAN = b"Subject: clean\r\n\r\nhello\r\n"


def test_auth_initial_response_is_not_logged(appliance, next_hop):
    send_raw(appliance.host, appliance.port, ["EHLO client.test", "AUTH PLAIN AHVzZXIAc2VjcmV0",
                                              "QUIT"])
    log = appliance.wait_log("CLIENT < AUTH PLAIN [...]")
    assert "AHVzZXIAc2VjcmV0" not in log


def test_sighup_does_not_break_sessions_already_open(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
        text = appliance.conf_path.read_text()
        appliance.conf_path.write_text(text.replace("TimeOut: 30", "TimeOut: 31"))
        appliance.proc.send_signal(signal.SIGHUP)
        appliance.wait_log("configuration reloaded")
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)  # same connection, old config
    assert len(next_hop.wait_for(2)) == 2


@pytest.mark.parametrize("size", [150_000, 5_000_000])
def test_message_over_clamds_stream_limit_is_deferred_with_the_reason(
    small_clamd, appliance, next_hop, size
):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        code, _ = client.data(b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78))
    assert code == 451
    log = wait_until(lambda: "StreamMaxLength" in appliance.log() and appliance.log(),
                     what="the StreamMaxLength hint")
    assert "INSTREAM size limit exceeded" in log
    assert next_hop.messages == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_loop_back_into_the_proxy_is_refused_not_repeated(tmp_path, clamd, workers):
    """OutAddress pointing at the proxy itself: the one looped connection is refused (the
    original chained connections until MaxConnections). With two workers the looped
    connection may come back into the other one: it knows it too."""
    import subprocess
    import sys

    from helpers import free_port

    port = free_port()
    conf = tmp_path / "c.conf"
    conf.write_text(f"Listen: 127.0.0.1:{port}\nOutAddress: 127.0.0.1:{port}\n"
                    f"ClamAddress: {clamd.socket_path}\nTempDirectory: {tmp_path}\n"
                    f"Workers: {workers}\n")
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "-d", "3", "-f",
                                 str(conf)], stderr=err, stdin=subprocess.DEVNULL)
    try:
        def greeting():
            try:
                return send_raw("127.0.0.1", port, ["QUIT"])[0]
            except OSError:
                return None
        assert wait_until(greeting).startswith(R.LOOP)
        log = (tmp_path / "stderr").read_text()
        assert "loop detected: this connection is the proxy's own" in log
        assert log.count("accepted connection from") == 2  # the client, and our own loop: no more
        for n in range(2, 2 + 30 * (workers - 1)):  # which worker the loop comes back to varies
            assert send_raw("127.0.0.1", port, ["QUIT"])[0].startswith("421 4.4.6")
            log = (tmp_path / "stderr").read_text()
            assert log.count("accepted connection from") == 2 * n
    finally:
        proc.terminate()
        proc.wait(15)
