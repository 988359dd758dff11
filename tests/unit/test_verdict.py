"""Drop, bounce and pass as one table: the policy a mail admin configures with `Action`."""

import pytest

from appliance.scanner import CLEAN, ERROR, VIRUS, ScanResult
from appliance.verdict import (
    DISCARD,
    FORWARD,
    INFECTED_HEADER,
    REJECT,
    TEMPFAIL,
    decide,
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
