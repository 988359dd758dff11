"""The daemon as a Unix process: detach, pid file, privilege drop, signals held during start-up.

Order (cli.main): bind the listener as root, detach, write the pid file, then drop to `User` for
good. Binding first is what lets a `User`-configured daemon listen below port 1024 (the original
dropped privileges before binding and could not).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import os
import pwd
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from . import capabilities

#: What signal.signal() takes and gives back.
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class ProcessError(Exception):
    """Start-up cannot go on safely; the message says what to change."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_user(user: str) -> Account:
    """`User` by name, or by number as the original allows."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise ProcessError(f"User: no such user '{user}'") from None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


#: Modules Python imports on first use that the daemon uses after the privilege drop: every
#: getaddrinfo() of a host name (OutAddress, ClamAddress, XCLIENT) runs in asyncio's default
#: executor (concurrent.futures.thread) and encodes the name with the idna codec. The
#: interpreter's own files may be closed to `User` (a Python under /root, mode 0700): imported
#: as root, before the drop, or the first host name fails ("unknown encoding: idna").
FIRST_USE_MODULES = ("encodings.idna", "concurrent.futures.thread")


def drop_privileges(account: Account, keep: frozenset[int] = frozenset()) -> None:
    """Become `account` for good: its own groups only (the original kept root's), then gid, uid.

    `keep`: capabilities that stay effective afterwards (CAP_NET_ADMIN for TransparentProxy:
    full), and only those: every other one leaves even the bounding set.
    """
    for module in FIRST_USE_MODULES:
        importlib.import_module(module)
    os.initgroups(account.name, account.gid)
    os.setgid(account.gid)
    if keep and account.uid != 0:
        try:
            capabilities.prepare_keep(keep)
        except capabilities.CapabilityError as e:
            raise ProcessError(str(e)) from None
    os.setuid(account.uid)
    if keep and account.uid != 0:
        keep_only(keep)
    if account.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise ProcessError("unable to completely drop privileges")
        if os.geteuid() == 0 or os.getegid() == 0 and account.gid != 0:
            raise ProcessError("unable to completely drop privileges")


def keep_only(caps: frozenset[int]) -> None:
    """Exactly `caps` effective and permitted from now on (a non-root daemon), none to pass on."""
    try:
        capabilities.restrict_to(caps)
    except capabilities.CapabilityError as e:
        raise ProcessError(str(e)) from None


def read_pid_file(path: str) -> str | None:
    """The start of the pid file, None if there is none. Only a regular file is read: the pid
    directory may be writable by others (the daemon user, or anyone in /tmp), and a FIFO there
    would hang start-up, a symlink would have root read its target."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ProcessError(f"PidFile: {path} is a symbolic link; not followed: remove it "
                               "(or choose a PidFile in a directory only root can write)") from None
        raise ProcessError(f"PidFile: cannot read {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ProcessError(f"PidFile: {path} is not a regular file ({_kind(mode)}): remove "
                               "it (or choose a PidFile in a directory only root can write)")
        return os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError as e:
        raise ProcessError(f"PidFile: cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def check_pid_file(path: str | None) -> None:
    """Refuse to start if the pid file names a live clamsmtpd; a stale one is removed."""
    if not path:
        return
    text = read_pid_file(path)
    if text is None:
        return
    pid = int(text) if text.isdigit() else 0
    if pid > 0 and pid != os.getpid() and _alive(pid):
        raise ProcessError(f"already running as process {pid} (PidFile {path})")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_pid_file(path: str | None) -> None:
    """Create the pid file anew (never through a symlink, never over another file)."""
    if not path:
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        check_pid_file(path)  # a stale file appeared meanwhile: same rules, then once more
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise ProcessError(f"PidFile: cannot create {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid_file(path: str | None) -> None:
    if not path:
        return
    try:
        if read_pid_file(path) != str(os.getpid()):
            return  # not ours any more (nor a file to read at shutdown: a FIFO would hang it)
        os.unlink(path)
    except (OSError, ProcessError):
        pass


def _alive(pid: int) -> bool:
    """Whether `pid` is a running clamsmtpd (a recycled pid of another program is not us)."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # cannot tell: be careful
    return b"clamsmtpd" in cmdline or b"appliance.cli" in cmdline


def daemonize() -> int:
    """Detach as daemon(0, 0) does (new session, cwd /, stdin and stdout on /dev/null), but the
    first process waits until the daemon says it is serving, and exits 0 only then, or 1 if the
    daemon died first: an init system (Type=forking) and a shell see a real start-up result.
    stderr stays the caller's until `ready()`, so a start-up failure after the fork (even a
    traceback) is printed where the command was run, not lost.

    Returns, in the daemon, the file descriptor to pass to `ready()`.
    """
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ok = pipe.read(1) == b"1"
        os._exit(0 if ok else 1)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return write_end


def ready(fd: int | None, keep_stderr: bool = False) -> None:
    """Tell the waiting first process that start-up is done (see `daemonize`), and let go of
    its stderr unless the log goes there (`keep_stderr`: no syslog, no journald)."""
    if fd is None:
        return
    if not keep_stderr:
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 2)
            os.close(null)
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
        os.close(fd)


#: The collector's young generation is collected after this many net allocations of tracked
#: objects (Python's default: 700). A 1 KB message makes and drops some two thousand, nearly all
#: freed by reference counting: at 700 the collector ran a few times per message for nothing.
GC_YOUNG_THRESHOLD = 10_000


def settle_memory() -> None:
    """Once the daemon (or a worker) has started: what start-up made (modules, configuration,
    the loop, the listener) leaves the collector's view for good (`gc.freeze`), and the young
    generation is collected less often. Measured at 1 KB: -1.1 % instructions per message
    (docs/performance.md)."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


#: A start-up that a SIGTERM or SIGINT arrived in has this long to reach the event loop.
STARTUP_STOP_GRACE = 5.0


class HeldSignals:
    """Signals that arrive while the daemon starts, before its event loop handles them.

    Their default actions would kill a daemon that is still starting: a SIGHUP from a reload in
    its first second (no reload, no daemon), a SIGTERM without removing the pid file. Held here
    from the moment start-up begins, they are handed to the event loop once it takes over.

    A held SIGTERM or SIGINT must still stop a start-up that is stuck (a slow file system, a
    hanging lookup): it starts a `stop_grace` timer whose SIGALRM, at its default action, ends
    the process wherever it waits; `take()` stops the timer.
    """

    def __init__(self, signums: tuple[int, ...], stop_grace: float = STARTUP_STOP_GRACE) -> None:
        self.received: list[int] = []
        self.stop_grace = stop_grace
        self._armed = False
        self._alarm_handler: SignalHandler = None  # SIGALRM's handler before the timer
        for signum in signums:
            signal.signal(signum, self._hold)

    def _hold(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if signum in (signal.SIGTERM, signal.SIGINT) and not self._armed:
            self._armed = True
            self._alarm_handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, self.stop_grace)

    def take(self) -> list[int]:
        """The signals received so far, each once, in order; the record is then emptied."""
        if self._armed:  # the event loop takes over: no deadline any more
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._alarm_handler or signal.SIG_DFL)
            self._armed = False
        taken = list(dict.fromkeys(self.received))
        self.received.clear()
        return taken
