"""Drop, bounce and pass as one table: the policy a mail admin configures with `Action`."""

import pytest

from appliance.scanner import CLEAN, ERROR, VIRUS, ScanResult
from appliance.verdict import (
    DISCARD,
    FORWARD,
    INFECTED_HEADER,
    REJECT,
    TEMPFAIL,
    Unscanned,
    decide,
    unscanned,
)

EICAR = ScanResult(VIRUS, virus="Eicar-Test-Signature")


@pytest.mark.parametrize(
    ("result", "action", "kind", "reply", "extra"),
    [
        (ScanResult(CLEAN), "drop", FORWARD, None, b""),
        (ScanResult(CLEAN), "bounce", FORWARD, None, b""),
        (ScanResult(CLEAN), "pass", FORWARD, None, b""),
        (EICAR, "drop", DISCARD, "250 Virus Detected; Discarded Email", b""),
        (EICAR, "bounce", REJECT, "550 Virus Detected; Content Rejected", b""),
        (EICAR, "pass", FORWARD, None, INFECTED_HEADER),
        (ScanResult(ERROR, detail="down"), "drop", TEMPFAIL, "451 Local Error", b""),
        (ScanResult(ERROR, detail="down"), "pass", TEMPFAIL, "451 Local Error", b""),
    ],
)
def test_decide(result, action, kind, reply, extra):
    verdict = decide(result, action)
    assert (verdict.kind, verdict.reply, verdict.extra_header) == (kind, reply, extra)
    assert verdict.infected == (result.status == VIRUS)


def test_log_status_values():
    assert ScanResult(CLEAN).log_status == "CLEAN"
    assert EICAR.log_status == "VIRUS:Eicar-Test-Signature"
    assert ScanResult(VIRUS).log_status == "VIRUS"
    assert ScanResult(ERROR).log_status == "CLAMAV-ERROR"


def test_decide_gives_the_log_status():
    assert decide(ScanResult(CLEAN), "drop").status == "CLEAN"
    assert decide(EICAR, "pass").status == "VIRUS:Eicar-Test-Signature"
    assert decide(ScanResult(ERROR, detail="down"), "drop").status == "CLAMAV-ERROR"


@pytest.mark.parametrize("reason", list(Unscanned))
def test_unscanned_is_one_family_with_its_own_header(reason):
    verdict = unscanned(reason)
    assert verdict.kind == FORWARD and not verdict.scanned and not verdict.infected
    assert verdict.status == f"UNSCANNED:{reason.value}"
    assert verdict.extra_header == f"X-Virus-Not-Scanned: {reason.value}\r\n".encode()
    assert reason.value.isalpha() and reason.value.islower()  # `status=UNSCANNED:[a-z]+`


def test_the_unscanned_reasons():
    assert {r.value for r in Unscanned} == {"error", "size", "network", "authenticated", "tls"}
