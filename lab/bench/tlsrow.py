"""The TLS row (`--tls`): what TLS on both legs costs ours, against the same load in clear.

smtp-source and smtp-sink speak no TLS, so this comparison has a client and a next hop of its
own, the same for both rows: an asyncio client (one connection per message, as MTAs deliver;
with STARTTLS for the TLS row) and the lab's recording next hop (aiosmtpd, STARTTLS offered for
the TLS row, OutTLS: may takes it). The proxy is ours with ClientTLS: on and throwaway
certificates. What differs between the rows is TLS only: two handshakes per message (client
and next hop, ECDSA P-256, TLS 1.3) and the encryption of every byte twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import PrivateClamd, daemon_argv, free_tcp_port, stop_process
from ..certs import make_ca, make_certificate
from ..sink import RecordingNextHop
from .lab import START_TIMEOUT, wait_accepting
from .procstat import cpu_seconds
from .tools import CLAMD_BINARY
from .workload import HOST, KB, RECIPIENT, SENDER, human_size, message_body, message_header

#: (size, messages, quick messages): the issue's 1 KB and 100 KB
LOADS = ((1 * KB, 400, 60), (100 * KB, 150, 30))
SESSIONS = 8


@dataclass
class TLSRun:
    size: int
    tls: bool
    messages: int
    accepted: int = 0
    seconds: float = 0.0
    proxy_cpu: float | None = None
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float | None:
        if self.proxy_cpu is None or not self.accepted:
            return None
        return self.proxy_cpu / self.accepted * 1000


async def _one_message(port: int, body: bytes, context: ssl.SSLContext | None,
                       timeout: float) -> None:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            async def reply() -> bytes:
                while True:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("connection closed")
                    if line[3:4] != b"-":
                        return line

            async def command(line: bytes, expect: bytes) -> None:
                writer.write(line + b"\r\n")
                got = await reply()
                if not got.startswith(expect):
                    raise ConnectionError(f"{line[:10]!r}: {got[:60]!r}")

            if not (await reply()).startswith(b"220"):
                raise ConnectionError("no greeting")
            await command(b"EHLO bench.example.com", b"250")
            if context is not None:
                await command(b"STARTTLS", b"220")
                await writer.start_tls(context)
                await command(b"EHLO bench.example.com", b"250")
            await command(f"MAIL FROM:<{SENDER}>".encode(), b"250")
            await command(f"RCPT TO:<{RECIPIENT}>".encode(), b"250")
            await command(b"DATA", b"354")
            writer.write(message_header() + body + b".\r\n")
            if not (await reply()).startswith(b"250"):
                raise ConnectionError("message refused")
            writer.write(b"QUIT\r\n")
            await reply()
        finally:
            writer.close()
            # (a TLS close needs loop turns: without them the socket outlives asyncio.run and
            # its ResourceWarning fails whichever test the garbage collector runs in)
            with contextlib.suppress(OSError, ConnectionError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(5):
                    await writer.wait_closed()


async def _load(port: int, size: int, messages: int, context: ssl.SSLContext | None,
                run: TLSRun) -> None:
    body = message_body(size)
    todo = iter(range(messages))

    async def worker() -> None:
        for _ in todo:
            try:
                await _one_message(port, body, context, 30.0)
                run.accepted += 1
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as error:
                key = f"{type(error).__name__}: {error}"[:80]
                run.failures[key] = run.failures.get(key, 0) + 1

    await asyncio.gather(*(worker() for _ in range(SESSIONS)))


def run_tls_comparison(workdir: Path, *, quick: bool = False, say=print) -> list[TLSRun]:
    """For 1 KB and 100 KB: the load in clear, then with TLS on both legs; the runs."""
    certs_dir = workdir / "tls"
    ca = make_ca(certs_dir, "clamsmtp bench CA")
    hop_cert = make_certificate(certs_dir, "nexthop.test", ca, alt_names=(HOST,))
    proxy_cert = make_certificate(certs_dir, "proxy.test", ca, alt_names=(HOST,))
    hop_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    hop_context.load_cert_chain(hop_cert.cert, hop_cert.key)
    client_context = ssl.create_default_context(cafile=str(ca.cert))
    runs: list[TLSRun] = []
    with PrivateClamd(workdir / "clamd", clamd_binary=CLAMD_BINARY) as clamd:
        for size, full, few in LOADS:
            for tls in (False, True):
                messages = few if quick else full
                run = TLSRun(size, tls, messages)
                with RecordingNextHop(HOST, 0, tls_context=hop_context if tls else None) as hop:
                    proc = _start_proxy(workdir, clamd.socket_path, hop.port,
                                        proxy_cert if tls else None)
                    try:
                        port = proc.port  # type: ignore[attr-defined]
                        warm = TLSRun(size, tls, 4)
                        asyncio.run(_load(port, KB, 4, client_context if tls else None, warm))
                        cpu0 = cpu_seconds(proc.pid)
                        start = time.perf_counter()
                        asyncio.run(_load(port, size, messages,
                                          client_context if tls else None, run))
                        run.seconds = time.perf_counter() - start
                        cpu1 = cpu_seconds(proc.pid)
                        if None not in (cpu0, cpu1):
                            run.proxy_cpu = cpu1 - cpu0
                        if tls and hop.messages and hop.messages[-1].tls is None:
                            run.failures["the next hop's leg was not TLS"] = 1
                    finally:
                        stop_process(proc)
                runs.append(run)
                say("bench: tls  " + row(run))
    return runs


def _start_proxy(workdir: Path, clamd: str, hop_port: int, cert) -> subprocess.Popen:
    port = free_tcp_port()
    spool = workdir / "spool-tls"
    spool.mkdir(mode=0o700, exist_ok=True)
    conf = workdir / "tls.conf"
    lines = [f"Listen: {HOST}:{port}", f"OutAddress: {HOST}:{hop_port}",
             f"ClamAddress: {clamd}", f"TempDirectory: {spool}", "MaxConnections: 256",
             "TimeOut: 120", "Action: drop", "OutTLS: may"]
    if cert is not None:
        lines += ["ClientTLS: on", f"TLSCertificate: {cert.cert}", f"TLSKey: {cert.key}"]
    conf.write_text("\n".join(lines) + "\n")
    log = open(workdir / "tls-proxy.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(daemon_argv(str(conf), debug_level=0), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_accepting(port, START_TIMEOUT, proc, "ours (TLS row)")
    except BaseException:
        stop_process(proc)
        raise
    proc.port = port  # type: ignore[attr-defined]
    return proc


def row(run: TLSRun) -> str:
    legs = "TLS/TLS" if run.tls else "clear"
    cpu = f"{run.cpu_ms:6.2f}" if run.cpu_ms is not None else "     ?"
    text = (f"{human_size(run.size):>7} x{SESSIONS}  {legs:<8} {run.rate:8.1f} msg/s  "
            f"cpu {cpu} ms/msg  {run.accepted}/{run.messages} accepted")
    if run.failures:
        text += f"  failures: {run.failures}"
    return text


def table(runs: list[TLSRun]) -> str:
    """The rows, and per size what TLS cost: the rate ratio and the CPU added per message."""
    lines = ["TLS on both legs against clear (ours; asyncio client, one connection per "
             "message; aiosmtpd next hop)", *("  " + row(r) for r in runs)]
    for size in sorted({r.size for r in runs}):
        clear = next((r for r in runs if r.size == size and not r.tls), None)
        tls = next((r for r in runs if r.size == size and r.tls), None)
        if clear and tls and clear.rate and clear.cpu_ms is not None and tls.cpu_ms is not None:
            lines.append(f"  {human_size(size)}: TLS rate {tls.rate / clear.rate * 100:.0f}% "
                         f"of clear, +{tls.cpu_ms - clear.cpu_ms:.2f} ms proxy CPU per message")
    return "\n".join(lines)


def ok(runs: list[TLSRun]) -> bool:
    return bool(runs) and all(r.accepted == r.messages and not r.failures for r in runs)
