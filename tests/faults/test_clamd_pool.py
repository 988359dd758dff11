"""Several clamds behind one daemon (`ClamAddress: a, b, ...`): failover, health, ScanTimeout.

The promise: a message gets 451 only when no clamd could scan it; a clamd that fails is taken
out of the pool and back when it answers PING; only clamd's explicit `stream: OK` is clean.
Misbehaving clamds here are FakeClamds that pass later scans and PINGs to the real private
clamd; the runs with several real clamds killed in the middle are further down.
"""

from __future__ import annotations

import smtplib
import time
from dataclasses import dataclass

import pytest
from faultkit import FakeClamd, assert_no_spool_files, clean_message, delivered_contents


@dataclass
class Pool:
    """What the `appliance` fixture needs of its clamd: `socket_path` (here, a list)."""

    members: list

    @property
    def socket_path(self) -> str:
        return ", ".join(member.socket_path for member in self.members)


def send(appliance, token: str, body: bytes | None = None) -> tuple[int, str]:
    """One message on its own connection: the reply code and text to its end of data."""
    message = body if body is not None else clean_message(token)
    try:
        with smtplib.SMTP(appliance.host, appliance.port, local_hostname="client.test",
                          timeout=60) as client:
            client.ehlo()
            client.mail("alice@example.com")
            client.rcpt("bob@example.com")
            code, text = client.data(message)
            return code, text.decode(errors="replace")
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error.decode(errors="replace")


def tokens_delivered(hop) -> list[str]:
    found = []
    for content in delivered_contents(hop):
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
    return found


# -- one clamd misbehaving, the real one beside it --------------------------------------------


@pytest.fixture
def fake(request, tmp_path_factory, clamd):
    options = request.node.get_closest_marker("fake_clamd").kwargs
    with FakeClamd(tmp_path_factory.mktemp("fake"), relay_to=clamd.socket_path,
                   **options) as fake:
        yield fake


@pytest.fixture
def appliance_clamd(request, clamd):
    """The fake clamd first (the first scan goes to the first of equals), the real one second."""
    if "fake" in request.fixturenames:
        return Pool([request.getfixturevalue("fake"), clamd])
    members = [request.getfixturevalue(name) for name in ("first", "second")]
    if "and_a_real_one" in request.fixturenames:
        members.append(clamd)
    return Pool(members)


@pytest.mark.parametrize("behaviour", ["close_at_end", "silent"])
@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_clamd(behaviour="close_at_end")
def test_a_scan_that_fails_on_one_clamd_is_done_on_the_other(behaviour, appliance_clamd,
                                                            appliance, next_hop, fake):
    """The first clamd hangs up without a verdict (or says nothing for TimeOut) -> the message
    is scanned on the second, delivered once, 250; the first is out of the pool, then back
    once it answers PING."""
    fake.behaviour = behaviour
    code, _ = send(appliance, "failover")
    assert code == 250
    assert fake.scans == 1 and fake.faulty_done.wait(5)
    assert tokens_delivered(next_hop) == ["failover"]
    log = appliance.wait_log("is out of the pool")
    assert f"clamd at {fake.socket_path} failed:" in log
    assert "1 other clamd in it" in log
    appliance.wait_log(f"clamd at {fake.socket_path} answers again: back in the pool")
    assert fake.pings >= 1
    # back in the pool: the next scans go to it too (the fake passes them to the real clamd)
    for i in range(4):
        assert send(appliance, f"after-{i}")[0] == 250
    assert fake.scans >= 2
    assert "status=CLAMAV-ERROR" not in appliance.log()
    assert_no_spool_files(appliance)


@pytest.mark.appliance_config(TimeOut=10, ScanTimeout=2)
@pytest.mark.fake_clamd(behaviour="trickle", delay=1.0, reply=b"stream: OK\n")
def test_a_scan_past_scan_timeout_is_done_on_the_other(appliance_clamd, appliance, next_hop,
                                                       fake):
    """A clamd that trickles its answer fails at ScanTimeout, and the other clamd scans."""
    started = time.monotonic()
    code, _ = send(appliance, "trickled")
    took = time.monotonic() - started
    assert code == 250 and 1.5 < took < 6, (code, took)
    assert tokens_delivered(next_hop) == ["trickled"]
    appliance.wait_log("did not finish within ScanTimeout (2 s)")


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_clamd(behaviour="reply", reply=b"stream: Eicar-Test-Signature FOUND\n",
                        faulty=100)
def test_a_virus_on_one_clamd_is_not_asked_again(appliance_clamd, appliance, next_hop, fake):
    """A verdict is a verdict: the clamd that found a virus is not second-guessed by another,
    and stays in the pool."""
    code, text = send(appliance, "infected")
    assert (code, text) == (250, "Virus Detected; Discarded Email")
    assert fake.scans == 1
    assert tokens_delivered(next_hop) == []
    assert "out of the pool" not in appliance.log()


@pytest.mark.appliance_config(TimeOut=2)
@pytest.mark.fake_clamd(behaviour="reply", reply=b"stream: something ERROR\n", faulty=100)
def test_clamds_own_error_for_a_message_is_not_retried(appliance_clamd, appliance, next_hop,
                                                       fake):
    """clamd's own ERROR for a message would be the same on every clamd -> 451 at once, and
    that clamd is not taken out of the pool (it works)."""
    code, _ = send(appliance, "refused")
    assert code == 451
    assert fake.scans == 1
    assert tokens_delivered(next_hop) == []
    log = appliance.wait_log("status=CLAMAV-ERROR")
    assert "out of the pool" not in log and "scanning again" not in log


@pytest.fixture
def first(tmp_path):
    return _Missing(str(tmp_path / "no-clamd-1.sock"))


@pytest.fixture
def second(tmp_path):
    return _Missing(str(tmp_path / "no-clamd-2.sock"))


@dataclass
class _Missing:
    socket_path: str


def test_no_clamd_at_all_defers_and_delivers_nothing(first, second, appliance_clamd, appliance,
                                                     next_hop):
    """Every clamd refuses -> 451, each tried once, nothing delivered."""
    code, _ = send(appliance, "nobody")
    assert code == 451
    log = appliance.wait_log("status=CLAMAV-ERROR")
    assert f"clamd is not answering at {first.socket_path}, {second.socket_path}" in log
    assert log.count("is out of the pool") == 2
    assert tokens_delivered(next_hop) == []
    assert_no_spool_files(appliance)


@pytest.fixture
def and_a_real_one():
    """Marks a test whose pool is `first`, `second` (both missing), then the real clamd."""


def test_clamds_that_refuse_do_not_use_up_the_retry(first, second, and_a_real_one,
                                                   appliance_clamd, appliance, next_hop):
    """Two clamds refuse the connection (nothing was sent to them), the third scans -> 250:
    only a scan that had started uses up the one retry."""
    code, _ = send(appliance, "third-time")
    assert code == 250
    assert tokens_delivered(next_hop) == ["third-time"]
    log = appliance.wait_log("status=CLEAN")
    assert f"could not reach clamd at {first.socket_path}" in log
    assert f"could not reach clamd at {second.socket_path}" in log
