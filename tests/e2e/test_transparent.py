"""Transparent mode end to end, through the kernel, in network namespaces (root only).

    client ns 192.0.2.10 / 2001:db8:1::10  --swaks to the mail server's address, port 25-->
      gateway ns: clamsmtp-netsetup REDIRECT (g0) -> clamsmtpd (TransparentProxy, clamd)
        --> mail server ns 198.51.100.25 / 2001:db8:2::25 :25 (records every message as files)

The tests that use the module's lab run twice: TransparentProxy: on (netsetup --mode redirect,
the server sees the gateway's address) and full (--mode tproxy: TPROXY, policy routing and a
connection from the client's own address, which the server sees).

The lab is `lab.netlab.NetLab`, built with the provisioning scripts of
vagrant/provision/ run inside the namespaces: the same code as `scripts/netlab` and a Vagrant
lab. One lab serves the module; the last tests build their own (the lab command itself, a
failed start, Ctrl-C). Every test checks what the mail server recorded, not only SMTP replies.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import EICAR, netlab
from lab.netlab import CLIENT, GATEWAY_OUT, SERVER, NetLab, nslab

REQUIREMENTS = netlab.requirements()


def needs_lab(test):
    """Root, network namespaces, swaks, clamd and iptables; else skipped with the reason."""
    reason = f"namespace gateway lab: {REQUIREMENTS[1]}" if REQUIREMENTS else ""
    test = pytest.mark.skipif(REQUIREMENTS is not None, reason=reason)(test)
    return pytest.mark.root(test)


# The daemon's log shows the original destination as Address.__str__ writes it.
DESTINATIONS = pytest.mark.parametrize(
    ("family", "destination"),
    [(4, "198.51.100.25:25"), (6, "[2001:db8:2::25]:25")],
    ids=["ipv4", "ipv6"],
)
PROXY_GREETING = "<-  220 smtp.passthru"  # what clamsmtpd says instead of the server's banner
BOUNCE_REPLY = "550 Virus Detected; Content Rejected"
EICAR_BASE64 = base64.b64encode(EICAR)[:48]  # how it travels as a MIME attachment


def _subject(what: str) -> str:
    return f"e2e {what} {secrets.token_hex(4)}"


def _processes_using(path: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line mentions `path`."""
    found = []
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _demo_shape(lines: list[str]) -> set[str]:
    """`scripts/netlab --demo` output lines with what differs between runs (work directory,
    namespace names, every number: pids, uids, sizes, counters) replaced by placeholders, and
    runs of spaces made one (iptables pads its counter columns to the counters' widths)."""
    shape = set()
    for line in lines:
        line = re.sub(r"/tmp/clamsmtp-netlab-[^/\s)]+", "WORKDIR", line.rstrip())
        line = re.sub(r"\bnl[cgs]-\d+-[0-9a-f]+\b", "NS", line)
        line = re.sub(r" +", " ", re.sub(r"\d+", "N", line))
        if line and not line.startswith("setup: "):  # scripts/setup's lines: not netlab's
            shape.add(line)
    return shape


def _documented_demo_run() -> list[str]:
    """docs/transparent.md's transcript of `scripts/netlab --demo`."""
    text = (netlab.REPO_ROOT / "docs" / "transparent.md").read_text()
    block = re.search(r"```\n(setup: apt packages.*?\nnetlab: stopped\n)```", text, re.S)
    assert block, "docs/transparent.md: the scripts/netlab --demo transcript is missing"
    return block.group(1).splitlines()


def _namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.split()}


def _full(lab: NetLab) -> bool:
    return lab.transparent == "full"


def _nat_rules(lab: NetLab) -> str:
    """The legacy rules of the lab's mode (nat for REDIRECT, mangle for TPROXY), counters 0."""
    text = ""
    table = "mangle" if _full(lab) else "nat"
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text += nslab.run_in(lab.gateway, [tool, "-t", table], check=True).stdout
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return re.sub(r"\[\d+:\d+\]", "[0:0]", text)


def _policy_routing(lab: NetLab) -> str:
    text = ""
    for family in ("-4", "-6"):
        for what in (["rule"], ["route", "show", "table", str(lab.proxy_port)]):
            result = nslab.run_in(lab.gateway, ["ip", family, *what])
            text += result.stdout
    return text


@pytest.fixture(scope="module", params=["on", "full"], ids=["redirect", "tproxy"])
def lab(request):
    with NetLab(transparent=request.param) as running:
        yield running


def _sender_seen(lab: NetLab, family: int) -> str:
    """Whom the mail server sees: the gateway (REDIRECT) or the client itself (TPROXY)."""
    return CLIENT[family] if _full(lab) else GATEWAY_OUT[family]


@pytest.fixture
def spool_checked(lab):
    """After the test: the daemon left no temporary files in its spool."""
    yield
    time.sleep(0.1)
    assert sorted(os.listdir(lab.gateway_dir / "spool")) == []


# -- through the proxy ---------------------------------------------------------------------


@needs_lab
@DESTINATIONS
@pytest.mark.usefixtures("spool_checked")
def test_clean_mail_to_the_servers_address_is_scanned_and_delivered(lab, family, destination):
    mark = lab.log_mark()
    subject = _subject(f"clean IPv{family}")
    sent = lab.send(SERVER[family], subject=subject)
    assert sent.status == 0, sent.transcript
    assert PROXY_GREETING in sent.transcript  # the client dialled the server, got the proxy
    assert sent.reply == "250 2.0.0 OK queued as lab"  # the server's own reply, relayed
    [message] = lab.received_with(subject)
    assert message.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
    assert message.mail_from == "alice@example.com"
    assert message.rcpt_tos == ["bob@example.com"]
    assert message.peer[0] == _sender_seen(lab, family)  # full: the client's own address
    assert b"Hello through the gateway." in message.original_content
    log = lab.wait_log(r"status=CLEAN", since=mark)
    assert f"accepted connection from: {CLIENT[family]}\n" in log
    assert f"original destination: {destination}\n" in log
    assert log.count("original destination:") == 1


@needs_lab
@DESTINATIONS
@pytest.mark.usefixtures("spool_checked")
def test_eicar_is_bounced_and_never_reaches_the_server(lab, family, destination):
    mark = lab.log_mark()
    before = lab.received()
    subject = _subject(f"EICAR IPv{family}")
    sent = lab.send(SERVER[family], eicar=True, subject=subject)
    assert sent.status == netlab.SWAKS_REFUSED_AFTER_DATA, sent.transcript
    assert sent.reply == BOUNCE_REPLY
    assert PROXY_GREETING in sent.transcript
    log = lab.wait_log(r"status=VIRUS:Eicar-Test-Signature", since=mark)
    assert f"original destination: {destination}\n" in log
    time.sleep(0.2)  # anything wrongly forwarded would have been recorded by now
    after = lab.received()
    assert len(after) == len(before), [m.header("Subject") for m in after[len(before):]]
    for message in after:
        assert message.header("Subject") != subject
        assert EICAR not in message.original_content
        assert EICAR_BASE64 not in message.original_content


@needs_lab
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_a_connection_straight_to_the_proxy_port_is_refused_as_a_loop(lab, family):
    """Not redirected, so no original destination but the proxy itself: 421 4.4.6."""
    mark = lab.log_mark()
    proxy = netlab.GATEWAY_IN_V4 if family == 4 else netlab.GATEWAY_IN_V6
    sent = lab.send(proxy, port=lab.proxy_port, subject=_subject("to the proxy port"))
    assert sent.reply.startswith("421 4.4.6 "), sent.transcript
    assert "loop detected in transparent proxying" in lab.wait_log("loop detected", since=mark)


@needs_lab
def test_provisioning_again_changes_nothing(lab):
    rules = _nat_rules(lab)
    pid = lab.daemon_pid()
    assert pid is not None
    again = lab.gateway_up()
    assert "clamsmtpd already running with this config" in again.stdout
    assert lab.daemon_pid() == pid
    assert _nat_rules(lab) == rules
    if _full(lab):
        assert ("-A CLAMSMTP-10025 -i g0 -p tcp -m tcp --dport 25 -j TPROXY --on-port 10025 "
                "--on-ip 0.0.0.0 --tproxy-mark 0x2729/0xffff") in rules
        routing = _policy_routing(lab)
        assert routing.count("from all fwmark 0x2729/0xffff lookup 10025") == 2  # v4 and v6
        assert routing.count("local default dev lo") == 2
    else:
        assert ("-A CLAMSMTP-10025 -i g0 -p tcp -m tcp --dport 25 -j REDIRECT --to-ports 10025"
                in rules)
    for ns, script, workdir in ((lab.server, "mailserver.sh", lab.mail_dir),
                                (lab.gateway, "clamd.sh", lab.clamd_dir)):
        result = lab.provision(ns, script, "up", "--workdir", str(workdir))
        assert "already running" in result.stdout
    subject = _subject("after provisioning again")
    assert lab.send(netlab.SERVER_V4, subject=subject).status == 0
    [message] = lab.received_with(subject)
    assert message.header("X-Virus-Scanned") is not None


@needs_lab
def test_after_netsetup_disable_mail_goes_straight_to_the_server(lab):
    disabled = lab.netsetup("disable", "--proxy-port", str(lab.proxy_port))
    assert disabled.returncode == 0, disabled.stdout + disabled.stderr
    assert "removed: our rules for proxy port 10025 (IPv4, IPv6)" in disabled.stdout
    try:
        mark = lab.log_mark()
        for family in (4, 6):
            subject = _subject(f"direct IPv{family}")
            sent = lab.send(SERVER[family], subject=subject)
            assert sent.status == 0, sent.transcript
            assert PROXY_GREETING not in sent.transcript
            assert "<-  220 mail.test" in sent.transcript  # the server's own banner
            [message] = lab.received_with(subject)
            assert message.header("X-Virus-Scanned") is None
            assert message.peer[0] == CLIENT[family]  # routed by the gateway, not proxied
        time.sleep(0.2)
        assert lab.daemon_log(mark) == ""  # the daemon never saw these connections
    finally:
        lab.gateway_up()  # provisioning again puts the rules back
    subject = _subject("scanned again")
    assert lab.send(netlab.SERVER_V6, subject=subject).status == 0
    [message] = lab.received_with(subject)
    assert message.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"


@needs_lab
def test_the_nft_backend_carries_the_mail_as_well(lab):
    """The same mail through the nft backend's rules (tproxy: its mangle-priority chain, socket
    match and `tproxy to`, with the same policy routing); then back to iptables."""
    if not (shutil.which("nft") or os.access("/usr/sbin/nft", os.X_OK)):
        pytest.skip("no nft command (Debian package nftables)")
    port = str(lab.proxy_port)
    assert lab.netsetup("disable", "--proxy-port", port).returncode == 0
    try:
        lab.gateway_up("--", "--backend", "nft")
        listed = nslab.run_in(lab.gateway, ["nft", "list", "table", "inet", f"clamsmtp-{port}"],
                              check=True).stdout
        assert ("tproxy to :10025" if _full(lab) else "redirect to :10025") in listed, listed
        for family in (4, 6):
            subject = _subject(f"nft IPv{family}")
            sent = lab.send(SERVER[family], subject=subject)
            assert sent.status == 0, sent.transcript
            assert PROXY_GREETING in sent.transcript
            [message] = lab.received_with(subject)
            assert message.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
            assert message.peer[0] == _sender_seen(lab, family)
        assert lab.send(netlab.SERVER_V4, eicar=True).reply == BOUNCE_REPLY
    finally:
        lab.netsetup("disable", "--proxy-port", port)
        lab.gateway_up()
    assert "clamsmtp" not in nslab.run_in(lab.gateway, ["nft", "list", "ruleset"]).stdout


@needs_lab
def test_local_mail_of_the_gateway_is_scanned_and_the_daemon_exempt(lab):
    """netsetup --local: the gateway's own mail goes through the daemon too; the daemon's
    connection to the server is exempt by its user (uid owner match), so it does not loop.
    With TPROXY (PREROUTING only) that cannot work, and netsetup says so, changing nothing."""
    if _full(lab):
        rules = _nat_rules(lab)
        with pytest.raises(netlab.LabError, match="exited 2") as failed:
            lab.gateway_up("--", "--local", "--user", lab.user or "root")
        assert "--local cannot work with --mode tproxy" in str(failed.value)
        assert _nat_rules(lab) == rules
        return
    if not lab.user:
        pytest.skip(f"needs the {netlab.DAEMON_USER} user (Debian package clamsmtp)")
    try:
        lab.gateway_up("--", "--local", "--user", lab.user)
        rules = _nat_rules(lab)
        uid = pwd.getpwnam(lab.user).pw_uid
        assert f"-A CLAMSMTP-10025-LOCAL -m owner --uid-owner {uid} -j RETURN" in rules
        mark = lab.log_mark()
        subject = _subject("from the gateway itself")
        sent = lab.send(netlab.SERVER_V4, subject=subject, ns=lab.gateway)
        assert sent.status == 0, sent.transcript
        assert PROXY_GREETING in sent.transcript
        [message] = lab.received_with(subject)
        assert message.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
        log = lab.wait_log(r"status=CLEAN", since=mark)
        assert log.count("original destination: 198.51.100.25:25\n") == 1  # no loop
    finally:
        lab.gateway_up()
    assert "CLAMSMTP-10025-LOCAL" not in _nat_rules(lab)


@needs_lab
def test_gateway_script_refuses_local_when_the_daemon_is_not_the_exempt_user(lab):
    result = lab.provision(lab.gateway, "gateway.sh", "up", "--lan-if", "g0", "--user", "",
                           "--workdir", str(lab.gateway_dir), "--", "--local",
                           "--user", "nobody", check=False)
    assert result.returncode != 0
    assert "its own connections would be redirected back to it" in result.stderr
    assert lab.daemon_running()


@needs_lab
def test_status_shows_the_rules_with_counters_and_the_policy_routing(lab):
    subject = _subject("counted")
    assert lab.send(netlab.SERVER_V4, subject=subject).status == 0
    status = lab.status()
    if _full(lab):
        assert "IPv4 (iptables-legacy, table mangle): installed\n" in status, status
        assert "policy rule IPv4: present: ip -4 rule fwmark 0x2729/0xffff lookup 10025" in status
        assert "policy route IPv6: present: ip -6 route local ::/0 dev lo table 10025" in status
        tproxy = re.search(r"^ +(\d+) +\d+ +-A CLAMSMTP-10025 -i g0 .* -j TPROXY", status, re.M)
        assert tproxy and int(tproxy.group(1)) >= 1, status  # the SYN that was intercepted
        marked = re.search(r"^ +(\d+) +\d+ +-A CLAMSMTP-10025 .*--set-xmark", status, re.M)
        assert marked and int(marked.group(1)) >= 2, status  # the rest of both connections
    else:
        assert "IPv4 (iptables-legacy, table nat): installed\n" in status, status
        assert "policy rule" not in status


# -- Workers: 2 through the kernel ------------------------------------------------------------


@pytest.fixture(scope="module", params=["on", "full"], ids=["redirect", "tproxy"])
def lab_two_workers(request):
    """The same gateway with `Workers: 2`: two processes accept on the one redirected socket."""
    with NetLab(transparent=request.param, workers=2) as running:
        yield running


ACCEPTED = re.compile(r"^clamsmtpd: ([0-9A-F]{6}): accepted connection from: (\S+)$", re.M)


@needs_lab
@DESTINATIONS
def test_two_workers_each_read_the_original_destination(lab_two_workers, family, destination):
    """Clean mail until both workers took connections (a worker's ids have its index's
    parity): each read SO_ORIGINAL_DST (TPROXY: the local address) on the connection it
    accepted, relayed to the server's address (full: from the client's own), and the message
    arrived once with its scan header; an EICAR through either worker never arrives."""
    lab = lab_two_workers
    lab.wait_log(r"2 workers serving")
    mark = lab.log_mark()
    subjects: list[str] = []
    ids: list[str] = []
    for _ in range(16):
        subjects.append(_subject(f"two workers IPv{family}"))
        sent = lab.send(SERVER[family], subject=subjects[-1])
        assert sent.status == 0, sent.transcript
        assert sent.reply == "250 2.0.0 OK queued as lab"
        ids = [conn for conn, peer in ACCEPTED.findall(lab.daemon_log(mark))
               if peer == CLIENT[family]]
        if len(subjects) >= 2 and {int(conn, 16) % 2 for conn in ids} == {0, 1}:
            break
    assert {int(conn, 16) % 2 for conn in ids} == {0, 1}, f"one worker took all: {ids}"
    log = lab.wait_log(r"status=CLEAN", since=mark, count=len(subjects))
    for conn in ids:  # each worker read its own connection's original destination
        assert f"{conn}: original destination: {destination}\n" in log, log
    for subject in subjects:
        [message] = lab.received_with(subject)
        assert message.header("X-Virus-Scanned") == "ClamAV using ClamSMTP"
        assert message.peer[0] == _sender_seen(lab, family)
    before = len(lab.received())
    for _ in range(2):  # (either worker, or the same twice)
        sent = lab.send(SERVER[family], eicar=True, subject=_subject("two workers EICAR"))
        assert sent.status == netlab.SWAKS_REFUSED_AFTER_DATA, sent.transcript
        assert sent.reply == BOUNCE_REPLY
    lab.wait_log(r"status=VIRUS:Eicar-Test-Signature", since=mark, count=2)
    time.sleep(0.2)
    assert len(lab.received()) == before
    assert sorted(os.listdir(lab.gateway_dir / "spool")) == []


# -- the lab command and its teardown ------------------------------------------------------


@needs_lab
def test_netlab_demo_full_shows_the_clients_own_address_at_the_server():
    """--full: TPROXY; the server's peer is the client, EICAR refused, nothing left after."""
    result = subprocess.run(
        [sys.executable, "-m", "lab.netlab", "--demo", "--full"],
        capture_output=True, text=True, timeout=120, cwd=netlab.REPO_ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "demo: PASSED" in result.stdout
    assert output.count("demo: ok ") == 9, output
    for line in ("peer=192.0.2.10 size=", "peer=2001:db8:1::10 size=",
                 "from the client's own address (192.0.2.10)",
                 "from the client's own address (2001:db8:1::10)",
                 f"EICAR message: {BOUNCE_REPLY} (swaks exit 26)",
                 "TransparentProxy: full: kept CAP_NET_ADMIN, and no other capability",
                 "IPv6 (ip6tables-legacy, table mangle): installed",
                 "policy route IPv6: present: ip -6 route local ::/0 dev lo table 10025",
                 "ip -6 rule del fwmark 0x2729/0xffff lookup 10025 priority 9025",
                 "ip -4 route del local 0.0.0.0/0 dev lo table 10025"):
        assert line in output, line
    assert "peer=198.51.100.1 " not in output and "peer=2001:db8:2::1 " not in output
    names = re.search(r"namespaces: client (\S+), gateway (\S+), mail server (\S+)", output)
    workdir = Path(re.search(r"\(work directory (\S+)\)", output).group(1))
    assert not set(names.groups()) & _namespaces()
    assert not workdir.exists()
    assert _processes_using(workdir) == []


@needs_lab
def test_netlab_demo_runs_green_and_leaves_nothing_behind():
    result = subprocess.run(
        [sys.executable, "-m", "lab.netlab", "--demo"],
        capture_output=True, text=True, timeout=120, cwd=netlab.REPO_ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "demo: PASSED" in result.stdout
    # 2 families x (clean delivered, clean over TLS, EICAR refused), 2 destinations, TLS logged
    assert output.count("demo: ok ") == 9, output
    for line in ("clean message: 250 2.0.0 OK queued as lab (swaks exit 0)",
                 f"EICAR message: {BOUNCE_REPLY} (swaks exit 26)",
                 "original destination: 198.51.100.25:25",
                 "original destination: [2001:db8:2::25]:25",
                 "X-Virus-Scanned='ClamAV using ClamSMTP' tls=TLSv1.",
                 "subject='netlab demo: clean (IPv6)'",
                 "IPv6 (ip6tables-legacy, table nat): installed"):
        assert line in output
    # docs/transparent.md shows a run "as it printed": the same lines, up to the numbers
    documented, printed = _demo_shape(_documented_demo_run()), _demo_shape(output.splitlines())
    assert (sorted(documented - printed), sorted(printed - documented)) == ([], []), (
        "docs/transparent.md's netlab --demo transcript (left) differs from a run (right)")
    names = re.search(r"namespaces: client (\S+), gateway (\S+), mail server (\S+)", output)
    workdir = Path(re.search(r"\(work directory (\S+)\)", output).group(1))
    assert not set(names.groups()) & _namespaces()
    assert not workdir.exists()
    assert _processes_using(workdir) == []


class _FailingLab(NetLab):
    """Fails while provisioning the gateway, after clamd and the mail server started and
    with a stray process left in the gateway namespace."""

    stray: subprocess.Popen | None = None

    def gateway_up(self):
        self.stray = nslab.popen_in(self.gateway, ["sleep", "600"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        self.action = "no-such-action"
        return super().gateway_up()


@needs_lab
def test_a_failed_start_removes_namespaces_and_processes():
    lines: list[str] = []
    lab = _FailingLab(out=lines.append)
    with pytest.raises(netlab.LabError, match="--action: bounce, drop or pass"):
        lab.start()
    names = re.search(r"namespaces: client (\S+), gateway (\S+), mail server (\S+)",
                      "\n".join(lines)).groups()
    assert any("clamd running" in line for line in lines)
    assert any("mail server running" in line for line in lines)
    assert not set(names) & _namespaces()
    assert lab.stray.wait(timeout=5) == -signal.SIGTERM
    assert not lab.workdir.exists()
    assert _processes_using(lab.workdir) == []
    lab.stop()  # a second stop does nothing


class _Lines:
    """Lines of a pipe, read by a thread, waited for with a timeout."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, *needles: str, timeout: float = 60.0) -> str:
        with self._changed:
            self._changed.wait_for(lambda: all(n in "".join(self.lines) for n in needles),
                                   timeout)
        text = self.text
        missing = [n for n in needles if n not in text]
        assert not missing, f"{missing} not in the output after {timeout} s:\n{text}"
        return text

    def join(self, timeout: float) -> str:
        self._thread.join(timeout)
        return self.text


@needs_lab
def test_netlab_stays_up_until_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.netlab"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=netlab.REPO_ROOT,
    )
    try:
        output = _Lines(proc.stdout)
        text = output.wait_for("Stop with Ctrl-C")
        client = re.search(r"ip netns exec (\S+) swaks --server 198\.51\.100\.25", text)
        assert client, text
        sent = subprocess.run(
            ["ip", "netns", "exec", client.group(1), "swaks", "--server", netlab.SERVER_V4,
             "--helo", "client.test", "--to", "bob@example.com"],
            capture_output=True, text=True, timeout=60,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # it follows the daemon's log and the mail server's
        output.wait_for("original destination: 198.51.100.25:25",
                        "X-Virus-Scanned='ClamAV using ClamSMTP'", timeout=10)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        text = output.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0, text
    assert "netlab: stopping (SIGINT)" in text
    assert "netlab: stopped" in text
    names = re.search(r"namespaces: client (\S+), gateway (\S+), mail server (\S+)", text)
    workdir = Path(re.search(r"\(work directory (\S+)\)", text).group(1))
    assert not set(names.groups()) & _namespaces()
    assert _processes_using(workdir) == []


def test_netlab_without_root_says_so(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netlab.main(["--demo"]) == 3
    assert "needs root" in capsys.readouterr().err
