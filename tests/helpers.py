"""Small shared test helpers: clients, raw SMTP dialogues, messages, ports.

Import them as `from helpers import ...` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import email.policy
import io
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest

from lab import EICAR, daemon_argv, free_tcp_port

__all__ = [
    "EICAR",
    "free_port",
    "next_hop_options",
    "proxy_directives",
    "make_message",
    "raw_session_in_data",
    "read_reply",
    "reload_with",
    "requires_root",
    "send_raw",
    "smtp_client",
    "start_daemon",
    "wait_accepting",
    "wait_until",
    "write_appliance_config",
    "zip_bytes",
]

requires_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root (network namespaces, iptables, binding as another user); run as root",
)

CLIENT_NAME = "client.test"  # what smtplib says in EHLO (saves a slow getfqdn() lookup)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_tcp_port("127.0.0.1")


def smtp_client(appliance, timeout: float = 30.0) -> smtplib.SMTP:
    """An smtplib client connected to the appliance (use it in a `with` block)."""
    return smtplib.SMTP(appliance.host, appliance.port, local_hostname=CLIENT_NAME,
                        timeout=timeout)


_FINAL_LINE = re.compile(rb"^\d{3}(?: |\r?\n|$)")


def read_reply(sock: socket.socket, buffer: bytearray) -> str | None:
    """Read one complete (possibly multi-line) SMTP reply; None if the peer closed first.

    `buffer` keeps bytes that arrived after the reply, for the next call. Lines of a
    multi-line reply are joined with "\\n", without their CRLF.
    """
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            chunk = sock.recv(65536)
            if not chunk:
                if lines or buffer:
                    lines.append(bytes(buffer))
                    buffer.clear()
                    return b"\n".join(lines).decode("utf-8", "replace")
                return None
            buffer += chunk
            continue
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        lines.append(line.rstrip(b"\r\n"))
        if _FINAL_LINE.match(line):
            return b"\n".join(lines).decode("utf-8", "replace")


def starttls(sock: socket.socket, buffer: bytearray) -> ssl.SSLSocket:
    """After the greeting: EHLO and STARTTLS in clear, then the TLS handshake (the proxy's
    certificate is not checked here); the TLS socket to go on with. `buffer` must be empty."""
    sock.sendall(b"EHLO client.test\r\n")
    assert (read_reply(sock, buffer) or "").startswith("250"), "EHLO before STARTTLS"
    sock.sendall(b"STARTTLS\r\n")
    reply = read_reply(sock, buffer)
    assert reply is not None and reply.startswith("220"), f"STARTTLS: {reply}"
    assert not buffer
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock)


def send_raw(
    host: str,
    port: int,
    lines: Iterable[str | bytes | tuple[str | bytes, int]],
    timeout: float = 10.0,
    *,
    tls: bool = False,
) -> list[str]:
    """Talk SMTP byte by byte: read the greeting, then per item send it and read one reply.

    An item is str (CRLF added if missing), bytes (sent exactly as given), or (data, n) to read
    n replies after it (0: none, e.g. for message text before the final dot; 3: three pipelined
    commands). Returns every reply read, the greeting first; stops early if the peer closes.
    `tls`: STARTTLS right after the greeting (the appliance needs ClientTLS: on).
    """
    replies: list[str] = []
    buffer = bytearray()
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        greeting = read_reply(sock, buffer)
        if greeting is None:
            return replies
        replies.append(greeting)
        if tls:  # (the EHLO and STARTTLS replies are not in the list)
            sock = stack.enter_context(starttls(sock, buffer))
        for item in lines:
            data, count = item if isinstance(item, tuple) else (item, 1)
            if isinstance(data, str):
                data = (data if data.endswith("\r\n") else data + "\r\n").encode("utf-8")
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                return replies
            for _ in range(count):
                try:
                    reply = read_reply(sock, buffer)
                except ConnectionResetError:
                    reply = None
                if reply is None:
                    return replies
                replies.append(reply)
    return replies


@contextlib.contextmanager
def raw_session_in_data(
    appliance, timeout: float = 10.0
) -> Iterator[tuple[socket.socket, io.BufferedReader]]:
    """A raw connection to the appliance that has read the greeting and sent HELO, MAIL, RCPT
    and DATA, reading one reply line after each (unchecked): yields the socket, to send message
    text on, and its reader, for the replies after it. Both are closed on exit."""
    with socket.create_connection(appliance.address, timeout=timeout) as sock:
        reader = sock.makefile("rb")
        try:
            reader.readline()
            for command in (b"HELO c\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<c@d>\r\n",
                            b"DATA\r\n"):
                sock.sendall(command)
                reader.readline()
            yield sock, reader
        finally:
            reader.close()  # (a makefile() keeps the socket open past close())


def _directive_value(value) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    return str(value)


def write_appliance_config(path: Path, directives: dict) -> None:
    """Write a clamsmtpd.conf: one `Name: value` line per directive, in order (True and False
    as on and off; a directive whose value is None is left out)."""
    lines = ["# clamsmtpd.conf written by tests/conftest.py"]
    lines += [f"{name}: {_directive_value(value)}" for name, value in directives.items()
              if value is not None]
    path.write_text("\n".join(lines) + "\n")


def proxy_directives(port: int, next_hop, clamd, spool: Path | str, **more) -> dict:
    """The directives that put the daemon on 127.0.0.1:`port` between `next_hop` (anything with
    `host` and `port`) and `clamd` (with `socket_path`), spooling into `spool`; then `more`."""
    return {
        "Listen": f"127.0.0.1:{port}",
        "OutAddress": f"{next_hop.host}:{next_hop.port}",
        "ClamAddress": clamd.socket_path,
        "TempDirectory": spool,
        **more,
    }


def start_daemon(conf: Path, directives: dict, log: Path, *, debug_level: int = 4,
                 reference: bool = False) -> subprocess.Popen:
    """Write `directives` to `conf` and start the daemon on it in the foreground (the C one
    with `reference=True`, see `daemon_argv`): stdin /dev/null, stdout and stderr to `log`.
    Stopping it is the caller's."""
    write_appliance_config(conf, directives)
    with open(log, "wb") as out:
        return subprocess.Popen(
            daemon_argv(str(conf), debug_level=debug_level, reference=reference),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


def make_message(
    subject: str = "test",
    body: str = "Hello.\n",
    attachments: Sequence[tuple[str, bytes]] = (),
    *,
    sender: str = "alice@example.com",
    to: str = "bob@example.com",
) -> EmailMessage:
    """A message with CRLF line ends (bytes(msg) gives the wire form); attachments are
    (filename, data) pairs, sent base64 as application/octet-stream."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{time.time_ns()}@client.test>"
    msg.set_content(body)
    for filename, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream",
                           filename=filename)
    return msg


def zip_bytes(name: str, data: bytes) -> bytes:
    """A zip archive, in memory, holding one file `name` with `data`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buf.getvalue()


def wait_accepting(proc: subprocess.Popen, address: tuple[str, int],
                   log: Callable[[], str], timeout: float = 15.0) -> None:
    """Wait until the daemon `proc` accepts on `address`; fail the test with `log()` (its
    output) if it exits first or does not accept within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited with status {proc.returncode} during start-up; "
                        f"stderr:\n{log()}", pytrace=False)
        try:
            with socket.create_connection(address, timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the daemon did not accept on {address[0]}:{address[1]} within "
                        f"{timeout:.0f} s; stderr:\n{log()}", pytrace=False)
        time.sleep(0.05)


def reload_with(appliance, **directives) -> None:
    """Set `directives` in the running daemon's file (replacing lines of the same name), send
    SIGHUP, and wait until the daemon says it reloaded."""
    text = appliance.conf_path.read_text()
    lines = [ln for ln in text.splitlines() if ln.split(":")[0] not in directives]
    lines += [f"{k}: {v}" for k, v in directives.items()]
    appliance.conf_path.write_text("\n".join(lines) + "\n")
    before = appliance.log().count("configuration reloaded")
    others = appliance.log().count("took the new configuration too")
    appliance.proc.send_signal(signal.SIGHUP)
    # one line per daemon (with Workers, worker 0's); the other workers say it at -d 4 only
    wait_until(lambda: appliance.log().count("configuration reloaded") > before,
               what="the reload to be logged")
    after = others + getattr(appliance, "workers", 1) - 1
    wait_until(lambda: appliance.log().count("took the new configuration too") >= after,
               what="every worker to take the reload")


#: Run a test of the `appliance` fixture with the daemon as one process (as always) and as a
#: parent with two workers (`Workers: 2`); the test takes a `workers` argument.
ONE_AND_TWO_WORKERS = pytest.mark.parametrize("workers", [
    pytest.param(1, id="one-process"),
    pytest.param(2, id="workers-2", marks=pytest.mark.appliance_config(Workers=2)),
])


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something true; return that, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def next_hop_options(request) -> dict:
    """RecordingNextHop keyword arguments from a test's @next_hop_replies(...) marker."""
    options = {"replies": {}}
    marker = request.node.get_closest_marker("next_hop_replies")
    if marker is None:
        return options
    for mapping in marker.args:  # a dict may be given positionally
        options["replies"].update(mapping)
    for key, value in marker.kwargs.items():
        if key in ("ehlo_extensions", "greeting", "tls_context", "auth_users"):
            options[key] = value
        else:
            options["replies"][key] = value
    return options
