"""The scanning policy directives of issue #16, end to end: the real daemon between a real
clamd (EICAR-only signatures) and a recording next hop. Each directive is also tried through
SIGHUP, as an admin changes it on a running daemon."""

from __future__ import annotations

import pytest
import replies as R
from helpers import EICAR, reload_with, smtp_client

INFECTED = b"Subject: infected\r\n\r\n" + EICAR + b"\r\n"
CLEAN = b"Subject: clean\r\n\r\nhello\r\n"
NOT_SCANNED = "X-Virus-Not-Scanned"


def send(appliance, message, sender="alice@example.com", rcpts=("bob@example.com",)):
    with smtp_client(appliance) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, text = client.data(message)
        return f"{code} {text.decode()}"


def no_clamd(tmp_path):
    return {"ClamAddress": str(tmp_path / "no-clamd.ctl")}


# -- ScanErrorAction ---------------------------------------------------------------------------


def test_scan_error_defers_by_default(appliance, next_hop, tmp_path):
    reload_with(appliance, **no_clamd(tmp_path))
    assert send(appliance, CLEAN) == R.LOCAL_ERROR
    assert next_hop.messages == []
    assert "status=CLAMAV-ERROR" in appliance.log()


def test_scan_error_pass_delivers_with_the_not_scanned_header(appliance, next_hop, tmp_path):
    reload_with(appliance, ScanErrorAction="pass", **no_clamd(tmp_path))
    assert send(appliance, CLEAN).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) == "error"
    assert received.header("X-Virus-Scanned") is None  # never the header that says "scanned"
    log = appliance.wait_log("status=UNSCANNED:error")
    assert "from=alice@example.com, to=bob@example.com, status=UNSCANNED:error" in log
    assert "clamav error: could not reach clamd" in log
    reload_with(appliance, ScanErrorAction="defer")
    assert send(appliance, CLEAN) == R.LOCAL_ERROR
    assert len(next_hop.messages) == 1


@pytest.mark.appliance_config(ScanErrorAction="pass")
def test_scan_error_pass_still_stops_a_virus_clamd_found(appliance, next_hop):
    assert send(appliance, INFECTED) == R.DISCARDED
    assert send(appliance, CLEAN).startswith("250 ")
    [received] = next_hop.wait_for(1)
    assert received.header(NOT_SCANNED) is None
    assert received.header("X-Virus-Scanned") == R.DEFAULT_HEADER.decode().split(": ", 1)[1]


# -- RejectMessage -----------------------------------------------------------------------------


@pytest.mark.appliance_config(Action="bounce", RejectMessage="550 5.7.1 Virus found: %v")
def test_reject_message_names_the_virus(appliance, next_hop):
    reply = send(appliance, INFECTED)
    assert reply.startswith("550 5.7.1 Virus found: Eicar-Test-Signature"), reply
    assert next_hop.messages == []
    reload_with(appliance, RejectMessage="554 5.7.0 Refused, contact postmaster")
    assert send(appliance, INFECTED) == "554 5.7.0 Refused, contact postmaster"


@pytest.mark.appliance_config(Action="bounce")
def test_reject_message_default_is_the_originals(appliance, next_hop):
    assert send(appliance, INFECTED) == R.REJECTED


@pytest.mark.appliance_config(RejectMessage="550 5.7.1 Virus found: %v")
def test_reject_message_is_not_used_with_drop(appliance, next_hop):
    assert send(appliance, INFECTED) == R.DISCARDED
