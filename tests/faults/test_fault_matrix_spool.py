"""The fault matrix: TempDirectory full, missing, not a directory or read-only.

What every row promises and checks, and the rows' shared driver (transaction, CLIENT_LEG,
...): matrixkit.py. The misbehaving peers are faultkit.py's. docs/reliability.md lists every row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import replies as R
from faultkit import assert_still_serving, clean_message, delivered_contents
from helpers import (
    free_port,
    proxy_directives,
    send_raw,
    start_daemon,
    wait_until,
    write_appliance_config,
)
from matrixkit import CLIENT_LEG, ENVELOPE, big_message, final_reply, transaction

from appliance.spool import MEMORY_LIMIT

# -- TempDirectory -----------------------------------------------------------------------------


def _mount_tmpfs(path, *options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("mode=0700", *options)), "tmpfs",
                    str(path)], check=True, capture_output=True)


def _umount(path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.root
@CLIENT_LEG
def test_temp_directory_full(client_leg, appliance, next_hop):
    """A 1 MiB TempDirectory and a 2 MiB message -> 451 (the whole body is still read, so the
    session stays in step); a small one in the same session then goes through."""
    spool = appliance.spool_dir
    _mount_tmpfs(spool, "size=1m")
    try:
        message = big_message(2 << 20, "too-big-for-the-disk")
        token = f"fits-{time.time_ns()}"
        replies = send_raw(appliance.host, appliance.port, [
            *ENVELOPE, "DATA", (message + b".\r\n", 1),
            *ENVELOPE[1:], "DATA", (clean_message(token) + b".\r\n", 1), "QUIT"],
            tls=client_leg == "tls")
        assert replies[5] == R.LOCAL_ERROR, replies[:6]
        assert replies[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA]
        assert replies[9].startswith("250 2.0.0"), replies
        assert "couldn't write to cache file" in appliance.log()
        [content] = wait_until(lambda: delivered_contents(next_hop), what="the small message")
        assert token.encode() in content
        assert os.listdir(spool) == []  # nothing left on the full disk either
    finally:
        _umount(spool)
    assert_still_serving(appliance, next_hop)


@pytest.mark.parametrize("how", ["missing", "not-a-directory", "read-only"])
@CLIENT_LEG
def test_temp_directory_unusable(client_leg, how, appliance, next_hop):
    """TempDirectory missing, a file, or read-only: a body too big to keep in memory -> 451 and
    the session goes on; a small one in the same session never needed the disk and is delivered;
    once the directory is fixed the same daemon spools big ones again."""
    spool = appliance.spool_dir
    mounted = False
    if how != "read-only":
        spool.rmdir()
    if how == "not-a-directory":
        spool.write_bytes(b"not a directory\n")
    elif how == "read-only":
        if os.geteuid() == 0:  # root ignores modes: a read-only file system it is
            _mount_tmpfs(spool, "ro")
            mounted = True
        else:
            spool.chmod(0o500)
    big = big_message(MEMORY_LIMIT + 4096, f"spool-{how}")
    token = f"small-{how}-{time.time_ns()}"
    try:
        replies = send_raw(appliance.host, appliance.port, [
            *ENVELOPE, "DATA", (big + b".\r\n", 1),
            *ENVELOPE[1:], "DATA", (clean_message(token) + b".\r\n", 1), "QUIT"],
            tls=client_leg == "tls")
        assert replies[5] == R.LOCAL_ERROR, replies[:6]
        assert replies[6:9] == ["250 2.1.0 OK", "250 2.1.5 OK", R.START_DATA]
        assert replies[9].startswith("250 2.0.0"), replies
        assert f"couldn't open cache file in {spool}" in appliance.log()
        [content] = wait_until(lambda: delivered_contents(next_hop), what="the small message")
        assert token.encode() in content
    finally:
        if mounted:
            _umount(spool)
        elif how == "read-only":
            spool.chmod(0o700)
        else:
            if how == "not-a-directory":
                spool.unlink()
            spool.mkdir(mode=0o700)
    next_hop.clear()
    replies = transaction(appliance, big, tls=client_leg == "tls")
    assert final_reply(replies).startswith("250 2.0.0"), replies
    assert_still_serving(appliance, next_hop)


def test_unusable_temp_directory_is_reported_at_start_up(tmp_path, clamd, next_hop):
    """Small bodies never touch TempDirectory, so a broken one is named at start-up, before a
    big message finds it."""
    missing = tmp_path / "no-such-spool"
    log = tmp_path / "clamsmtpd.stderr"
    proc = start_daemon(tmp_path / "clamsmtpd.conf",
                        proxy_directives(free_port(), next_hop, clamd, missing), log,
                        debug_level=3)
    try:
        wait_until(lambda: "is not usable" in log.read_text(), timeout=20,
                   what="the TempDirectory warning")
    finally:
        proc.terminate()
        proc.wait(10)
    said = log.read_text()
    assert f"TempDirectory {missing} is not usable (No such file or directory)" in said, said
    assert "will be deferred (451) until it is" in said


def test_unusable_temp_directory_is_reported_on_reload(appliance, tmp_path):
    """The same on SIGHUP, when the new configuration names a TempDirectory that is not there."""
    missing = tmp_path / "gone"
    write_appliance_config(appliance.conf_path, {**appliance.directives, "TempDirectory": missing})
    appliance.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: f"TempDirectory {missing} is not usable" in appliance.log(), timeout=20,
               what="the TempDirectory warning after SIGHUP")
