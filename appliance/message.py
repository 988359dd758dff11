"""The DATA phase of a relayed session: spool, scan, decide, then forward or refuse.

`DataPhase` is one DATA command, built by the relay with everything it uses: the client's
channel, the next hop, a scanner, the actions, the configuration, the connection's log and the
containment table. It is the one part of the relay that knows about spooling and scanning; the
rest only passes SMTP lines along. Every path ends the transaction at the next hop (forwarded or
RSET), answers the client, and removes the spool file.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from . import metrics
from .actions import VirusActions, VirusEvent, quarantine
from .channel import ClientChannel, ClientGone
from .config import Config, OversizeAction
from .containment import InfectedHosts
from .dotstuff import DataDecoder, Stuffer, stuff
from .header import expand_header
from .maillog import summary
from .replies import (
    REPLY_LOCAL_ERROR,
    REPLY_START_DATA,
    REPLY_TIMEOUT,
    REPLY_TOO_BIG,
)
from .scanner import ERROR, OVERSIZE, ScanResult
from .spool import Spool, SpoolError
from .upstream import Reply, Upstream, UpstreamError
from .verdict import (
    FORWARD,
    STATUS_ALLOWED,
    Policy,
    Verdict,
    decide,
    skip_reason,
    unscanned,
)

DATA_CHUNK = 1 << 18
#: KeepAlives: 0 (the default): nothing to send while the message is received and scanned
_NO_KEEPALIVE = contextlib.nullcontext()


class NextHopLostInMessage(UpstreamError):
    """The next hop failed while a message was on its way: the answer to that message is the
    original's 451 (the client retries it), where between commands it is a 421."""


class Scanner(Protocol):
    """What the DATA phase needs of a scanner (scanner.Scanner, or a fake in tests): a verdict
    on a spooled message, never an exception (a scan that could not be done is ERROR)."""

    async def scan(
        self, spool: Spool, log: logging.LoggerAdapter[logging.Logger] | None = None
    ) -> ScanResult:
        ...


@dataclass
class Envelope:
    """One transaction as the next hop accepted it (for logs and VirusAction)."""

    mail_from: str | None = None
    rcpt_tos: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sender:
    """What the DATA phase knows of the client's session."""

    client_ip: str
    local_ip: str
    authenticated: bool = False  # (SkipAuthenticated)
    size_limit: int | None = None  # the next hop's EHLO SIZE
    remote: str | None = None  # XFORWARD ADDR / HELO the next hop accepted (VirusAction)
    remote_helo: str | None = None
    tls: str | None = None  # `tls=` of the log line (RelaySessionState.tls_summary)


class DataPhase:
    """One message, from our 354 to the reply to its final dot."""

    def __init__(
        self, *, channel: ClientChannel, upstream: Upstream, scanner: Scanner,
        actions: VirusActions, config: Config, log: logging.LoggerAdapter[logging.Logger],
        infected: InfectedHosts, envelope: Envelope, sender: Sender,
    ) -> None:
        self.channel = channel
        self.upstream = upstream
        self.scanner = scanner
        self.actions = actions
        self.config = config
        self.log = log
        self.infected = infected
        self.envelope = envelope
        self.sender = sender
        #: InfectedHostLimit blocked the client with this message: its session ends after it
        self.blocked = False
        #: the session is over (the client was told why): the relay closes the connection
        self.closing = False

    async def run(self) -> Reply | None:
        """Our 354, the body, the verdict carried out. Returns the next hop's reply as the
        client got it (the relay then sees whether the next hop left after it), None when the
        reply was the proxy's own; `closing` says the session must end. ClientGone when the
        client left or went silent; NextHopLostInMessage when the next hop failed."""
        log = self.log
        config = self.config
        await self._push(REPLY_START_DATA)
        policy = Policy.of(config)
        scan_limit = config.max_scan_size
        fresh = Spool(config.temp_directory)
        spool: Spool | None = fresh  # None once it is not kept
        decoder = DataDecoder()
        skip = skip_reason(policy, self.sender.client_ip, self.sender.authenticated)
        try:
            if skip is not None:  # relayed as it arrives: nothing to hold, nothing to scan
                verdict = unscanned(skip)
                self._log_outcome(verdict)
                return await self._stream_through(fresh, decoder, verdict)
            keepalive = (self.upstream.keepalive(config.keepalives, log)
                         if config.keepalives > 0 else _NO_KEEPALIVE)
            async with keepalive:
                spool, refusal, oversize = await self._receive_body(
                    fresh, decoder, scan_limit, stream=policy.oversize == OversizeAction.PASS
                )
                if spool is not None and not oversize:
                    started = time.monotonic()
                    result = await self.scanner.scan(spool, log)
                    metrics.SCAN_SECONDS.observe(time.monotonic() - started)
            if oversize:
                log.info("message over MaxScanSize (%d bytes): not scanned", scan_limit)
                result = ScanResult(OVERSIZE, detail="over MaxScanSize")
            elif spool is None:
                return await self._abandon(refusal)
            elif result.status in (ERROR, OVERSIZE):
                log.error("clamav error: %s", result.detail)
            verdict = decide(result, policy)
            metrics.child(metrics.MESSAGES, result.status.lower()).inc()
            self._log_outcome(verdict)
            if spool is None:  # over MaxScanSize, not held: OversizeAction reject or defer
                await self._discard_rest(decoder)
                return await self._abandon(verdict.reply or REPLY_LOCAL_ERROR)
            if verdict.infected:
                self._virus_found(spool, result.virus or "Unknown")
            if verdict.kind == FORWARD and not decoder.done:
                return await self._stream_through(spool, decoder, verdict)
            if verdict.kind == FORWARD:
                return await self._forward(spool, verdict)
            await self._discard_rest(decoder)
            return await self._abandon(verdict.reply or REPLY_LOCAL_ERROR)
        except UpstreamError as e:
            raise NextHopLostInMessage(str(e)) from None
        finally:
            if spool is not None:
                spool.remove()

    # -- the client -------------------------------------------------------------------------

    async def _drained(self) -> None:
        """The client is slow to take what was written: wait for it, within TimeOut."""
        try:
            await self.channel.drained()
        except TimeoutError:
            self.log.warning("network write operation timed out (client)")
            raise ClientGone from None

    async def _push(self, line: str) -> None:
        if self.channel.put(line.encode() + b"\r\n"):
            await self._drained()

    async def _push_reply(self, reply: Reply) -> Reply:
        if self.log.isEnabledFor(logging.DEBUG):
            for line in reply.lines:
                self.log.debug("SERVER > %s", line[:79].decode("utf-8", "replace"))
        if self.channel.put(reply.wire()):
            await self._drained()
        return reply

    async def _say_and_close(self, line: str) -> None:
        self.closing = True
        with contextlib.suppress(ClientGone):
            await self._push(line)

    async def _read_body_chunk(self) -> bytes:
        """The next piece of the body as the client sent it; ClientGone at its end or TimeOut."""
        try:
            chunk = await self.channel.read_chunk(DATA_CHUNK)
        except TimeoutError:
            self.log.warning("network read operation timed out (client, in DATA)")
            await self._say_and_close(REPLY_TIMEOUT)
            raise ClientGone from None
        if not chunk:
            self.log.error("unexpected end of data from client")
            raise ClientGone
        return chunk

    def _unread(self, decoder: DataDecoder) -> None:
        if decoder.rest:
            # A command sent right behind the end of data belongs to the command loop.
            self.channel.unread(decoder.rest)
            decoder.rest = b""

    # -- the message ------------------------------------------------------------------------

    def _log_outcome(self, verdict: Verdict) -> None:
        """The original's summary line, and the count of mail that was not scanned."""
        log = self.log
        if log.isEnabledFor(logging.INFO):  # (not built per message when nobody reads it)
            log.info("%s", summary(self.envelope.mail_from, self.envelope.rcpt_tos,
                                   verdict.status, self.sender.tls))
        if verdict.unscanned is not None:
            metrics.UNSCANNED.labels(verdict.unscanned.value).inc()
        elif verdict.status.startswith(STATUS_ALLOWED + ":"):
            metrics.ALLOWED.inc()

    def _virus_found(self, spool: Spool, virus: str) -> None:
        """Quarantine and VirusAction, after the verdict and before the reply, as the original."""
        config = self.config
        sender = self.sender
        email = None
        blocked = None
        if self.infected.record(sender.client_ip):
            blocked = config.infected_host_block
            self.blocked = True  # this session ends after this message's reply
        if config.quarantine:
            try:
                email = quarantine(spool, config.temp_directory)
                self.log.info("quarantined virus file as: %s", email)
            except OSError as e:
                self.log.error("couldn't quarantine virus file: %s", e)
        self.actions.start(
            VirusEvent(
                sender=self.envelope.mail_from, recipients=tuple(self.envelope.rcpt_tos),
                client=sender.client_ip, server=self.upstream.peer, virus=virus,
                tmpdir=config.temp_directory, email=email,
                remote=sender.remote, remote_helo=sender.remote_helo, blocked=blocked,
            ),
            prefix=getattr(self.log, "prefix", ""),
        )

    async def _receive_body(
        self, spool: Spool, decoder: DataDecoder, scan_limit: int | None, *, stream: bool
    ) -> tuple[Spool | None, str, bool]:
        """Read the body to its end-of-data line. Returns the spool, or None and the reply that
        says why the message was not kept (the spool could not be written, or the message is
        over the next hop's SIZE: it is refused now instead of after a useless scan); and
        whether it is over MaxScanSize (`scan_limit`).

        The whole body is read, even when it cannot be kept, so client and proxy stay in step
        and the client gets a reply it can act on. The one exception is a body over MaxScanSize
        that is to be passed on (`stream`): it returns as soon as it is known to be over, with
        what was received so far in the spool and the rest still to be read from `decoder`.
        """
        refusal = ""
        oversize = False
        limit = self.sender.size_limit
        kept: Spool | None = spool
        while not decoder.done:
            data = decoder.feed(await self._read_body_chunk())
            if kept is not None and data:
                try:
                    kept.write(data)
                except SpoolError as e:
                    self.log.error("%s", e)
                    kept.remove()
                    kept, refusal = None, REPLY_LOCAL_ERROR
                    continue
                if limit and kept.size > limit:
                    self.log.warning(
                        "message refused: over the next hop's SIZE limit of %d bytes", limit
                    )
                    kept.remove()
                    kept, refusal = None, REPLY_TOO_BIG
                elif scan_limit and kept.size > scan_limit:
                    if not stream:  # not held for scanning: only read to its end
                        kept.remove()
                        kept, oversize = None, True
                        continue
                    try:
                        kept.finish()
                    except SpoolError as e:
                        self.log.error("%s", e)
                        kept.remove()
                        kept, refusal = None, REPLY_LOCAL_ERROR
                        continue
                    return kept, "", True
        self._unread(decoder)
        if kept is not None:
            try:
                kept.finish()
            except SpoolError as e:
                self.log.error("%s", e)
                kept.remove()
                return None, REPLY_LOCAL_ERROR, False
        return kept, refusal, oversize

    async def _discard_rest(self, decoder: DataDecoder) -> None:
        """Read what is left of a body that is not kept, so the reply comes after its end."""
        while not decoder.done:
            decoder.feed(await self._read_body_chunk())
        self._unread(decoder)

    async def _stream_through(
        self, spool: Spool, decoder: DataDecoder, verdict: Verdict
    ) -> Reply | None:
        """Pass on a message over MaxScanSize as it arrives: what the spool holds so far, then
        the rest of the body chunk by chunk, never held whole. The end-of-data line is sent only
        once the client's has arrived: a client gone half-way leaves the next hop an unfinished
        transaction (discarded when the connection closes), never a cut message."""
        upstream = self.upstream
        reply = await upstream.command(b"DATA")
        if reply.code != 354:
            spool.remove()
            await self._discard_rest(decoder)
            return await self._data_refused(reply)
        stuffer = Stuffer()
        spool.finish()
        for chunk in spool.chunks(verdict.extra_header):
            await upstream.send(stuffer.feed(chunk))
        spool.remove()  # from here on, nothing of the body is kept
        while not decoder.done:
            data = decoder.feed(await self._read_body_chunk())
            if data:
                await upstream.send(stuffer.feed(data))
        self._unread(decoder)
        await upstream.send(b".\r\n")
        return await self._push_reply(await upstream.read_reply())

    async def _forward(self, spool: Spool, verdict: Verdict) -> Reply | None:
        upstream = self.upstream
        reply = await upstream.command(b"DATA")
        if reply.code != 354:
            return await self._data_refused(reply)
        header = b""
        if verdict.scanned:  # the scan header says "scanned": never on mail that was not
            header = expand_header(
                self.config.header, client_ip=self.sender.client_ip,
                local_ip=self.sender.local_ip,
            )
        reply = await upstream.send_message(stuff(spool.chunks(header + verdict.extra_header)))
        return await self._push_reply(reply)

    async def _data_refused(self, reply: Reply) -> Reply | None:
        """The next hop answered our DATA with something else than 354: the client gets its
        4xx/5xx as it is, anything else as 451 (the message was not taken)."""
        self.log.warning("server refused data transfer: %s", reply.text)
        await self._abandon_quietly()
        if reply.code < 400:
            # Not 354 is not taken, whatever it says: a 2xx relayed here would tell the
            # client its message was accepted, after its body, when nothing was sent.
            reply = Reply.make(REPLY_LOCAL_ERROR)
        return await self._push_reply(reply)

    async def _abandon_quietly(self) -> None:
        """End the next hop's transaction (RSET) after it refused DATA: the client was told
        its transaction is over, and the next MAIL must not be 503 'nested MAIL command'."""
        try:
            await self.upstream.command(b"RSET")
        except UpstreamError as e:
            self.log.error("%s", e)

    async def _abandon(self, reply: str) -> Reply | None:
        """Answer the client ourselves and end the transaction at the next hop (RSET)."""
        try:
            await self.upstream.command(b"RSET")
        except UpstreamError as e:
            self.log.error("%s", e)
            await self._say_and_close(reply)
            return None
        await self._push(reply)
        return None
