"""Drop, bounce and pass as one table: the policy a mail admin configures with `Action`."""

from ipaddress import ip_network

import pytest
import replies as R

from appliance.scanner import CLEAN, ERROR, OVERSIZE, VIRUS, ScanResult
from appliance.verdict import (
    DISCARD,
    FORWARD,
    INFECTED_HEADER,
    REJECT,
    TEMPFAIL,
    Policy,
    Unscanned,
    decide,
    log_status,
    skip_reason,
    unscanned,
)

EICAR = ScanResult(VIRUS, virus="Eicar-Test-Signature")


@pytest.mark.parametrize(
    ("result", "action", "kind", "reply", "extra"),
    [
        (ScanResult(CLEAN), "drop", FORWARD, None, b""),
        (ScanResult(CLEAN), "bounce", FORWARD, None, b""),
        (ScanResult(CLEAN), "pass", FORWARD, None, b""),
        (EICAR, "drop", DISCARD, R.DISCARDED, b""),
        (EICAR, "bounce", REJECT, R.REJECTED, b""),
        (EICAR, "pass", FORWARD, None, INFECTED_HEADER),
        (ScanResult(ERROR, detail="down"), "drop", TEMPFAIL, R.LOCAL_ERROR, b""),
        (ScanResult(ERROR, detail="down"), "pass", TEMPFAIL, R.LOCAL_ERROR, b""),
    ],
)
def test_decide(result, action, kind, reply, extra):
    verdict = decide(result, Policy(action=action))
    assert (verdict.kind, verdict.reply, verdict.extra_header) == (kind, reply, extra)
    assert verdict.infected == (result.status == VIRUS)


def test_log_status_values():
    assert log_status(ScanResult(CLEAN)) == "CLEAN"
    assert log_status(EICAR) == "VIRUS:Eicar-Test-Signature"
    assert log_status(ScanResult(VIRUS)) == "VIRUS"
    assert log_status(ScanResult(ERROR)) == "CLAMAV-ERROR"


def test_decide_gives_the_log_status():
    assert decide(ScanResult(CLEAN), Policy()).status == "CLEAN"
    assert decide(EICAR, Policy(action="pass")).status == "VIRUS:Eicar-Test-Signature"
    assert decide(ScanResult(ERROR, detail="down"), Policy()).status == "CLAMAV-ERROR"


@pytest.mark.parametrize("reason", list(Unscanned))
def test_unscanned_is_one_family_with_its_own_header(reason):
    verdict = unscanned(reason)
    assert verdict.kind == FORWARD and not verdict.scanned and not verdict.infected
    assert verdict.status == f"UNSCANNED:{reason.value}"
    assert verdict.extra_header == f"X-Virus-Not-Scanned: {reason.value}\r\n".encode()
    assert reason.value.isalpha() and reason.value.islower()  # `status=UNSCANNED:[a-z]+`


def test_the_unscanned_reasons():
    assert {r.value for r in Unscanned} == {"error", "size", "network", "authenticated", "tls"}


@pytest.mark.parametrize("action", ["drop", "bounce", "pass"])
def test_scan_error_pass_delivers_unscanned_whatever_the_action(action):
    verdict = decide(ScanResult(ERROR, detail="down"), Policy(action=action, scan_error="pass"))
    assert verdict == unscanned(Unscanned.ERROR)
    assert verdict.status == "UNSCANNED:error" and not verdict.scanned


@pytest.mark.parametrize("result", [ScanResult(CLEAN), EICAR])
def test_scan_error_pass_changes_nothing_for_a_scanned_message(result):
    for action in ("drop", "bounce", "pass"):
        assert decide(result, Policy(action, scan_error="pass")) == decide(result, Policy(action))


@pytest.mark.parametrize(
    ("virus", "reply"),
    [
        ("Eicar-Test-Signature", "550 5.7.1 Virus found: Eicar-Test-Signature"),
        (None, "550 5.7.1 Virus found: Unknown"),
        ("Evil\r\n250 OK", "550 5.7.1 Virus found: Evil??250 OK"),
        ("N\u00e4me\x00", "550 5.7.1 Virus found: N?me?"),
        ("X" * 500, "550 5.7.1 Virus found: " + "X" * 100),
    ],
)
def test_reject_message_names_the_virus_safely(virus, reply):
    policy = Policy(action="bounce", reject_message="550 5.7.1 Virus found: %v")
    verdict = decide(ScanResult(VIRUS, virus=virus), policy)
    assert (verdict.kind, verdict.reply) == (REJECT, reply)


def test_reject_message_only_for_bounce():
    policy = Policy(action="drop", reject_message="554 no: %v")
    assert decide(EICAR, policy).reply == R.DISCARDED


def test_every_unscanned_reason_has_its_metric():
    from prometheus_client import generate_latest

    from appliance import metrics

    text = generate_latest(metrics.REGISTRY).decode()
    for reason in Unscanned:
        assert f'clamsmtpd_messages_unscanned_total{{reason="{reason.value}"}} ' in text


TOO_BIG = ScanResult(OVERSIZE, detail="INSTREAM size limit exceeded")


@pytest.mark.parametrize(
    ("oversize", "kind", "reply", "status"),
    [
        ("pass", FORWARD, None, "UNSCANNED:size"),
        ("reject", REJECT, R.OVERSIZE_REJECTED, "OVERSIZE"),
        ("defer", TEMPFAIL, R.OVERSIZE_DEFERRED,
         "OVERSIZE"),
        (None, TEMPFAIL, R.LOCAL_ERROR, "CLAMAV-ERROR"),  # neither directive: as 1.10
    ],
)
def test_oversize(oversize, kind, reply, status):
    verdict = decide(TOO_BIG, Policy(oversize=oversize))
    assert (verdict.kind, verdict.reply, verdict.status) == (kind, reply, status)
    assert verdict.scanned == (oversize != "pass") and not verdict.infected


def test_oversize_without_the_directives_follows_scan_error_action():
    assert decide(TOO_BIG, Policy(scan_error="pass")) == unscanned(Unscanned.ERROR)
    assert decide(TOO_BIG, Policy(scan_error="pass", oversize="defer")).status == "OVERSIZE"


def test_oversize_log_status_is_a_clamav_error():
    assert log_status(TOO_BIG) == "CLAMAV-ERROR"


NETS = Policy(skip_networks=(ip_network("192.0.2.0/24"), ip_network("2001:db8::/32")))


@pytest.mark.parametrize(
    ("policy", "client", "authenticated", "reason"),
    [
        (NETS, "192.0.2.9", False, Unscanned.NETWORK),
        (NETS, "2001:db8::25", True, Unscanned.NETWORK),
        (NETS, "198.51.100.1", False, None),
        (NETS, "fe80::1%eth0", False, None),
        (NETS, "", False, None),  # (no address: never skipped)
        (Policy(skip_authenticated=True), "198.51.100.1", True, Unscanned.AUTHENTICATED),
        (Policy(skip_authenticated=True), "198.51.100.1", False, None),
        (Policy(), "192.0.2.9", True, None),  # by default everything is scanned
    ],
)
def test_skip_reason(policy, client, authenticated, reason):
    assert skip_reason(policy, client, authenticated) is reason


ALLOW = Policy(action="bounce", virus_allow=("PUA.*", "Heuristics.Encrypted.*"))


@pytest.mark.parametrize(
    ("virus", "allowed"),
    [
        ("PUA.Win.Packer.Upx-1", True),
        ("Heuristics.Encrypted.PDF", True),
        ("Eicar-Test-Signature", False),
        ("pua.Win.Packer", False),  # case-sensitive, as shell wildcards
        (None, False),
    ],
)
def test_virus_allow(virus, allowed):
    verdict = decide(ScanResult(VIRUS, virus=virus), ALLOW)
    if allowed:
        assert verdict.kind == FORWARD and not verdict.infected and verdict.scanned
        assert verdict.status == f"ALLOWED:{virus}"
        assert verdict.extra_header == f"X-Virus-Found: {virus}\r\n".encode()
    else:
        assert verdict.kind == REJECT and verdict.infected


def test_virus_allow_header_is_safe():
    policy = Policy(virus_allow=("Evil*",))
    verdict = decide(ScanResult(VIRUS, virus="Evil\r\nBcc: x@example.com"), policy)
    assert verdict.extra_header == b"X-Virus-Found: Evil??Bcc: x@example.com\r\n"
