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


def _bound(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def test_log_target_is_syslog_then_journald_then_stderr(tmp_path):
    """The original's syslog(3) dropped every line when nothing listened on /dev/log (and the
    first version here sent them to UDP localhost:514): the target must be one that takes
    them. A socket file that nobody listens on any more counts as absent."""
    from appliance.maillog import LogTarget, choose_target

    syslog, journal = tmp_path / "log", tmp_path / "journal"
    assert choose_target(str(syslog), str(journal)) == LogTarget("stderr")
    with _bound(journal):
        assert choose_target(str(syslog), str(journal)) == LogTarget("journald", str(journal))
        with _bound(syslog):
            assert choose_target(str(syslog), str(journal)) == LogTarget("syslog", str(syslog))
        assert syslog.exists()  # left behind by a syslog daemon that stopped
        assert choose_target(str(syslog), str(journal)).kind == "journald"
    assert choose_target(str(syslog), str(journal)).kind == "stderr"
    (tmp_path / "file").write_text("")
    assert choose_target(str(tmp_path / "file"), str(journal)).kind == "stderr"
    assert "journalctl -t clamsmtpd" in LogTarget("journald", str(journal)).notice()
    assert "logging to stderr" in LogTarget("stderr").notice()
    assert LogTarget("syslog", str(syslog)).notice() is None


def test_journald_datagram_keeps_a_multi_line_message_whole(tmp_path):
    from appliance.maillog import JournaldHandler

    handler = JournaldHandler(str(tmp_path / "journal"))
    try:
        record = logging.LogRecord("clamsmtpd", logging.ERROR, __file__, 1,
                                   "line one\nPRIORITY=0", None, None)
        datagram = handler.datagram(record)
    finally:
        handler.close()
    head, _, message = datagram.partition(b"MESSAGE\n")
    assert head.split(b"\n")[0] == b"PRIORITY=3"
    assert message == len(b"line one\nPRIORITY=0").to_bytes(8, "little") \
        + b"line one\nPRIORITY=0\n"
