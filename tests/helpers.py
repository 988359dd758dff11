"""Small shared test helpers: clients, raw SMTP dialogues, messages, ports.

Import them as `from helpers import ...` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import email.policy
import io
import os
import re
import smtplib
import socket
import time
import zipfile
from collections.abc import Iterable, Sequence
from email.message import EmailMessage

import pytest

from appliance.lab import EICAR, free_tcp_port

__all__ = [
    "EICAR",
    "free_port",
    "next_hop_options",
    "make_message",
    "read_reply",
    "requires_root",
    "send_raw",
    "smtp_client",
    "wait_until",
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


def send_raw(
    host: str,
    port: int,
    lines: Iterable[str | bytes | tuple[str | bytes, int]],
    timeout: float = 10.0,
) -> list[str]:
    """Talk SMTP byte by byte: read the greeting, then per item send it and read one reply.

    An item is str (CRLF added if missing), bytes (sent exactly as given), or (data, n) to read
    n replies after it (0: none, e.g. for message text before the final dot; 3: three pipelined
    commands). Returns every reply read, the greeting first; stops early if the peer closes.
    """
    replies: list[str] = []
    buffer = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        greeting = read_reply(sock, buffer)
        if greeting is None:
            return replies
        replies.append(greeting)
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
        if key in ("ehlo_extensions", "greeting"):
            options[key] = value
        else:
            options["replies"][key] = value
    return options
