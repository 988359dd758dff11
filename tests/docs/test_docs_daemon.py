"""Documented commands against the daemon: swaks, -d 4, the mail log grep, metrics, VirusAction."""

from __future__ import annotations

import re
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest
from docskit import (
    BLOCKS,
    SWAKS,
    Command,
    block_kind,
    documented,
    needs_clamsmtp_user,
    needs_root,
    ok,
    run,
    script_block,
    sh,
)
from helpers import EICAR, free_port


@pytest.mark.skipif(SWAKS is None, reason="swaks is missing (scripts/setup installs it)")
@pytest.mark.next_hop_replies(ehlo_extensions=["8BITMIME", "PIPELINING", "STARTTLS", "CHUNKING"],
                              DATA="250 2.0.0 Ok: queued as 3F2A81C0D4")
def test_swaks_commands_against_clamsmtpd(appliance, next_hop, tmp_path):
    """postfix.md "Test with swaks": the clean message is relayed, EICAR is dropped (250)."""
    eicar = tmp_path / "eicar.com"
    for command in documented("test_swaks_commands_against_clamsmtpd"):
        text = command.text.replace("/tmp/eicar.com", str(eicar)).replace(
            "127.0.0.1:10026", f"127.0.0.1:{appliance.port}")
        result = sh(text)
        if command.words[0] == "printf":
            ok(result)
            assert eicar.read_bytes() == EICAR
            continue
        assert result.returncode == 0, result.stdout + result.stderr
        ehlo = [x for x in result.stdout.splitlines() if x.startswith("<-  250")]
        assert not [x for x in ehlo if re.search("STARTTLS|CHUNKING", x)], ehlo
        for reply in expected_replies(command):
            assert f"<-  {reply}" in result.stdout, (reply, result.stdout)
    assert [m.header("X-Virus-Scanned") for m in next_hop.messages] == [
        "ClamAV using ClamSMTP"]  # the clean one only


def expected_replies(command: Command) -> list[str]:
    """The `# <-  REPLY   notes` lines that follow a command in its block."""
    lines = command.block.text.splitlines()
    start = command.line - command.block.line
    replies = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            if replies or not line.startswith(" "):
                break
            continue  # a continuation line of the command
        match = re.match(r"#\s*<-\s+(.+?)(\s{2,}.*)?$", line)
        if match:
            replies.append(match[1])
    return replies


def test_debug_level_4_shows_the_documented_dialogue(appliance, tmp_path):
    """troubleshooting.md: `clamsmtpd -d 4 -f FILE` and the dialogue it shows. The appliance
    fixture runs the daemon exactly so, with a lab configuration as FILE."""
    command = next(c for c in documented("test_debug_level_4_shows_the_documented_dialogue")
                   if c.block is not None)
    assert appliance.proc.args[-4:] == [*command.words[1:4], str(appliance.conf_path)]
    with smtplib.SMTP(appliance.host, appliance.port, local_hostname="mail.example.org",
                      timeout=30) as client:
        client.sendmail("alice@example.org", ["bob@example.com"],
                        b"Subject: debug\r\n\r\nhello\r\n")
    sample = next(b for b in BLOCKS if b.page == command.page and b.line > command.line)
    assert block_kind(sample) == "output", sample.where
    wanted = [dialogue_shape(x) for x in sample.text.splitlines() if x.strip() != "..."]
    shown = [dialogue_shape(x) for x in appliance.wait_log("status=CLEAN").splitlines()]
    position = 0
    for shape in wanted:
        assert shape in shown[position:], (shape, shown)
        position = shown.index(shape, position) + 1


def dialogue_shape(line: str) -> str:
    """A -d 4 log line without what varies: ids, addresses, host names, texts."""
    line = re.sub(r"^clamsmtpd: ", "", line.strip())
    prefix = "ID: " if re.match(r"^[0-9A-F]{6}: ", line) else ""
    line = line[len(prefix) + 4 if prefix else 0:]
    if match := re.match(r"SERVER > \d{3}[- ]|CLIENT < [A-Za-z]+", line):
        return prefix + match[0].upper()
    if status := re.search(r"status=\w+", line):
        return f"{prefix}from=..., {status[0]}"
    return prefix + re.sub(r"(:| on) .*", r"\1", line)


def test_mail_log_grep_matches_the_sample_lines(tmp_path):
    """postfix.md: the grep of the mail log, on the sample log lines shown under it."""
    for command in documented("test_mail_log_grep_matches_the_sample_lines"):
        lines = command.block.text.splitlines()
        start = command.line - command.block.line
        sample = [x[2:] for x in lines[start + 1:] if x.startswith("# ")]
        assert sample, command
        log = tmp_path / "mail.log"
        log.write_text("postfix/qmgr[2200]: unrelated line\n" + "\n".join(sample) + "\n")
        result = ok(sh(command.text.replace("/var/log/mail.log", str(log))))
        assert result.stdout.splitlines() == sample


_metrics = {}


def _metrics_listen(_hop) -> str:
    _metrics["port"] = free_port()
    return f"127.0.0.1:{_metrics['port']}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing")
@pytest.mark.appliance_config(MetricsListen=_metrics_listen)
def test_metrics_curl_command(appliance):
    for command in documented("test_metrics_curl_command"):
        words = [w.replace(":9330/", f":{_metrics['port']}/") for w in command.words]
        result = ok(run(words))
        assert "clamsmtpd_connections_total" in result.stdout


@needs_root
@needs_clamsmtp_user
def test_virus_action_example_is_safe_with_hostile_values():
    """security.md: the example VirusAction script, run as its "Test it by hand" line says,
    with the script in a temporary place and a logger that records instead of syslog."""
    block = script_block("sh", "clamsmtp-virus-action")
    ok(run(["sh", "-n"], input=block.text))
    work = Path(tempfile.mkdtemp(prefix="clamsmtp-docs-"))
    try:
        work.chmod(0o755)
        script, fakebin, logged, drop = (work / "clamsmtp-virus-action", work / "bin",
                                         work / "logged", work / "drop")
        script.write_text(block.text)
        script.chmod(0o755)
        fakebin.mkdir(mode=0o755)
        (fakebin / "logger").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {logged}\n')
        (fakebin / "logger").chmod(0o755)
        logged.touch(mode=0o666)
        logged.chmod(0o666)
        drop.mkdir()
        drop.chmod(0o777)  # the clamsmtp user could create /tmp/pwned here, if it were unsafe
        for command in documented("test_virus_action_example_is_safe_with_hostile_values"):
            text = (command.text.replace("/usr/local/sbin/clamsmtp-virus-action", str(script))
                    .replace("/tmp/pwned", str(drop / "pwned"))
                    .replace("PATH=/usr/bin:/bin", f"PATH={fakebin}:/usr/bin:/bin"))
            result = sh(text)
            assert result.returncode != 0 and "No such file" in result.stderr, result
            assert not (drop / "pwned").exists()
            record = logged.read_text()
            assert "-p mail.notice -t clamsmtp-virus --" in record, record
            assert "virus=Eicar-Test client=127.0.0.1" in record
            assert "sender=$(touch" in record and "`id`" in record  # kept as text, never run
    finally:
        shutil.rmtree(work)
