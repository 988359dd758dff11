"""Logging in the original's format, so logcheck rules and log tooling keep working.

Per-connection lines are `<id>: ...` with a six-hex-digit id counting up from 0x100000, the
summary after each message is `<id>: from=<a>, to=<b>, status=CLEAN`. With `-d N` lines go to
stderr as `clamsmtpd: ...`, up to level N (0 errors .. 4 debug); otherwise to syslog, facility mail,
or, on a host with no syslog socket (containers, minimal VMs), to journald's own socket when there
is one and to stderr when not: never to a place nobody reads (see `choose_target`).
"""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import os
import socket
import stat
import struct
import sys
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

LOGGER_NAME = "clamsmtpd"
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

#: -d N shows levels up to LOG_ERR + N, as syslog levels go.
DEBUG_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: NOTICE, 3: logging.INFO, 4: logging.DEBUG}
#: The original's summary buffer: past it the recipient list is cut, `status=` always survives.
MAX_SUMMARY = 768

#: Where a syslog daemon (or journald, through its /dev/log link) takes syslog datagrams.
SYSLOG_SOCKET = "/dev/log"
#: journald's native protocol socket, there even when /dev/log is not (no systemd-journald-dev-log).
JOURNALD_SOCKET = "/run/systemd/journal/socket"
#: syslog's facility mail, as journald records it.
_FACILITY_MAIL = 2

log = logging.getLogger(LOGGER_NAME)
_ids: Iterator[int] = itertools.count(0x100000)


def next_connection_id() -> int:
    return next(_ids) & 0xFFFFFFFF or next(_ids)


def use_connection_ids(ids: Iterator[int]) -> None:
    """Take connection ids from `ids` from now on: a worker of a daemon with `Workers` > 1
    takes them from the daemon-wide sequence (appliance/shared.py), unique across workers."""
    global _ids
    _ids = ids


class ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """A logger that prefixes every line with the connection id."""

    def __init__(self, conn_id: int) -> None:
        super().__init__(log, {})
        self.prefix = f"{conn_id:06X}: "

    def process(self, msg: object, kwargs: MutableMapping[str, Any]
                ) -> tuple[str, MutableMapping[str, Any]]:
        return self.prefix + str(msg), kwargs


def summary(sender: str | None, recipients: Iterable[str], status: str,
            tls: str | None = None) -> str:
    """`from=a, to=b, to=c, status=X` (addresses without brackets, null sender as `<>`).

    With `tls` (`TLSv1.3/none`: the client's leg, then the next hop's), `tls=...` goes just
    before `status=`, which stays last as in the original; a session in clear on both legs
    logs exactly the original's line."""
    parts = []
    if sender is not None:
        parts.append(f"from={sender or '<>'}")
    parts.extend(f"to={r}" for r in recipients)
    head = ", ".join(parts)
    tail = f"status={status}" if tls is None else f"tls={tls}, status={status}"
    room = MAX_SUMMARY - len(tail) - 2
    if len(head) > room:
        head = head[: max(room - 3, 0)] + "..."
    return f"{head}, {tail}" if head else tail


@dataclass(frozen=True)
class LogTarget:
    """Where the detached daemon's log goes: "syslog", "journald" or "stderr"."""

    kind: str
    address: str | None = None

    def notice(self) -> str | None:
        """What to say once on stderr at start-up when it is not the usual syslog."""
        if self.kind == "journald":
            return (f"no syslog socket at {SYSLOG_SOCKET}: logging to journald through "
                    f"{self.address} (read it with: journalctl -t clamsmtpd)")
        if self.kind == "stderr":
            return (f"no syslog socket at {SYSLOG_SOCKET} and no journald socket at "
                    f"{JOURNALD_SOCKET}: logging to stderr")
        return None


def choose_target(syslog: str | None = None, journald: str | None = None) -> LogTarget:
    """The first that takes a datagram: the syslog socket, journald's socket, else stderr.

    The original's syslog(3) dropped every line when nothing listened on /dev/log; a daemon
    whose log vanishes cannot be run, so an unusable socket counts as absent.
    """
    syslog = syslog or SYSLOG_SOCKET
    journald = journald or JOURNALD_SOCKET
    if _accepts_datagrams(syslog):
        return LogTarget("syslog", syslog)
    if _accepts_datagrams(journald):
        return LogTarget("journald", journald)
    return LogTarget("stderr")


def _accepts_datagrams(path: str) -> bool:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
    except OSError:
        return False
    return True


def setup_logging(
    debug_level: int | None, syslog_address: str | None = None, target: LogTarget | None = None
) -> None:
    """Foreground (`-d N`): stderr. Daemon: `target` (default `choose_target()`), debug
    suppressed as the original; `syslog_address` forces a syslog socket (tests)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    # aiosmtpd logs every connection at INFO under "mail.log"; our own lines say it better.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if debug_level is not None:
        handler: logging.Handler = _stderr_handler()
        level = DEBUG_LEVELS[debug_level]
    else:
        if syslog_address is not None:
            target = LogTarget("syslog", syslog_address)
        target = target or choose_target()
        if target.kind == "syslog":
            handler = _syslog_handler(target.address)
        elif target.kind == "journald":
            handler = JournaldHandler(target.address or JOURNALD_SOCKET)
        else:
            handler = _stderr_handler()
        level = logging.INFO
    root.addHandler(handler)
    log.setLevel(level)
    root.setLevel(max(level, logging.INFO) if debug_level is None else level)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clamsmtpd: %(message)s"))
    return handler


def _syslog_handler(address: str | None = None) -> logging.Handler:
    handler = _MailSysLogHandler(
        address=address or SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
    )
    handler.ident = f"clamsmtpd[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class _MailSysLogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler whose NOTICE level maps to syslog's notice (the stdlib has no NOTICE)."""

    def mapPriority(self, levelName: str) -> str:
        return _map_priority(levelName)


class JournaldHandler(logging.Handler):
    """journald's native protocol: one datagram of fields per line, as `journalctl -t
    clamsmtpd` and `journalctl SYSLOG_FACILITY=2` find syslog's own lines (python3-systemd is
    not needed for this much)."""

    _PRIORITY = {"DEBUG": 7, "INFO": 6, "NOTICE": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.setFormatter(logging.Formatter("%(message)s"))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def datagram(self, record: logging.LogRecord) -> bytes:
        message = self.format(record).encode("utf-8", "replace")
        fields = [
            f"PRIORITY={self._PRIORITY.get(record.levelname, 4)}",
            f"SYSLOG_FACILITY={_FACILITY_MAIL}",
            f"SYSLOG_IDENTIFIER={LOGGER_NAME}",
            f"SYSLOG_PID={os.getpid()}",
        ]
        head = "".join(f"{field}\n" for field in fields).encode()
        # MESSAGE in the length-prefixed form: a newline in it cannot start a new field.
        return head + b"MESSAGE\n" + struct.pack("<Q", len(message)) + message + b"\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(self.datagram(record), self.address)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def _map_priority(levelname: str) -> str:
    return {"NOTICE": "notice"}.get(levelname) or logging.handlers.SysLogHandler.priority_map.get(
        levelname, "warning"
    )
