"""Shared fixtures: real clamd, a real recording next hop, and the real daemon between them.

    client --> appliance (clamsmtpd subprocess) --> next_hop (RecordingNextHop)
                     |
                     +--> clamd (PrivateClamd, EICAR-only database)

Vary them per test with markers:

    @pytest.mark.next_hop_replies(RCPT="550 5.1.1 no such user")
    @pytest.mark.next_hop_replies(**{"RCPT:bad@example.com": "550 5.1.1 no such user"})
    @pytest.mark.next_hop_replies(ehlo_extensions=["PIPELINING", "STARTTLS"], greeting="554 no")
    @pytest.mark.appliance_config(Action="bounce", Header="")   # None removes a directive
    @pytest.mark.client_tls          # ClientTLS: on with the throwaway proxy.test certificate

A test that kills or stops clamd asks for `own_clamd` too; the appliance then uses that one.
The daemon runs on its default event loop (EventLoop: auto, uvloop where installed); the tests in
BOTH_EVENT_LOOPS run once on each loop, and CLAMSMTP_TEST_EVENT_LOOP=asyncio (or uvloop) puts
every other test on that one.
CLAMSMTP_TEST_DAEMON=reference runs the same tests against the C clamsmtpd (Debian package
clamsmtp), to check what the original does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import (
    free_port,
    next_hop_options,
    proxy_directives,
    start_daemon,
    wait_accepting,
)
from tlskit import Certs, make_certs, server_context

from lab import PrivateClamd, RecordingNextHop

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

#: Run on EventLoop: asyncio and on uvloop each (docs/dev/eventloop.md): the default loop is
#: uvloop where it is installed, so the rest of the suite covers it; these keep asyncio's own
#: loop, the fallback, tested on what differs between loops: start_tls on both legs (and a
#: handshake that fails), pipelined writes, half-close, signals (SIGHUP, SIGTERM), subprocesses
#: (VirusAction), Workers (a loop made in each child), the scanner's sock_* calls, timeouts.
BOTH_EVENT_LOOPS = frozenset({
    "tests/integration/test_proxy.py::test_clean_mail_is_delivered_byte_exact_with_the_header",
    "tests/integration/test_proxy.py::test_eicar_is_discarded_by_default",
    "tests/integration/test_proxy.py::test_virus_then_clean_in_one_session",
    "tests/integration/test_proxy.py::test_large_message_memory_is_bounded",
    "tests/integration/test_proxy.py::test_max_connections",
    "tests/integration/test_proxy.py::test_idle_client_times_out",
    "tests/integration/test_proxy.py::test_client_vanishing_mid_data_delivers_nothing",
    "tests/integration/test_tls.py::test_client_tls_on_both_legs_encrypted_clean_mail_scanned",
    "tests/integration/test_tls.py::test_client_bytes_behind_starttls_are_discarded",
    "tests/integration/test_tls.py::test_client_that_never_completes_the_handshake_hits_timeout",
    "tests/integration/test_tls.py::test_client_handshake_garbage_is_logged_and_closed",
    "tests/integration/test_tls.py::test_bytes_behind_the_next_hops_220_are_discarded",
    "tests/integration/test_tls.py::test_verify_with_a_wrong_name_defers",
    "tests/integration/test_tls.py::test_passthrough_splices_the_clients_tls_with_the_next_hop_unscanned",
    "tests/faults/test_pipelining.py::test_group_reaches_the_next_hop_in_one_write",
    "tests/faults/test_pipelining.py::test_a_thousand_commands_in_one_write",
    "tests/faults/test_pipelining.py::test_group_inside_client_tls",
    "tests/integration/test_policy.py::test_virus_action_gets_the_original_environment",
    "tests/integration/test_policy.py::test_sighup_reloads_the_configuration",
    "tests/integration/test_policy.py::test_sigterm_lets_the_message_in_flight_finish",
    "tests/integration/test_workers.py::test_two_workers_serve_and_ids_are_unique_across_them",
    "tests/integration/test_workers.py::"
    "test_a_sigkilled_worker_is_logged_replaced_and_its_client_never_gets_250",
    "tests/faults/test_fault_matrix_client.py::test_client_resetting_mid_data",
    "tests/faults/test_fault_matrix_client.py::test_client_that_never_reads",
    "tests/faults/test_fault_matrix_client.py::test_client_half_closing_after_its_whole_session",
    "tests/faults/test_fault_matrix_next_hop.py::test_next_hop_resetting_right_after_accepting",
    "tests/faults/test_fault_matrix_next_hop.py::test_next_hop_hanging",
    "tests/faults/test_fault_matrix_clamd.py::test_clamd_dying_mid_stream",
    "tests/faults/test_fault_matrix_clamd.py::test_clamd_trickling_its_answer_is_cut_at_scan_timeout",
})
EVENT_LOOPS = ("asyncio", "uvloop")


def pytest_generate_tests(metafunc):
    """The tests of BOTH_EVENT_LOOPS get one case per loop: test_x[asyncio], test_x[uvloop]."""
    if (metafunc.definition.nodeid.split("[")[0] in BOTH_EVENT_LOOPS
            and "event_loop_choice" in metafunc.fixturenames):
        metafunc.parametrize("event_loop_choice", EVENT_LOOPS, indirect=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `root` are skipped, with the reason, when not run as root."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, iptables); run as root")
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)


# -- clamd ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clamd(tmp_path_factory):
    """A private clamd shared by the whole session (unix socket and 127.0.0.1 TCP port)."""
    with PrivateClamd(tmp_path_factory.mktemp("clamd"), tcp=True) as daemon:
        yield daemon


@pytest.fixture
def own_clamd(tmp_path_factory):
    """A private clamd for this test alone, which it may kill() or stop()."""
    with PrivateClamd(tmp_path_factory.mktemp("own-clamd"), tcp=True) as daemon:
        yield daemon


@pytest.fixture
def small_clamd(tmp_path_factory):
    """A private clamd whose StreamMaxLength is 100K: what clamd refuses as too big to scan."""
    with PrivateClamd(tmp_path_factory.mktemp("small-clamd"),
                      settings={"StreamMaxLength": "100K"}) as daemon:
        yield daemon


# -- next hop -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory) -> Certs:
    """Throwaway certificates (a lab CA, the next hop's, the proxy's): see tests/tlskit.py."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def next_hop(request):
    """A RecordingNextHop on a free 127.0.0.1 port, scripted by @next_hop_replies(...).

    @next_hop_tls makes it offer STARTTLS with nexthop.test's certificate (or with the context
    its `context=` returns, a function of the certificates; None: no STARTTLS); `.certs` then
    holds the certificates, for the appliance's directives (tlskit.CLIENT_TLS)."""
    options = next_hop_options(request)
    certs = None
    marker = request.node.get_closest_marker("next_hop_tls")
    if marker is not None:
        certs = request.getfixturevalue("tls_certs")
        make = marker.kwargs.get("context", lambda c: server_context(c.hop))
        options["tls_context"] = make(certs) if make is not None else None
    with RecordingNextHop("127.0.0.1", 0, **options) as hop:
        hop.certs = certs
        yield hop


# -- the appliance --------------------------------------------------------------------------


@dataclass
class RunningAppliance:
    host: str
    port: int
    conf_path: Path
    spool_dir: Path
    stderr_path: Path
    proc: subprocess.Popen
    directives: dict = field(default_factory=dict)
    needed_sigkill: bool = False  # set by stop() when SIGTERM was not enough

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, substring: str, timeout: float = 10.0) -> str:
        """Wait until `substring` appears in the daemon's stderr; return the whole log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if substring in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{substring!r} not in the daemon's log after {timeout} s; log:\n{text}"
                )
            time.sleep(0.05)

    def spool_files(self) -> list[str]:
        """Files in the spool directory, and, while the daemon runs, the spool files it holds
        open (the daemon's spool files have no name: they are only seen in /proc/PID/fd)."""
        return sorted(os.listdir(self.spool_dir)) + [
            f"open: {target}" for _, target in self._open_spool_fds()
        ]

    def spool_sizes(self) -> list[int]:
        """The sizes of the spool files the daemon holds open now (named or not)."""
        sizes = []
        for path, _ in self._open_spool_fds():
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                continue
        return sizes

    def pids(self) -> list[int]:
        """The daemon's process, then its workers' (Workers > 1) if it has any."""
        if self.proc.poll() is not None:
            return []
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [self.proc.pid, *map(int, f.read().split())]
        except OSError:
            return [self.proc.pid]

    @property
    def workers(self) -> int:
        return int(self.directives.get("Workers", 1))

    def _open_spool_fds(self) -> list[tuple[str, str]]:
        return [found for pid in self.pids() for found in self._open_spool_fds_of(pid)]

    def _open_spool_fds_of(self, pid: int) -> list[tuple[str, str]]:
        fd_dir = f"/proc/{pid}/fd"
        found = []
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return []
        for fd in fds:
            path = os.path.join(fd_dir, fd)
            try:
                target = os.readlink(path)
            except OSError:
                continue
            if target.startswith(str(self.spool_dir) + "/"):
                found.append((path, target))
        return found

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.needed_sigkill = True
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def daemon_kind() -> str:
    """Which daemon `appliance` runs: "appliance" (this project's, the default) or "reference"
    (the C clamsmtpd), from CLAMSMTP_TEST_DAEMON. A test module may override this fixture."""
    kind = os.environ.get("CLAMSMTP_TEST_DAEMON", "appliance")
    if kind not in ("appliance", "reference"):
        raise pytest.UsageError(f"CLAMSMTP_TEST_DAEMON={kind!r}: use appliance or reference")
    return kind


@pytest.fixture
def event_loop_choice(request) -> str | None:
    """The appliance's EventLoop: a BOTH_EVENT_LOOPS case's, else CLAMSMTP_TEST_EVENT_LOOP's,
    else None (not set: auto)."""
    choice = getattr(request, "param", None) or os.environ.get("CLAMSMTP_TEST_EVENT_LOOP")
    if choice == "uvloop":
        pytest.importorskip("uvloop", reason="EventLoop: uvloop needs uvloop installed")
    return choice


@pytest.fixture
def appliance(request, tmp_path, next_hop, daemon_kind, event_loop_choice):
    """The daemon as a subprocess (-d 4), between `next_hop` and clamd, on a free port.

    On teardown it is stopped (SIGTERM, then SIGKILL) and its spool must be empty.
    """
    # a test that asks for `own_clamd` or `small_clamd`, or a module that defines
    # `appliance_clamd`, gets it here
    clamd_fixture = next(
        (name for name in ("own_clamd", "small_clamd", "appliance_clamd")
         if name in request.fixturenames),
        "clamd",
    )
    scanner: PrivateClamd = request.getfixturevalue(clamd_fixture)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    spool.chmod(0o700)
    port = free_port()
    directives = proxy_directives(port, next_hop, scanner, str(spool), TimeOut=30)
    if event_loop_choice and daemon_kind == "appliance":
        directives["EventLoop"] = event_loop_choice
    # every appliance_config marker, the closest last (a parametrized case's over its test's)
    for marker in reversed(list(request.node.iter_markers("appliance_config"))):
        for mapping in marker.args:
            directives.update(mapping)
        directives.update(marker.kwargs)
    if request.node.get_closest_marker("client_tls"):  # ClientTLS: on, the proxy's certificate
        certs = request.getfixturevalue("tls_certs")
        directives.update(ClientTLS="on", TLSCertificate=str(certs.proxy.cert),
                          TLSKey=str(certs.proxy.key))
    # a value may be a function of the next hop, e.g. lambda hop: f"0.0.0.0:{hop.port}"
    directives = {k: v(next_hop) if callable(v) else v for k, v in directives.items()}
    conf = tmp_path / "clamsmtpd.conf"
    stderr_path = tmp_path / "clamsmtpd.stderr"
    proc = start_daemon(conf, directives, stderr_path, reference=daemon_kind == "reference")
    running = RunningAppliance("127.0.0.1", port, conf, spool, stderr_path, proc, directives)
    try:
        wait_accepting(proc, running.address, running.log, START_TIMEOUT)
        if "EventLoop" in directives:  # this case runs on the loop it names, or it is no case
            running.wait_log(f"event loop: {directives['EventLoop']}", START_TIMEOUT)
    except (pytest.fail.Exception, AssertionError):
        running.stop()
        raise
    try:
        yield running
        # the test is over: the spool must empty itself while the daemon still runs
        deadline = time.monotonic() + 5
        while running.spool_files() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = running.spool_files()
    finally:
        running.stop()
    left = left or running.spool_files()
    if left:
        pytest.fail(f"spool files left behind in {spool}: {left}\n"
                    f"daemon log (last lines):\n{_tail(running.log())}", pytrace=False)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])
