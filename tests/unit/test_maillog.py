"""Log lines reach syslog as the original's did: facility mail, ident clamsmtpd, debug dropped."""

import logging
import os
import socket

from appliance.maillog import ConnectionLog, setup_logging


def test_syslog_lines(tmp_path):
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(path)
        syslogd.settimeout(5)
        try:
            setup_logging(None, syslog_address=path)
            log = ConnectionLog(0x100000)
            log.debug("not shown")
            log.info("from=a@example.com, to=b@example.com, status=CLEAN")
            log.error("couldn't connect")
            first = syslogd.recv(1024).decode()
            second = syslogd.recv(1024).decode()
        finally:
            for handler in logging.getLogger().handlers:
                handler.close()
            logging.getLogger().handlers.clear()
    # <22> = facility mail (2) * 8 + info (6); <19> = mail + err (3)
    pid = os.getpid()
    assert first == f"<22>clamsmtpd[{pid}]: 100000: from=a@example.com, to=b@example.com, " \
                    "status=CLEAN\x00"
    assert second == f"<19>clamsmtpd[{pid}]: 100000: couldn't connect\x00"
