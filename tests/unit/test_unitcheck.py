"""--check-config warns about what the unit's PrivateTmp=yes breaks: a clamd socket or a
quarantine under /tmp or /var/tmp."""

from appliance.config import parse_config
from appliance.unitcheck import private_tmp_warnings


def warnings_for(text: str) -> list[str]:
    return private_tmp_warnings(parse_config("OutAddress: 10025\n" + text, "c.conf"))


def test_a_clamd_socket_under_tmp_is_invisible_to_the_service():
    for path in ("/tmp/clamd.sock", "/var/tmp/clamav/clamd.ctl"):
        found = warnings_for(f"ClamAddress: {path}\n")
        assert len(found) == 1 and found[0].startswith(f"ClamAddress: {path} is under /tmp")
        assert "PrivateTmp=yes" in found[0]
    assert warnings_for("ClamAddress: /var/run/clamav/clamd.ctl\n") == []
    assert warnings_for("ClamAddress: /tmpfoo/clamd.ctl\n") == []  # not under /tmp
    assert warnings_for("ClamAddress: 127.0.0.1:3310\n") == []


def test_a_quarantine_under_tmp_is_lost_at_each_stop():
    found = warnings_for("TempDirectory: /var/tmp/spool\nQuarantine: on\n")
    assert len(found) == 1 and "quarantined messages there are lost" in found[0]
    assert warnings_for("TempDirectory: /tmp\nQuarantine: on\n")
    # without Quarantine a spool file lives only for one scan: the default /tmp is fine
    assert warnings_for("TempDirectory: /tmp\n") == []
    assert warnings_for("") == []
    assert warnings_for("TempDirectory: /var/spool/clamsmtp\nQuarantine: on\n") == []
