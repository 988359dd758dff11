"""Run a `RecordingNextHop` as a mail server that keeps every message it accepts as files.

    python -m lab.sinkrun --record-dir DIR [--listen ADDR]... [--pidfile FILE]
                                    [--reply KEY=REPLY]... [--hostname NAME]

ADDR is `PORT`, `[::]:PORT` or `*:PORT` (every address, IPv4 and IPv6), `0.0.0.0:PORT` (IPv4
only), `HOST:PORT` or `[V6]:PORT`; default `25`. Each accepted message becomes two files in DIR:
`NNNNNN.eml` (the message exactly as received, CRLF line ends) and `NNNNNN.json` (the envelope:
mail_from, rcpt_tos, peer, helo, the reply, the time), written atomically, .eml first, so a
reader that lists the .json files sees complete messages only. `read_records(DIR)` loads them
back as `Received` objects. One line per message goes to stdout. `--reply` scripts answers as
`RecordingNextHop(replies=...)` does (`--reply DATA="554 5.7.1 no"`).

The pid file is written once every listener is up; SIGTERM or SIGINT stops the server and
removes it. vagrant/provision/mailserver.sh starts it in the background.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import ssl
import sys
import threading
import time
from pathlib import Path

from .clamdrun import run_until_stopped
from .sink import Received, RecordingNextHop

PROG = "sinkrun"
ANY = ""  # aiosmtpd/asyncio: every address of both families


def parse_listen(text: str) -> tuple[str, int]:
    """`PORT` | `[::]:PORT` | `*:PORT` | `HOST:PORT` | `[V6]:PORT` -> (host, port); host ""
    means every address, IPv4 and IPv6."""
    text = text.strip()
    host, port_text = ANY, text
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise argparse.ArgumentTypeError(f"invalid listen address {text!r} ([V6]:PORT)")
        host, port_text = inner, rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if host in ("*", "::"):
        host = ANY
    if host and host != ANY:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid listen address {text!r}") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port in {text!r}")
    return host, int(port_text)


def _reply(text: str) -> tuple[str, str]:
    key, sep, reply = text.partition("=")
    if not sep or not key or not reply[:3].isdigit():
        raise argparse.ArgumentTypeError(f"--reply {text!r}: expected KEY=\"NNN text\"")
    return key, reply


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m lab.{PROG}",
        description="An SMTP server that stores each message it accepts as files.",
    )
    parser.add_argument("--listen", action="append", type=parse_listen, default=[],
                        metavar="ADDR", help="where to listen (repeatable; default 25: every "
                        "address, IPv4 and IPv6)")
    parser.add_argument("--record-dir", required=True,
                        help="directory for NNNNNN.eml and NNNNNN.json per accepted message")
    parser.add_argument("--pidfile", help="write this process's pid here once listening")
    parser.add_argument("--reply", action="append", type=_reply, default=[],
                        metavar="KEY=REPLY", help="scripted reply, e.g. DATA='554 5.7.1 no' "
                        "or RCPT:bad@example.com='550 5.1.1 no such user' (repeatable)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="offer STARTTLS with this PEM certificate (and --tls-key)")
    parser.add_argument("--tls-key", metavar="FILE", help="the PEM key of --tls-cert")
    parser.add_argument("--hostname", default="mail.test",
                        help="name in the greeting and EHLO reply (default %(default)s)")
    args = parser.parse_args(argv)
    args.listen = args.listen or [(ANY, 25)]
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    return args


# -- the record directory -------------------------------------------------------------------


class RecordDir:
    """Writes accepted messages as NNNNNN.eml + NNNNNN.json (thread-safe)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        existing = [int(p.stem) for p in self.path.glob("*.json") if p.stem.isdigit()]
        self._count = max(existing, default=0)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / name)

    def store(self, received: Received, listener: str) -> str:
        with self._lock:
            self._count += 1
            stem = f"{self._count:06d}"
            envelope = dataclasses.asdict(received)
            del envelope["original_content"]
            envelope.update(peer=list(received.peer), size=received.size, listener=listener,
                            file=f"{stem}.eml")
            self._write(f"{stem}.eml", received.original_content)
            self._write(f"{stem}.json", (json.dumps(envelope, indent=2) + "\n").encode())
            return stem


def read_records(path: str | os.PathLike) -> list[Received]:
    """The messages a sinkrun accepted, in order (empty if the directory does not exist)."""
    path = Path(path)
    records = []
    for meta in sorted(path.glob("[0-9]*.json")):
        envelope = json.loads(meta.read_text())
        content = (path / envelope["file"]).read_bytes()
        fields = {f.name for f in dataclasses.fields(Received)} - {"original_content"}
        values = {k: v for k, v in envelope.items() if k in fields}
        values["peer"] = tuple(values.get("peer") or ())
        records.append(Received(original_content=content, **values))
    return records


def describe(received: Received) -> str:
    scanned = received.header("X-Virus-Scanned")
    peer = received.peer[0] if received.peer else "?"
    return (f"from=<{received.mail_from}> to={','.join('<' + r + '>' for r in received.rcpt_tos)} "
            f"peer={peer} size={received.size} "
            f"X-Virus-Scanned={scanned!r} tls={received.tls or 'none'} "
            f"subject={received.header('Subject')!r}")


# -- main -----------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


def _show(host: str, port: int) -> str:
    if host == ANY:
        return f"*:{port} (IPv4 and IPv6)"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = RecordDir(args.record_dir)
    servers: list[RecordingNextHop] = []
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)

    def start() -> int:
        for host, port in args.listen:
            where = _show(host, port)

            def keep(received: Received, where: str = where) -> None:
                stem = records.store(received, where)
                say(f"received {stem}: {describe(received)}")

            server = RecordingNextHop(host, port, replies=dict(args.reply),
                                      hostname=args.hostname, on_message=keep,
                                      tls_context=context)
            try:
                server.start()
            except OSError as error:
                say(f"error: cannot listen on {where}: {error.strerror or error}")
                return 1
            servers.append(server)
            say(f"listening on {where}, recording into {records.path}")
        return 0

    def serve() -> int:
        while True:
            time.sleep(3600)

    def stop() -> None:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()

    return run_until_stopped(say, args.pidfile, start, serve, stop)


if __name__ == "__main__":
    sys.exit(main())
