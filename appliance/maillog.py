"""Logging in the original's format, so logcheck rules and log tooling keep working.

Per-connection lines are `<id>: ...` with a six-hex-digit id counting up from 0x100000, the
summary after each message is `<id>: from=<a>, to=<b>, status=CLEAN`. With `-d N` lines go to
stderr as `clamsmtpd: ...`, up to level N (0 errors .. 4 debug); otherwise to syslog, facility mail.
"""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterable

LOGGER_NAME = "clamsmtpd"
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

#: -d N shows levels up to LOG_ERR + N, as syslog levels go.
DEBUG_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: NOTICE, 3: logging.INFO, 4: logging.DEBUG}
#: The original's summary buffer: past it the recipient list is cut, `status=` always survives.
MAX_SUMMARY = 768

log = logging.getLogger(LOGGER_NAME)
_ids = itertools.count(0x100000)


def next_connection_id() -> int:
    return next(_ids) & 0xFFFFFFFF or next(_ids)


class ConnectionLog(logging.LoggerAdapter):
    """A logger that prefixes every line with the connection id."""

    def __init__(self, conn_id: int) -> None:
        super().__init__(log, {})
        self.prefix = f"{conn_id:06X}: "

    def process(self, msg, kwargs):
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


def setup_logging(debug_level: int | None, syslog_address: str | None = None) -> None:
    """Foreground (`-d N`): stderr. Daemon: syslog mail, debug suppressed as the original."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # aiosmtpd logs every connection at INFO under "mail.log"; our own lines say it better.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if debug_level is not None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("clamsmtpd: %(message)s"))
        level = DEBUG_LEVELS[debug_level]
    else:
        handler = _syslog_handler(syslog_address)
        level = logging.INFO
    root.addHandler(handler)
    log.setLevel(level)
    root.setLevel(max(level, logging.INFO) if debug_level is None else level)


def _syslog_handler(address: str | None = None) -> logging.Handler:
    if address is None:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
    handler = logging.handlers.SysLogHandler(
        address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL
    )
    handler.ident = f"clamsmtpd[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.mapPriority = _map_priority  # type: ignore[method-assign]
    return handler


def _map_priority(levelname: str) -> str:
    return {"NOTICE": "notice"}.get(levelname) or logging.handlers.SysLogHandler.priority_map.get(
        levelname, "warning"
    )
