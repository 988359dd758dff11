"""Behaviours found in review: secrets in debug logs, SIGHUP with sessions open, clamd's own
reason when a message is over its StreamMaxLength, the original's 0.0.0.0 OutAddress."""

from __future__ import annotations

import signal

import pytest
from helpers import send_raw, smtp_client, wait_until

from appliance.lab import PrivateClamd

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


@pytest.fixture
def small_clamd(tmp_path_factory):
    with PrivateClamd(tmp_path_factory.mktemp("small-clamd"),
                      settings={"StreamMaxLength": "100K"}) as clamd:
        yield clamd


@pytest.fixture
def appliance_clamd(request):
    """The clamd `appliance` uses in this module: the small one where a test asks for it."""
    name = "small_clamd" if "small_clamd" in request.fixturenames else "clamd"
    return request.getfixturevalue(name)


@pytest.mark.parametrize("size", [150_000, 5_000_000])
def test_message_over_clamds_stream_limit_is_deferred_with_the_reason(
    small_clamd, appliance_clamd, appliance, next_hop, size
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


@pytest.mark.appliance_config(OutAddress=lambda hop: f"0.0.0.0:{hop.port}")
def test_outaddress_0_0_0_0_means_the_clients_own_address(appliance, next_hop):
    with smtp_client(appliance) as client:
        client.sendmail("a@example.com", ["b@example.com"], CLEAN)
    assert len(next_hop.wait_for(1)) == 1
