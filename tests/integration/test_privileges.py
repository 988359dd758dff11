"""Least privilege and the pid file, checked on the running process (/proc), as root."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, send_raw, smtp_client, wait_until

pytestmark = pytest.mark.root

DAEMON = [sys.executable, "-m", "appliance.cli"]
REPO = Path(__file__).resolve().parents[2]


def _setpriv_to(nobody) -> str:
    """setpriv, for a daemon started as `nobody`; skips where that cannot work."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not found")
    closed = [p for p in (REPO, *REPO.parents) if not p.stat().st_mode & 0o001]
    if closed:  # e.g. a checkout in root's home: /root is 0700 on Debian
        pytest.skip(f"user {nobody.pw_name} cannot reach this checkout ({closed[-1]} is closed "
                    "to other users), so the daemon cannot start as that user from it")
    return setpriv


def _low_port() -> int:
    for port in range(990, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.fixture
def nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")


def _start(tmp_path, directives: str) -> subprocess.Popen:
    conf = tmp_path / "clamsmtpd.conf"
    conf.write_text(directives)
    with open(tmp_path / "stderr", "wb") as err:
        return subprocess.Popen([*DAEMON, "-d", "4", "-f", str(conf)], stdout=err, stderr=err,
                                stdin=subprocess.DEVNULL)


def _stderr(tmp_path) -> str:
    return (tmp_path / "stderr").read_text(errors="replace")


def _tree(pid: int) -> list[int]:
    """The daemon and its workers (Workers > 1)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *map(int, f.read().split())]


@pytest.mark.parametrize("workers", [1, 2])
def test_binds_a_low_port_then_runs_as_user_without_root_groups(tmp_path, nobody, next_hop,
                                                               clamd, workers):
    """(With two workers: the parent and both workers alike, and the metrics the workers
    write as nobody add up.)"""
    port = _low_port()
    metrics_port = free_port()
    # pytest's tmp_path lies under a 0700 root directory, which the user could not traverse
    shared = tempfile.mkdtemp(prefix="clamsmtpd-privileges-")
    os.chmod(shared, 0o755)
    spool = Path(shared) / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    pid_dir = Path(shared) / "run"
    pid_dir.mkdir()
    os.chown(pid_dir, nobody.pw_uid, nobody.pw_gid)
    pid_file = pid_dir / "clamsmtpd.pid"
    proc = _start(tmp_path, (
        f"Listen: 127.0.0.1:{port}\nOutAddress: 127.0.0.1:{next_hop.port}\n"
        f"ClamAddress: 127.0.0.1:{clamd.tcp_port}\nTempDirectory: {spool}\n"
        f"User: nobody\nPidFile: {pid_file}\nWorkers: {workers}\n"
        f"MetricsListen: 127.0.0.1:{metrics_port}\n"))
    try:
        wait_until(lambda: send_raw("127.0.0.1", port, ["QUIT"]) if _accepts(port) else None,
                   timeout=15, what=f"the daemon on port {port}; log: {_stderr(tmp_path)}")
        if workers > 1:
            wait_until(lambda: "workers serving" in _stderr(tmp_path), what="every worker")
        pids = _tree(proc.pid)
        assert len(pids) == (1 if workers == 1 else 1 + workers)
        for pid in pids:
            status = _status(pid)
            uid = str(nobody.pw_uid)
            gid = str(nobody.pw_gid)
            assert status["Uid"].split() == [uid] * 4
            assert status["Gid"].split() == [gid] * 4
            assert "0" not in status["Groups"].split()  # root's supplementary groups are gone
            assert status["CapEff"].strip("0") == ""  # no capability left
        assert pid_file.read_text() == f"{proc.pid}\n"
        for _ in range(4):
            with smtp_client(type("A", (), {"host": "127.0.0.1", "port": port})) as client:
                client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        assert len(next_hop.wait_for(4)) == 4
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            assert 'clamsmtpd_messages_total{status="clean"} 4.0' in response.read().decode()
        assert "running as user nobody" in _stderr(tmp_path)
        assert os.listdir(spool) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not pid_file.exists()  # removed at exit, by the unprivileged process
        shutil.rmtree(shared)


def test_host_names_still_resolve_after_the_privilege_drop(tmp_path, nobody, next_hop, clamd):
    """OutAddress and ClamAddress as host names, User: nobody. A host name goes to getaddrinfo
    through the idna codec, which Python imports on first use: with an interpreter the user
    cannot read (this machine's Python is under /root, mode 0700) the import failed after the
    drop, so the start-up clamd check died silently and every message got a 451
    ("LookupError: unknown encoding: idna")."""
    shared = tempfile.mkdtemp(prefix="clamsmtpd-privileges-")
    os.chmod(shared, 0o755)
    spool = Path(shared) / "spool"
    spool.mkdir(mode=0o700)
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    proc = _start(tmp_path, (
        f"Listen: 127.0.0.1:{port}\nOutAddress: localhost:{next_hop.port}\n"
        f"ClamAddress: localhost:{clamd.tcp_port}\nTempDirectory: {spool}\nUser: nobody\n"))
    try:
        wait_until(lambda: _accepts(port), timeout=15,
                   what=f"the daemon on port {port}; log: {_stderr(tmp_path)}")
        with smtp_client(type("A", (), {"host": "127.0.0.1", "port": port})) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
        (received,) = next_hop.wait_for(1)
        assert b"X-Virus-Scanned:" in received.original_content
        assert "running as user nobody" in _stderr(tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        shutil.rmtree(shared)
    assert "LookupError" not in _stderr(tmp_path)
    assert "status=CLEAN" in _stderr(tmp_path)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_unknown_user_is_a_clear_error(tmp_path):
    proc = _start(tmp_path, f"OutAddress: 10025\nListen: 127.0.0.1:{free_port()}\n"
                            "User: no-such-user-x\n")
    assert proc.wait(15) == 1
    assert "User: no such user 'no-such-user-x'" in _stderr(tmp_path)


def test_stale_pid_file_is_replaced_and_live_one_refuses(tmp_path, next_hop):
    pid_file = tmp_path / "clamsmtpd.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")  # a process that no longer exists
    conf = (f"Listen: 127.0.0.1:{free_port()}\nOutAddress: 127.0.0.1:{next_hop.port}\n"
            f"PidFile: {pid_file}\n")
    first = _start(tmp_path, conf)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() == f"{first.pid}\n",
                   what="the new pid file")
        (tmp_path / "second").mkdir()
        second = _start(tmp_path / "second", conf)
        assert second.wait(15) == 1
        assert f"already running as process {first.pid}" in _stderr(tmp_path / "second")
        assert pid_file.read_text() == f"{first.pid}\n"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(15)
    time.sleep(0.1)
    assert not pid_file.exists()


# -- TransparentProxy: full keeps CAP_NET_ADMIN, and nothing else -----------------------------

NET_ADMIN = 1 << 12  # CAP_NET_ADMIN's bit in /proc/PID/status


def _caps(pid: int) -> dict[str, int]:
    status = _status(pid)
    return {key: int(status[key], 16) for key in ("CapInh", "CapPrm", "CapEff", "CapBnd",
                                                  "CapAmb")}


def _full(tmp_path, port: int, user: str | None) -> str:
    return (f"TransparentProxy: full\nListen: 127.0.0.1:{port}\nClamAddress: 127.0.0.1:1\n"
            + (f"User: {user}\n" if user else ""))


@pytest.fixture
def readable_conf():
    """A config file another user can read (pytest's tmp_path lies under a 0700 directory)."""
    shared = Path(tempfile.mkdtemp(prefix="clamsmtpd-privileges-"))
    os.chmod(shared, 0o755)
    yield shared / "clamsmtpd.conf"
    shutil.rmtree(shared)


def _wait_listening(proc: subprocess.Popen, tmp_path, port: int) -> None:
    """Until the daemon serves: its "listening on" line, logged after the privilege drop. The
    port alone is not enough: it accepts from the bind on, before the drop (as root)."""
    wait_until(lambda: proc.poll() is not None or "listening on" in _stderr(tmp_path),
               timeout=15, what=f"the daemon on port {port}; log: {_stderr(tmp_path)}")
    assert proc.poll() is None, _stderr(tmp_path)
    assert _accepts(port)


@pytest.mark.parametrize("workers", [1, 2])
def test_full_transparency_keeps_only_cap_net_admin_after_the_drop(tmp_path, nobody, workers):
    port = free_port()
    proc = _start(tmp_path, _full(tmp_path, port, "nobody") + f"Workers: {workers}\n")
    try:
        _wait_listening(proc, tmp_path, port)
        if workers > 1:
            wait_until(lambda: "workers serving" in _stderr(tmp_path), what="every worker")
        for pid in _tree(proc.pid):  # (the workers inherit the parent's, and no more)
            status = _status(pid)
            assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
            caps = _caps(pid)
            # effective and permitted: CAP_NET_ADMIN alone; nothing a child could inherit
            assert caps == {"CapInh": 0, "CapPrm": NET_ADMIN, "CapEff": NET_ADMIN,
                            "CapBnd": NET_ADMIN, "CapAmb": 0}
        assert "kept CAP_NET_ADMIN, and no other capability" in _stderr(tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_full_transparency_started_with_ambient_cap_net_admin_keeps_it_but_passes_none_on(
        tmp_path, nobody, readable_conf):
    """As systemd starts it: User=, AmbientCapabilities=CAP_NET_ADMIN."""
    setpriv = _setpriv_to(nobody)
    port = free_port()
    conf = readable_conf
    conf.write_text(_full(tmp_path, port, None))
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
             "--inh-caps=+net_admin", "--ambient-caps=+net_admin",
             *DAEMON, "-d", "4", "-f", str(conf)],
            stdout=err, stderr=err, stdin=subprocess.DEVNULL, cwd=os.getcwd(),
        )
    try:
        _wait_listening(proc, tmp_path, port)
        caps = _caps(proc.pid)
        assert (caps["CapEff"], caps["CapPrm"], caps["CapInh"], caps["CapAmb"]) == (
            NET_ADMIN, NET_ADMIN, 0, 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_full_transparency_without_cap_net_admin_refuses_to_start(tmp_path, nobody,
                                                                   readable_conf):
    setpriv = _setpriv_to(nobody)
    conf = readable_conf
    conf.write_text(_full(tmp_path, free_port(), None))
    result = subprocess.run(
        [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         *DAEMON, "-d", "1", "-f", str(conf)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1, result.stderr
    assert "needs CAP_NET_ADMIN" in result.stderr, result.stderr


# -- ClientTLS: the key is read as root, before the privilege drop ------------------------------


def test_tls_key_readable_by_root_only_works_after_the_drop_and_a_reload_keeps_it(
        tmp_path, nobody, next_hop, clamd, tls_certs):
    """A key of mode 0600 root: read at start, before becoming nobody, so STARTTLS works. On
    SIGHUP nobody cannot read it again: the reload is refused with the reason, the daemon keeps
    the old certificate and goes on serving TLS."""
    from tlskit import client_context

    shared = tempfile.mkdtemp(prefix="clamsmtpd-tls-privileges-")
    os.chmod(shared, 0o755)
    try:
        spool = Path(shared) / "spool"
        spool.mkdir(mode=0o700)
        os.chown(spool, nobody.pw_uid, nobody.pw_gid)
        key = Path(shared) / "key.pem"
        key.write_bytes(tls_certs.proxy.key.read_bytes())
        key.chmod(0o600)  # root's alone
        cert = Path(shared) / "cert.pem"
        cert.write_bytes(tls_certs.proxy.cert.read_bytes())
        port = free_port()
        proc = _start(Path(shared), (  # (the configuration must stay readable for nobody)
            f"Listen: 127.0.0.1:{port}\nOutAddress: 127.0.0.1:{next_hop.port}\n"
            f"ClamAddress: 127.0.0.1:{clamd.tcp_port}\nTempDirectory: {spool}\n"
            f"User: nobody\nClientTLS: on\nTLSCertificate: {cert}\nTLSKey: {key}\n"))
        address = type("A", (), {"host": "127.0.0.1", "port": port})

        def send_over_tls() -> None:
            with smtp_client(address) as client:
                client.ehlo()
                client.starttls(context=client_context(tls_certs))
                client.sendmail("a@example.com", ["b@example.com"], b"Subject: t\r\n\r\nt\r\n")

        try:
            _wait_listening(proc, Path(shared), port)
            assert _status(proc.pid)["Uid"].split() == [str(nobody.pw_uid)] * 4
            send_over_tls()
            assert len(next_hop.wait_for(1)) == 1
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "SIGHUP: configuration not reloaded" in _stderr(Path(shared)),
                       what="the refused reload")
            assert f"TLSKey: cannot load {cert} / {key}" in _stderr(Path(shared))
            send_over_tls()  # the old certificate and key, still in memory
            assert len(next_hop.wait_for(2)) == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    finally:
        shutil.rmtree(shared)
