"""Several clamds behind one daemon (`ClamAddress: a, b, ...`): failover, health, ScanTimeout.

The promise: a message gets 451 only when no clamd could scan it; a clamd that fails is taken
out of the pool and back when it answers PING; only clamd's explicit `stream: OK` is clean.
Misbehaving clamds here are FakeClamds that pass later scans and PINGs to the real private
clamd; the runs with several real clamds killed in the middle are further down.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from faultkit import FakeClamd, assert_no_spool_files, clean_message, delivered_contents
from helpers import free_port, reload_with

from lab import PrivateClamd


@dataclass
class Pool:
    """What the `appliance` fixture needs of its clamd: `socket_path` (here, a list)."""

    members: list
    tcp: bool = False

    def address(self, member) -> str:
        return f"127.0.0.1:{member.tcp_port}" if self.tcp else member.socket_path

    @property
    def socket_path(self) -> str:
        return ", ".join(self.address(member) for member in self.members)


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
    if "late_clamd" in request.fixturenames:
        return Pool([request.getfixturevalue("late_clamd"), clamd])
    if "real_clamds" in request.fixturenames:
        clamds = request.getfixturevalue("real_clamds")
        return Pool(clamds, tcp=len(clamds) == 3)  # three over TCP, as a farm would be
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


# -- several real clamds, one (or all) killed in the middle of a run --------------------------

RUN = 500
CLIENTS = 8



@pytest.fixture
def real_clamds(request, tmp_path_factory):
    """`request.param` private clamds (unix socket and TCP each)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(PrivateClamd(tmp_path_factory.mktemp(f"clamd{i}"), tcp=True))
               for i in range(request.param)]


def scans_by_clamd(appliance) -> dict[str, float]:
    """clamsmtpd_clamd_scans{outcome="clean"} per clamd, from the metrics endpoint."""
    port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r'clamsmtpd_clamd_scans_total\{clamd="([^"]+)",outcome="clean"\} (\S+)'
    return {name: float(value) for name, value in re.findall(pattern, text)}


def run(appliance, prefix: str, count: int, halfway=None) -> dict[str, int]:
    """Send `count` messages from CLIENTS clients at once; call `halfway()` once about a
    third of them are answered. Returns each message's reply code by token."""
    codes: dict[str, int] = {}
    answered = itertools.count(1)
    fired = threading.Event()

    def one(i: int) -> None:
        token = f"{prefix}-{i:04d}"
        codes[token] = send(appliance, token)[0]
        if halfway is not None and next(answered) == count // 3 and not fired.is_set():
            fired.set()
            halfway()

    with ThreadPoolExecutor(CLIENTS) as clients:
        list(clients.map(one, range(count)))
    assert halfway is None or fired.is_set()
    return codes


@pytest.mark.parametrize("real_clamds", [
    pytest.param(2, id="2-unix"),
    pytest.param(3, id="3-tcp"),
    # the same rules with the daemon's one view of the pool shared by two workers
    pytest.param(2, id="2-unix-workers-2", marks=pytest.mark.appliance_config(Workers=2)),
], indirect=True)
@pytest.mark.appliance_config(TimeOut=10, MaxConnections=64,
                              MetricsListen=lambda hop: f"127.0.0.1:{free_port()}")
def test_one_clamd_killed_in_the_middle_of_a_run(real_clamds, appliance_clamd, appliance,
                                                 next_hop):
    """500 messages; one clamd SIGKILLed a third of the way -> every message 250 and delivered
    exactly once, no 451; that clamd out of the pool; restarted -> back, and used again."""
    victim = real_clamds[0]
    victim_name = appliance_clamd.address(victim)

    def crash() -> None:
        """SIGSTOP first, so that scans are surely in flight on it when the SIGKILL lands."""
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(0.5)
        victim.kill()

    codes = run(appliance, "run", RUN, halfway=crash)
    assert sorted(set(codes.values())) == [250], {t: c for t, c in codes.items() if c != 250}
    delivered = tokens_delivered(next_hop)
    assert len(delivered) == RUN and sorted(delivered) == sorted(codes)
    log = appliance.log()
    assert "status=CLAMAV-ERROR" not in log
    assert f"clamd at {victim_name} is out of the pool" in log
    assert "scanning again on clamd at" in log  # scans in flight on it were done elsewhere
    before = scans_by_clamd(appliance)
    assert all(before.get(appliance_clamd.address(c), 0) > 0 for c in real_clamds), before

    victim.start()
    appliance.wait_log(f"clamd at {victim_name} answers again: back in the pool", timeout=30)
    codes = run(appliance, "after", 4 * CLIENTS)
    assert sorted(set(codes.values())) == [250]
    after = scans_by_clamd(appliance)
    assert after[victim_name] > before[victim_name], (before, after)
    assert_no_spool_files(appliance)


@pytest.mark.parametrize("real_clamds", [2], indirect=True, ids=["2-unix"])
@pytest.mark.appliance_config(TimeOut=10)
def test_every_clamd_killed_defers_then_one_back_delivers(real_clamds, appliance_clamd,
                                                         appliance, next_hop):
    """All clamds SIGKILLed -> every message 451, nothing delivered; one clamd restarted ->
    it is used at once, 250 and delivered."""
    assert run(appliance, "warm", CLIENTS) == {f"warm-{i:04d}": 250 for i in range(CLIENTS)}
    next_hop.clear()
    for clamd in real_clamds:
        clamd.kill()
    codes = run(appliance, "dark", 2 * CLIENTS)
    assert sorted(set(codes.values())) == [451]
    assert tokens_delivered(next_hop) == []
    real_clamds[1].start()
    codes = run(appliance, "dawn", CLIENTS)
    assert sorted(set(codes.values())) == [250]
    assert sorted(tokens_delivered(next_hop)) == sorted(codes)
    appliance.wait_log(f"clamd at {real_clamds[1].socket_path} answers again")
    assert_no_spool_files(appliance)


# -- the admin's view: --check-config and SIGHUP -----------------------------------------------


def test_check_config_shows_every_clamd_and_scan_timeout(tmp_path):
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text("OutAddress: 10025\nClamAddress: /run/a.ctl,3311  av.example.org\n"
                    "ScanTimeout: 30\n")
    argv = [sys.executable, "-m", "appliance.cli", "--check-config", "-f", str(conf)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "\nClamAddress: /run/a.ctl, 3311, av.example.org:3310\n" in result.stdout
    assert "\nScanTimeout: 30\n" in result.stdout
    conf.write_text("OutAddress: 10025\nClamAddress: 3310 127.0.0.1\n")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{conf}:2: ClamAddress: '127.0.0.1' is listed twice" in result.stderr


def test_reload_takes_a_new_clamd_list_and_keeps_an_unchanged_one(first, second,
                                                                  appliance_clamd, appliance,
                                                                  next_hop, clamd):
    """SIGHUP with another ClamAddress: the new pool scans at once. SIGHUP with the same
    ClamAddress (another directive changed): the pool and its clamds' health are kept."""
    assert send(appliance, "before")[0] == 451
    silent = appliance.wait_log("clamd is not answering at").count("clamd is not answering")
    reload_with(appliance, Header="X-Pool: same clamds")
    time.sleep(0.5)  # a replaced pool would be PINGed (and found silent) now
    assert appliance.log().count("clamd is not answering") == silent
    assert send(appliance, "still-none")[0] == 451
    reload_with(appliance, ClamAddress=f"{first.socket_path}, {clamd.socket_path}")
    assert send(appliance, "after")[0] == 250
    assert tokens_delivered(next_hop) == ["after"]
    appliance.wait_log(f"clamd is not answering at {first.socket_path}: scans go to the other")


# -- Workers: 2, one view of the pool for the daemon ---------------------------------------------


@pytest.fixture
def late_clamd(tmp_path):
    """A clamd not there at first (nothing at its socket), the real one beside it; `start()`
    makes it answer (a FakeClamd that passes everything to the real one)."""
    workdir = tmp_path / "late"
    workdir.mkdir()
    missing = _Missing(str(workdir / "fake-clamd.sock"))  # FakeClamd's path in that directory
    missing.workdir = workdir
    return missing


def worker_of(appliance, pattern: str) -> int:
    """The index of the worker that logged `pattern` for a connection (its id's parity)."""
    found = re.findall(rf"^clamsmtpd: ([0-9A-F]{{6}}): {pattern}", appliance.log(), re.M)
    assert found, f"{pattern!r} not logged for a connection"
    return int(found[0], 16) % 2


def clamd_up(appliance) -> dict[str, float]:
    port = int(appliance.directives["MetricsListen"].rsplit(":", 1)[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {name: float(value)
            for name, value in re.findall(r'clamsmtpd_clamd_up\{clamd="([^"]+)"\} (\S+)', text)}


@pytest.mark.appliance_config(Workers=2, MetricsListen=lambda hop: f"127.0.0.1:{free_port()}")
def test_workers_share_one_view_of_the_pool(late_clamd, appliance_clamd, appliance, next_hop,
                                            clamd):
    """A clamd one worker found down is down for the other (no scan of its own fails on it
    first), it stays probed when that worker dies, one PING brings it back for all (logged
    once), and clamd_up says so throughout."""
    late = late_clamd.socket_path
    pids = [int(p) for p in re.findall(r"workers serving \(pids ([\d ]+)\)",
                                        appliance.wait_log("workers serving"))[-1].split()]
    accepted = re.compile(r"^clamsmtpd: ([0-9A-F]{6}): accepted connection from", re.M)
    seen = len(accepted.findall(appliance.log()))
    for i in range(60):  # until each worker has scanned at least three messages
        assert send(appliance, f"down-{i}")[0] == 250
        ids = accepted.findall(appliance.log())[seen:]
        if i >= 6 and min(sum(int(c, 16) % 2 == w for c in ids) for w in (0, 1)) >= 3:
            break
    assert min(sum(int(c, 16) % 2 == w for c in ids) for w in (0, 1)) >= 3, ids
    log = appliance.log()
    assert log.count(f"clamd at {late} failed") == 1, log  # the other worker knew
    assert log.count(f"clamd at {late} is out of the pool") == 1, log
    assert clamd_up(appliance) == {late: 0, clamd.socket_path: 1}

    # the worker that found it down dies: its probe with it; the others go on probing
    marker = worker_of(appliance, f"clamd at {re.escape(late)} failed")
    os.kill(pids[marker], signal.SIGKILL)
    appliance.wait_log(f"worker {marker} started (pid ", timeout=15)
    for i in range(4):
        assert send(appliance, f"replaced-{i}")[0] == 250
    with FakeClamd(late_clamd.workdir, behaviour="reply", faulty=0,
                   relay_to=clamd.socket_path) as fake:
        assert fake.socket_path == late
        appliance.wait_log(f"clamd at {late} answers again: back in the pool", timeout=30)
        time.sleep(1.5)  # a second worker's own probe would have PINGed and said it by now
        assert appliance.log().count(f"clamd at {late} answers again") == 1
        assert clamd_up(appliance) == {late: 1, clamd.socket_path: 1}
        for i in range(8):  # back for both workers: scans go to it again
            assert send(appliance, f"back-{i}")[0] == 250
        assert fake.scans >= 2
    assert "status=CLAMAV-ERROR" not in appliance.log()
    assert_no_spool_files(appliance)
