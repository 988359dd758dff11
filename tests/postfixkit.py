"""A private Postfix instance for the tests (test_postfix_roundtrip.py, test_postfix_tls.py).

Its own configuration, queue and data directories and mail log (maillog_file) in a fresh
/var/tmp/clamsmtp-postfix-* directory (the daemons run as user postfix and must be able to
enter it; pytest's tmp_path is root's only), started with `postfix -c DIR start` (root may name
any config directory; the machine's /etc/postfix is neither read for the settings nor changed)
and stopped, and the directory removed, at the end. Every service runs unchrooted, on 127.0.0.1
only, IPv4, without DNS.

    with PrivatePostfix(smtpd_port, "myhostname = postfix.test\\nrelayhost = ...\\n") as postfix:
        postfix.log(), postfix.postconf("-n"), postfix.config_dir

Import it as `from postfixkit import ...` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

#: Skip a module where Postfix is not installed (its master must also start as root: mark the
#: module `root` too; tests/conftest.py skips those otherwise).
needs_postfix = pytest.mark.skipif(
    not (os.access(POSTFIX, os.X_OK) and os.access(POSTCONF, os.X_OK)),
    reason=f"{POSTFIX} or {POSTCONF} is missing (Debian package postfix)")

#: What keeps an instance to itself: its own directories and log, loopback IPv4 only, no local
#: delivery tables, no DNS. The instance's own lines (myhostname, relayhost, ...) follow.
ISOLATION_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_dns_support_level = disabled
smtputf8_enable = no
biff = no
"""

#: Debian's master.cf services that SMTP in and out (and STARTTLS) need, all unchrooted; the
#: public smtpd on a free port instead of 25.
MASTER_CF = """\
127.0.0.1:{smtpd_port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
postlog    unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """A Postfix instance of its own, its smtpd on 127.0.0.1:`smtpd_port`; `main_cf` and
    `master_cf` are the instance's own lines, after ISOLATION_CF and MASTER_CF."""

    def __init__(self, smtpd_port: int, main_cf: str, master_cf: str = "",
                 comment: str = "a private instance for the tests") -> None:
        self.smtpd_port = smtpd_port
        self.main_cf, self.master_cf, self.comment = main_cf, master_cf, comment
        self.base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="clamsmtp-postfix-"))
        self.config_dir = self.base / "etc"
        self.maillog = self.base / "maillog"
        self.master_pid: int | None = None

    def __enter__(self) -> PrivatePostfix:
        try:
            self.base.chmod(0o755)
            self.config_dir.mkdir(mode=0o755)
            (self.config_dir / "main.cf").write_text(
                f"# {self.comment}\n" + ISOLATION_CF.format(base=self.base) + self.main_cf)
            (self.config_dir / "master.cf").write_text(
                MASTER_CF.format(smtpd_port=self.smtpd_port) + self.master_cf)
            self.master_pid = self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def postconf(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTCONF, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=30)

    def _start(self) -> int:
        """`postfix -c config_dir start`; the master's pid."""
        (self.base / "queue").mkdir(mode=0o755)  # Postfix makes its subdirectories itself
        data = self.base / "data"
        data.mkdir(mode=0o700)
        shutil.chown(data, "postfix", "postfix")  # master.lock is made by user postfix
        # postconf waits a second or two for a main.cf or master.cf changed just now to settle
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))
        result = subprocess.run([POSTFIX, "-c", str(self.config_dir), "start"],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            pytest.fail(f"postfix -c {self.config_dir} start exited {result.returncode}\n"
                        f"{result.stdout}{result.stderr}\n--- maillog:\n{self.log()}",
                        pytrace=False)
        return int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])

    def _stop(self) -> None:
        if not self.config_dir.exists():
            return
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"], capture_output=True,
                       timeout=30)
        master = self.master_pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not (master and _alive(master)) and not _instance_pids(self.config_dir):
                return
            time.sleep(0.1)
        for pid in ([master] if master else []) + _instance_pids(self.config_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """`pid` runs (a zombie, already dead and waiting for its parent, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _instance_pids(config_dir: Path) -> list[int]:
    """The processes of our instance: master passes MAIL_CONFIG=config_dir to its children."""
    needle = f"MAIL_CONFIG={config_dir}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ and _alive(int(entry)):
            found.append(int(entry))
    return found
