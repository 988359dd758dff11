"""The command line as an admin uses it: flags, --check-config, config errors, daemon mode."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import replies as R
from helpers import free_port, send_raw, start_daemon, wait_until

DAEMON = [sys.executable, "-m", "appliance.cli"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


#: Run the daemon with no syslog socket and no journald socket (what a container has), or
#: with these paths instead of /dev/log and journald's: argv[1] syslog, argv[2] journald.
NO_SYSLOG = [sys.executable, "-c", """
import sys
import appliance.maillog as maillog
maillog.SYSLOG_SOCKET, maillog.JOURNALD_SOCKET = sys.argv[1:3]
from appliance.cli import main
sys.exit(main(sys.argv[3:]))
"""]


def run_detached(*args: str, stderr: Path, sockets: tuple[str, str] | None = None,
                 timeout: float = 30) -> tuple[int, str]:
    """The daemon without -d (it detaches): its exit status and what was on stderr when it
    returned. stderr goes to a file, not a pipe: a detached daemon that logs to stderr (no
    syslog) keeps it open, and a pipe would not see its end while the daemon runs."""
    argv = [*NO_SYSLOG, *sockets, *args] if sockets else [*DAEMON, *args]
    with open(stderr, "w") as err:
        code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err, timeout=timeout).returncode
    return code, stderr.read_text()


def _stop(pid_file: Path) -> None:
    """SIGTERM the detached daemon of `pid_file` and wait for it to remove the file; SIGKILL
    whatever is left (it is no child of ours: it must not outlive the test)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_file.exists(), timeout=15, what="the daemon to stop")
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_version():
    result = run("-v")
    assert result.returncode == 0
    assert result.stdout.startswith("clamsmtpd (version ")
    assert "(config: /etc/clamsmtpd.conf)" in result.stdout


def test_help_lists_every_form_of_the_command():
    result = run("-h")
    assert result.returncode == 0
    usage = result.stdout.split("\n\n")[0]  # the usage lines, not the option list below them
    for form in ("clamsmtpd [-d debuglevel] [-f configfile] [-p pidfile]", "clamsmtpd -v",
                 "clamsmtpd --check-config [-f configfile]"):
        assert form in usage, usage


def test_bad_debug_level():
    for value, message in (("x", "invalid debug log level"), ("7", "must be between 0 and 4")):
        result = run("-d", value, "-f", "/nonexistent")
        assert result.returncode == 2
        assert message in result.stderr
        assert "usage: clamsmtpd [-d debuglevel] [-f configfile] [-p pidfile]" in result.stderr


def test_legacy_flag_points_to_the_directive():
    result = run("-m", "10")
    assert result.returncode == 2
    assert "'MaxConnections:'" in result.stderr


def test_config_error_names_file_line_and_directive(tmp_path):
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text("OutAddress: 10025\n# comment\nAction: explode\n")
    result = run("-f", str(conf), "-d", "3")
    assert result.returncode == 2
    assert result.stderr.startswith(f"clamsmtpd: {conf}:3: Action: ")


def test_missing_config_file(tmp_path):
    result = run("-f", str(tmp_path / "nope.conf"))
    assert result.returncode == 2
    assert str(tmp_path / "nope.conf") in result.stderr


def test_check_config_prints_the_effective_configuration(tmp_path):
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text("OutAddress: 10025\nListen: 127.0.0.1:10026\nBounce: on\n")
    result = run("--check-config", "-f", str(conf))
    assert result.returncode == 0, result.stderr
    assert "Action: bounce" in result.stdout
    assert "Listen: 127.0.0.1:10026" in result.stdout
    assert "MaxConnections: 64" in result.stdout
    assert 'please use "Action"' in result.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("Listen: 127.0.0.1:10026\n")
    result = run("--check-config", "-f", str(bad))
    assert result.returncode == 2 and "no OutAddress specified" in result.stderr


def test_check_config_into_a_pipe_closed_early_is_not_an_error(tmp_path):
    """`clamsmtpd --check-config | head -1` is how an admin glances at it: no traceback."""
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text("OutAddress: 10025\n")
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the daemon prints a line
    with os.fdopen(writer, "w") as out:
        result = subprocess.run([*DAEMON, "--check-config", "-f", str(conf)], stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=20,
                                stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_check_config_warns_about_what_private_tmp_hides(tmp_path):
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text("OutAddress: 10025\nClamAddress: /tmp/clamd.sock\n")
    result = run("--check-config", "-f", str(conf))
    assert result.returncode == 0
    assert "clamsmtpd: warning: ClamAddress: /tmp/clamd.sock is under /tmp or /var/tmp: run " \
           "by clamsmtpd.service (PrivateTmp=yes)" in result.stderr


def test_debian_default_config_is_accepted():
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "appliance", "data",
                           "clamsmtpd.conf")
    result = run("--check-config", "-f", shipped)
    assert result.returncode == 0, result.stderr
    assert "OutAddress: 10025" in result.stdout
    assert "TempDirectory: /var/spool/clamsmtp" in result.stdout


def test_listen_address_in_use(tmp_path, next_hop):
    port = free_port()
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text(f"OutAddress: 127.0.0.1:{next_hop.port}\nListen: 127.0.0.1:{next_hop.port}\n")
    result = run("-d", "0", "-f", str(conf))
    assert result.returncode == 1
    assert f"couldn't listen on 127.0.0.1:{next_hop.port}" in result.stderr
    assert "Listen" in result.stderr
    del port


def _detached_conf(tmp_path: Path, next_hop, clam_address: str, port: int, pid_file: Path,
                   temp_directory: Path | None = None, extra: str = "") -> Path:
    """The config the detached-daemon tests start: Listen on `port`, the next hop, clamd."""
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text(f"OutAddress: 127.0.0.1:{next_hop.port}\nListen: 127.0.0.1:{port}\n"
                    f"ClamAddress: {clam_address}\nTempDirectory: {temp_directory or tmp_path}\n"
                    f"{extra}PidFile: {pid_file}\n")
    return conf


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_mode_detaches_and_writes_a_pid_file(tmp_path, next_hop, clamd, workers):
    """(With two workers: the pid file names the parent, the workers are its children, and
    they are gone when it is.)"""
    port = free_port()
    pid_file = tmp_path / "clamsmtpd.pid"
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    conf = _detached_conf(tmp_path, next_hop, clamd.socket_path, port, pid_file, spool,
                          extra=f"Workers: {workers}\n")
    code, stderr = run_detached("-f", str(conf), stderr=tmp_path / "stderr")  # no -d: it forks,
    assert code == 0, stderr  # and the first process returns once the daemon serves
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                         what="the pid file"))
    children = []
    try:
        assert os.getsid(pid) != os.getsid(0)  # in a session of its own, detached from ours
        assert wait_until(lambda: _greeting("127.0.0.1", port)) == R.GREETING
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        assert len(children) == (workers if workers > 1 else 0)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: all(not os.path.exists(f"/proc/{c}") or _is_zombie(c) for c in children),
               timeout=15, what=f"the workers {children} to exit")
    wait_until(lambda: not pid_file.exists(), timeout=15, what="the pid file to be removed")
    # the pid file goes just before the interpreter exits: on a loaded machine that takes a while
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), timeout=10,
               what="the daemon to exit after removing its pid file")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_port_only_listen_takes_ipv4_and_ipv6(tmp_path, next_hop, clamd):
    import socket

    if not socket.has_ipv6:
        import pytest
        pytest.skip("no IPv6 on this host")
    port = free_port()
    with _daemon(tmp_path, OutAddress=f"127.0.0.1:{next_hop.port}", Listen=port,
                 ClamAddress=clamd.socket_path, TempDirectory=tmp_path) as log_path:
        assert wait_until(lambda: _greeting("127.0.0.1", port)) == R.GREETING
        assert send_raw("::1", port, ["QUIT"])[0] == R.GREETING
        log = log_path.read_text()
        assert "accepted connection from: 127.0.0.1" in log  # not ::ffff:127.0.0.1
        assert "accepted connection from: ::1" in log


@contextlib.contextmanager
def _daemon(tmp_path: Path, **directives) -> Iterator[Path]:
    """The daemon (-d 3) on a config of `directives` while the block runs, then SIGTERM (it must
    exit within 15 s); yields the path of its log."""
    log = tmp_path / "stderr"
    proc = start_daemon(tmp_path / "clamsmtpd.conf", directives, log, debug_level=3)
    try:
        yield log
    finally:
        proc.terminate()
        proc.wait(15)


def _greeting(host: str, port: int) -> str | None:
    try:
        return send_raw(host, port, ["QUIT"])[0]
    except OSError:
        return None


def test_transparent_mode_refuses_a_connection_that_was_not_redirected(tmp_path, clamd):
    port = free_port()
    with _daemon(tmp_path, TransparentProxy=True, Listen=f"127.0.0.1:{port}",
                 ClamAddress=clamd.socket_path, TempDirectory=tmp_path) as log_path:
        reply = wait_until(lambda: _greeting("127.0.0.1", port))
        assert reply.startswith("421 4.4.6 Local Error, mail loop")
        log = log_path.read_text()
        assert f"loop detected in transparent proxying: 127.0.0.1:{port} is this proxy" in log


def test_daemon_mode_reports_a_failed_start_up(tmp_path, next_hop):
    # the pid file cannot be written after the fork: the command must still fail, and say why
    # on stderr (it printed nothing: the reason went only to a log nobody may read)
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text(f"OutAddress: 127.0.0.1:{next_hop.port}\nListen: 127.0.0.1:{free_port()}\n"
                    f"PidFile: {tmp_path}/missing-dir/clamsmtpd.pid\n")
    for sockets in (None, (str(tmp_path / "no-log"), str(tmp_path / "no-journal"))):
        code, stderr = run_detached("-f", str(conf), stderr=tmp_path / "stderr",
                                    sockets=sockets)
        assert code == 1
        assert f"PidFile: cannot create {tmp_path}/missing-dir/clamsmtpd.pid" in stderr, stderr
        assert "Traceback" not in stderr


def test_with_no_syslog_it_says_so_once_and_logs_to_stderr(tmp_path, next_hop, clamd):
    """No /dev/log and no journald (a container): the detached daemon's log went to UDP
    localhost:514, where nothing listens. It says so once, and its stderr gets the log."""
    pid_file = tmp_path / "clamsmtpd.pid"
    port = free_port()
    conf = _detached_conf(tmp_path, next_hop, clamd.socket_path, port, pid_file)
    stderr = tmp_path / "stderr"
    try:
        code, said = run_detached("-f", str(conf), stderr=stderr,
                                  sockets=(str(tmp_path / "no-log"), str(tmp_path / "no-jd")))
        assert code == 0, said
        assert said.count("no syslog socket") == 1
        assert "logging to stderr" in said
        assert wait_until(lambda: _greeting("127.0.0.1", port)) == R.GREETING
        wait_until(lambda: "accepted connection from: 127.0.0.1" in stderr.read_text(),
                   what="the connection's log line on stderr")
    finally:
        _stop(pid_file)
    assert stderr.read_text().rstrip().endswith("clamsmtpd: stopped")


def test_with_journald_but_no_syslog_it_logs_to_journald(tmp_path, next_hop, clamd):
    """No /dev/log but journald's socket: the lines go there in journald's native format,
    as `journalctl -t clamsmtpd` finds them (facility mail, priority, the daemon's pid)."""
    import socket

    pid_file = tmp_path / "clamsmtpd.pid"
    port = free_port()
    conf = _detached_conf(tmp_path, next_hop, clamd.socket_path, port, pid_file)
    journal = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(str(journal))
        journald.settimeout(10)
        try:
            code, said = run_detached("-f", str(conf), stderr=tmp_path / "stderr",
                                      sockets=(str(tmp_path / "no-log"), str(journal)))
            assert code == 0, said
            assert f"logging to journald through {journal}" in said
            assert "journalctl -t clamsmtpd" in said
            pid = int(pid_file.read_text())
            datagram = b""
            while b"listening on" not in datagram:
                datagram = journald.recv(65536)
        finally:
            _stop(pid_file)
    fields = dict(line.split(b"=", 1) for line in datagram.split(b"\n")[:4])
    assert fields == {b"PRIORITY": b"6", b"SYSLOG_FACILITY": b"2",
                      b"SYSLOG_IDENTIFIER": b"clamsmtpd", b"SYSLOG_PID": str(pid).encode()}
    message = f"listening on 127.0.0.1:{port}".encode()
    assert datagram.endswith(b"\nMESSAGE\n" + len(message).to_bytes(8, "little") + message
                             + b"\n")
    assert "listening on" not in (tmp_path / "stderr").read_text()  # the log is not on stderr


@contextlib.contextmanager
def _silent_clamd(path: Path) -> Iterator[str]:
    """A clamd socket that accepts connections and never answers (a hung clamd, or one still
    loading its database behind a systemd socket)."""
    import socket

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        sock.listen()
        yield str(path)
    finally:
        sock.close()


def test_signals_while_starting_are_acted_on_not_fatal(tmp_path, next_hop):
    # Right after "listening on", clamd's first PING is still unanswered. A SIGHUP then used to
    # kill the daemon (the default action): its handlers came only after that PING.
    log = tmp_path / "stderr"
    with _silent_clamd(tmp_path / "clamd.ctl") as clamd_path:
        proc = start_daemon(tmp_path / "clamsmtpd.conf", {
            "OutAddress": f"127.0.0.1:{next_hop.port}", "Listen": f"127.0.0.1:{free_port()}",
            "ClamAddress": clamd_path, "TempDirectory": tmp_path, "TimeOut": 4,
        }, log, debug_level=3)
        try:
            wait_until(lambda: "listening on" in log.read_text(), what="the daemon to listen")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "configuration reloaded" in log.read_text()
                       or proc.poll() is not None, what="the reload to be logged")
            assert proc.poll() is None, log.read_text()
            assert "clamd is not answering" not in log.read_text()  # the PING was still out
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert log.read_text().rstrip().endswith("stopped")
        finally:
            proc.kill()
            proc.wait()


def test_daemon_mode_does_not_wait_for_a_silent_clamd(tmp_path, next_hop):
    """`clamsmtpd` returns once it serves, even if clamd does not answer yet (mail meanwhile is
    deferred with 451), and a SIGTERM right after stops it at once, not after TimeOut."""
    pid_file = tmp_path / "clamsmtpd.pid"
    port = free_port()
    with _silent_clamd(tmp_path / "clamd.ctl") as clamd_path:
        conf = _detached_conf(tmp_path, next_hop, clamd_path, port, pid_file,
                              extra="TimeOut: 60\n")
        started = time.monotonic()
        try:
            code, stderr = run_detached("-f", str(conf), stderr=tmp_path / "stderr")
            assert code == 0, stderr
            assert time.monotonic() - started < 10  # not TimeOut (60 s)
            pid = int(pid_file.read_text())
            assert _greeting("127.0.0.1", port) == R.GREETING
            os.kill(pid, signal.SIGTERM)
            # not after the start-up PING's 5 s either: that check is not waited for at exit
            wait_until(lambda: not pid_file.exists(), timeout=3, what="the daemon to stop")
        finally:  # the detached daemon is no child of ours: whatever failed, it must not stay
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
