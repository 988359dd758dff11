"""The DATA phase of a relayed session: spool, scan, decide, then forward or refuse.

A mixin of the relay's session class (it needs the session's streams and state), kept apart
because it is the one part that knows about spooling and scanning: the rest of the relay only
passes SMTP lines along. Every path ends the transaction at the next hop (forwarded or RSET),
answers the client, and removes the spool file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from . import metrics
from .actions import VirusEvent, quarantine
from .channel import ClientGone
from .dotstuff import DataDecoder, Stuffer, stuff
from .header import expand_header
from .maillog import summary
from .replies import (
    REPLY_LOCAL_ERROR,
    REPLY_NEED_RCPT,
    REPLY_START_DATA,
    REPLY_TIMEOUT,
    REPLY_TOO_BIG,
)
from .scanner import ERROR, OVERSIZE, ScanResult
from .spool import Spool, SpoolError
from .upstream import Reply, UpstreamError
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


@dataclass
class Envelope:
    """One transaction as the next hop accepted it (for logs and VirusAction)."""

    mail_from: str | None = None
    rcpt_tos: list[str] = field(default_factory=list)


class NextHopLostInMessage(UpstreamError):
    """The next hop failed while a message was on its way: the answer to that message is the
    original's 451 (the client retries it), where between commands it is a 421."""


class MessageFlow:
    """smtp_DATA and what it needs; mixed into the relay's session class."""

    async def smtp_DATA(self, line: bytes, verb: bytes) -> None:
        log = self.session.log
        envelope = self.envelope
        if not envelope.rcpt_tos:
            await self.push(REPLY_NEED_RCPT)
            return
        self.envelope = Envelope()  # whatever happens, the transaction ends here
        self.session.in_data = True
        await self.push(REPLY_START_DATA)
        policy = Policy.of(self.config)
        scan_limit = self.config.max_scan_size
        spool: Spool | None = Spool(self.config.temp_directory)
        decoder = DataDecoder()
        skip = skip_reason(policy, self.session.client_ip, self.session.authenticated)
        try:
            if skip is not None:  # relayed as it arrives: nothing to hold, nothing to scan
                verdict = unscanned(skip)
                self._log_outcome(envelope, verdict)
                await self._stream_through(spool, decoder, verdict)
                return
            async with self.session.upstream.keepalive(self.config.keepalives, log):
                spool, refusal, oversize = await self._receive_body(
                    spool, decoder, scan_limit, stream=policy.oversize == "pass"
                )
                if spool is not None and not oversize:
                    started = time.monotonic()
                    result = await self.context.scanner.scan(spool, log)
                    metrics.SCAN_SECONDS.observe(time.monotonic() - started)
            if oversize:
                log.info("message over MaxScanSize (%d bytes): not scanned", scan_limit)
                result = ScanResult(OVERSIZE, detail="over MaxScanSize")
            elif spool is None:
                await self._abandon(refusal)
                return
            elif result.status in (ERROR, OVERSIZE):
                log.error("clamav error: %s", result.detail)
            verdict = decide(result, policy)
            metrics.MESSAGES.labels(result.status.lower()).inc()
            self._log_outcome(envelope, verdict)
            if verdict.infected:
                self._virus_found(spool, envelope, result.virus or "Unknown")
            if verdict.kind == FORWARD and not decoder.done:
                await self._stream_through(spool, decoder, verdict)
            elif verdict.kind == FORWARD:
                await self._forward(spool, verdict)
            else:
                await self._discard_rest(decoder)
                await self._abandon(verdict.reply)
        except UpstreamError as e:
            raise NextHopLostInMessage(str(e)) from None
        finally:
            self.session.in_data = False
            if spool is not None:
                spool.remove()

    def _log_outcome(self, envelope, verdict: Verdict) -> None:
        """The original's summary line, and the count of mail that was not scanned."""
        log = self.session.log
        if log.isEnabledFor(logging.INFO):  # (not built per message when nobody reads it)
            log.info("%s", summary(envelope.mail_from, envelope.rcpt_tos, verdict.status,
                                   self.session.tls_summary))
        if verdict.unscanned is not None:
            metrics.UNSCANNED.labels(verdict.unscanned.value).inc()
        elif verdict.status.startswith(STATUS_ALLOWED + ":"):
            metrics.ALLOWED.inc()

    def _virus_found(self, spool: Spool, envelope, virus: str) -> None:
        """Quarantine and VirusAction, after the verdict and before the reply, as the original."""
        session = self.session
        email = None
        blocked = None
        if self.context.infected.record(session.client_ip):
            blocked = self.config.infected_host_block
            session.blocked = True  # this session ends after this message's reply
        if self.config.quarantine:
            try:
                email = quarantine(spool, self.config.temp_directory)
                session.log.info("quarantined virus file as: %s", email)
            except OSError as e:
                session.log.error("couldn't quarantine virus file: %s", e)
        self.context.actions.start(
            VirusEvent(
                sender=envelope.mail_from, recipients=tuple(envelope.rcpt_tos),
                client=session.client_ip, server=session.upstream.peer, virus=virus,
                tmpdir=self.config.temp_directory, email=email,
                remote=session.xforward.get("ADDR"), remote_helo=session.xforward.get("HELO"),
                blocked=blocked,
            ),
            prefix=session.log.prefix,
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
        limit = self.session.size_limit
        while not decoder.done:
            data = decoder.feed(await self._read_body_chunk())
            if spool is not None and data:
                try:
                    spool.write(data)
                except SpoolError as e:
                    self.session.log.error("%s", e)
                    spool.remove()
                    spool, refusal = None, REPLY_LOCAL_ERROR
                    continue
                if limit and spool.size > limit:
                    self.session.log.warning(
                        "message refused: over the next hop's SIZE limit of %d bytes", limit
                    )
                    spool.remove()
                    spool, refusal = None, REPLY_TOO_BIG
                elif scan_limit and spool.size > scan_limit:
                    if not stream:  # not held for scanning: only read to its end
                        spool.remove()
                        spool, oversize = None, True
                        continue
                    try:
                        spool.finish()
                    except SpoolError as e:
                        self.session.log.error("%s", e)
                        spool.remove()
                        spool, refusal = None, REPLY_LOCAL_ERROR
                        continue
                    return spool, "", True
        self._unread(decoder)
        if spool is not None:
            try:
                spool.finish()
            except SpoolError as e:
                self.session.log.error("%s", e)
                spool.remove()
                return None, REPLY_LOCAL_ERROR, False
        return spool, refusal, oversize

    async def _read_body_chunk(self) -> bytes:
        """The next piece of the body as the client sent it; ClientGone at its end or TimeOut."""
        try:
            chunk = await self.channel.read_chunk(DATA_CHUNK)
        except TimeoutError:
            self.session.log.warning("network read operation timed out (client, in DATA)")
            await self._say_and_close(REPLY_TIMEOUT)
            raise ClientGone from None
        if not chunk:
            self.session.log.error("unexpected end of data from client")
            raise ClientGone
        return chunk

    async def _discard_rest(self, decoder: DataDecoder) -> None:
        """Read what is left of a body that is not kept, so the reply comes after its end."""
        while not decoder.done:
            decoder.feed(await self._read_body_chunk())
        self._unread(decoder)

    def _unread(self, decoder: DataDecoder) -> None:
        if decoder.rest:
            # A command sent right behind the end of data belongs to the command loop.
            self.channel.unread(decoder.rest)
            decoder.rest = b""

    async def _stream_through(self, spool: Spool, decoder: DataDecoder, verdict: Verdict) -> None:
        """Pass on a message over MaxScanSize as it arrives: what the spool holds so far, then
        the rest of the body chunk by chunk, never held whole. The end-of-data line is sent only
        once the client's has arrived: a client gone half-way leaves the next hop an unfinished
        transaction (discarded when the connection closes), never a cut message."""
        session = self.session
        upstream = session.upstream
        reply = await upstream.command(b"DATA")
        if reply.code != 354:
            spool.remove()
            await self._discard_rest(decoder)
            await self._data_refused(reply)
            return
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
        reply = await upstream.read_reply()
        await self._push_reply(reply)
        await self._end_if_next_hop_left(reply)

    async def _forward(self, spool: Spool, verdict: Verdict) -> None:
        session = self.session
        upstream = session.upstream
        reply = await upstream.command(b"DATA")
        if reply.code != 354:
            await self._data_refused(reply)
            return
        header = b""
        if verdict.scanned:  # the scan header says "scanned": never on mail that was not
            header = expand_header(
                self.config.header, client_ip=session.client_ip, local_ip=session.local_ip
            )
        reply = await upstream.send_message(stuff(spool.chunks(header + verdict.extra_header)))
        await self._push_reply(reply)
        await self._end_if_next_hop_left(reply)

    async def _data_refused(self, reply: Reply) -> None:
        """The next hop answered our DATA with something else than 354: the client gets its
        4xx/5xx as it is, anything else as 451 (the message was not taken)."""
        self.session.log.warning("server refused data transfer: %s", reply.text)
        await self._abandon_quietly()
        if reply.code < 400:
            # Not 354 is not taken, whatever it says: a 2xx relayed here would tell the
            # client its message was accepted, after its body, when nothing was sent.
            reply = Reply.make(REPLY_LOCAL_ERROR)
        await self._push_reply(reply)
        await self._end_if_next_hop_left(reply)

    async def _abandon_quietly(self) -> None:
        """End the next hop's transaction (RSET) after it refused DATA: the client was told
        its transaction is over, and the next MAIL must not be 503 'nested MAIL command'."""
        try:
            await self.session.upstream.command(b"RSET")
        except UpstreamError as e:
            self.session.log.error("%s", e)

    async def _abandon(self, reply: str) -> None:
        """Answer the client ourselves and end the transaction at the next hop (RSET)."""
        try:
            await self.session.upstream.command(b"RSET")
        except UpstreamError as e:
            self.session.log.error("%s", e)
            await self._say_and_close(reply)
            return
        await self.push(reply)
