"""The client side of one connection: relay the SMTP dialogue, intercept DATA.

The relay owns the client's connection (`channel.ClientChannel`): a transparent relay must pass
verbs no SMTP server library knows, the continuation lines of AUTH, and the next hop's replies
verbatim, and it must stream DATA to disk instead of collecting it in memory (docs/dev/relay.md).

Flow, one way: the next hop's replies come from `upstream`, the body goes to `spool`, `scanner`
scans it, `verdict` decides, and this module carries the decision out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from . import metrics, xclient
from . import tls as tls_contexts
from .actions import VirusActions
from .addresses import Address, plain_ip
from .channel import ClientChannel, ClientGone, LineTooLong
from .config import ClientTLS, Config, Transparency
from .containment import InfectedHosts
from .dialogue import (
    GROUPED_VERBS,
    advertises,
    command_verb,
    ehlo_size,
    envelope_address,
    filter_ehlo,
    loggable_command,
    xforward_attributes,
)
from .maillog import ConnectionLog, next_connection_id, summary
from .message import DataPhase, Envelope, NextHopLostInMessage, Sender
from .nexthop import Destination, DestinationError
from .replies import (
    REPLY_AUTH_LINE_TOO_LONG,
    REPLY_AUTH_NEEDS_TLS,
    REPLY_BARE_CR,
    REPLY_BLOCKED,
    REPLY_GREETING,
    REPLY_LINE_TOO_LONG,
    REPLY_LOCAL_ERROR,
    REPLY_LOOP,
    REPLY_NEED_RCPT,
    REPLY_NEXT_HOP_DOWN,
    REPLY_NEXT_HOP_INSECURE,
    REPLY_NEXT_HOP_LOST,
    REPLY_NOT_IMPLEMENTED,
    REPLY_NUL,
    REPLY_SEND_EHLO_FIRST,
    REPLY_SHUTDOWN,
    REPLY_TIMEOUT,
    REPLY_TLS_ACTIVE,
    REPLY_TLS_IN_TRANSACTION,
    REPLY_TLS_READY,
    REPLY_TLS_SYNTAX,
    REPLY_TOO_MANY_RECIPIENTS,
    REPLY_XCLIENT,
    REPLY_XCLIENT_FAILED,
)
from .scanner import Scanner
from .splice import StreamEnd, splice
from .tls import TLSContexts
from .tlsmemory import ClearNextHops
from .upstream import HandshakeError, OwnConnections, Reply, Upstream, UpstreamError
from .verdict import Unscanned

#: A client line of this many bytes or more (CRLF included) is refused, as the original (4224 - 2).
MAX_LINE = 4222
#: An AUTH answer (a SASL response) may be longer than a command line, up to this.
MAX_AUTH_LINE = 1 << 17

#: Recipients per message, as Postfix's smtpd_recipient_limit: past it, 452 (RFC 5321 4.5.3.1.10)
MAX_RECIPIENTS = 1000
#: Commands of one pipelined group sent to the next hop in one write. Only lines already read
#: from the client are taken, and the next group is read after this one's replies went out:
#: 1000 commands in one write cost this many lines of memory, not 1000.
MAX_GROUP = 100
#: Before the next hop's leg is encrypted (OutTLS: encrypt, verify) only these are relayed.
_BEFORE_TLS = frozenset({b"EHLO", b"HELO", b"QUIT", b"NOOP", b"RSET"})



@dataclass
class RelayContext:
    """What every session shares: set up once by the server."""

    config: Config
    scanner: Scanner
    destination: Destination
    actions: VirusActions
    #: TLSCertificate/TLSKey and the next hop's context, loaded with this configuration
    tls: TLSContexts = field(default_factory=lambda: TLSContexts(None, None, None))
    sessions: set[RelaySession] = field(default_factory=set)
    #: our own connections to next hops: one that comes back in is a loop
    outgoing: OwnConnections = field(default_factory=OwnConnections)
    #: Set at shutdown: sessions finish the message in hand, then close with a 421.
    stopping: bool = False
    #: InfectedHostLimit's table: one for the daemon, kept across reloads
    infected: InfectedHosts = field(default_factory=InfectedHosts)
    #: OutTLS: may: next hops that just offered no STARTTLS (a new, empty one at each reload)
    clear_next_hops: ClearNextHops = field(default_factory=ClearNextHops)


class RelaySessionState:
    """What a relay needs to know about the connection."""

    def __init__(self) -> None:
        self.conn_id = next_connection_id()
        self.log = ConnectionLog(self.conn_id)
        self.client_ip = ""
        self.local_ip = ""
        self.host_name: str | None = None  # the client's HELO/EHLO name (for XCLIENT)
        self.upstream: Upstream | None = None
        self.xforward: dict[str, str] = {}  # ADDR / HELO the next hop accepted via XFORWARD
        #: XClient: on and the next hop took XCLIENT for this client (then never sent again)
        self.introduced = False
        self.in_data = False  # between DATA and its final reply: shutdown lets it finish
        self.size_limit: int | None = None  # the next hop's EHLO SIZE, if it has one
        self.destination: Address | None = None
        self.client_tls: ssl.SSLObject | None = None  # set once the client's leg is TLS
        #: STARTTLS towards the next hop still to be tried (at the client's first HELO/EHLO)
        self.next_hop_tls_pending = False
        self.authenticated = False  # the next hop accepted the client's AUTH (235)
        self.blocked = False  # InfectedHostLimit blocked this client during the session
        self.passthrough = False  # the client's STARTTLS went to the next hop: spliced
        #: the next hop's last EHLO reply offered PIPELINING (and so the client was offered it)
        self.pipelining = False

    @property
    def next_hop(self) -> Upstream:
        """`upstream`, once the connection to the next hop is made: every command is handled
        after its greeting."""
        upstream = self.upstream
        assert upstream is not None, "no connection to the next hop yet"
        return upstream

    @property
    def tls_summary(self) -> str | None:
        """`TLSv1.3/none` (client's leg / next hop's), or None when both legs are clear."""
        upstream = self.upstream
        next_hop = upstream.ssl_object if upstream is not None else None
        if self.client_tls is None and next_hop is None:
            return None
        return (f"{tls_contexts.describe_session(self.client_tls)}/"
                f"{tls_contexts.describe_session(next_hop)}")


class RelaySession:
    """One proxied SMTP connection. The server's protocol factory returns its `channel`."""

    def __init__(self, context: RelayContext) -> None:
        self.context = context
        self.config = context.config
        self._closing = False
        self.session = RelaySessionState()
        self.envelope = Envelope()
        self._task: asyncio.Task[None] | None = None
        self.channel = ClientChannel(context.config.timeout, self._connected, self._lost)
        #: -d 4: the dialogue is logged (asked once per connection, not at every line)
        self._debug = self.session.log.isEnabledFor(logging.DEBUG)
        # Counted from here, not from connection_made: asyncio creates the protocols of a
        # whole burst of accepted connections before any of them is "made".
        context.sessions.add(self)

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's transport (TLS once STARTTLS is through); None once it is lost."""
        return self.channel.transport

    # -- the connection ---------------------------------------------------------------------

    def _connected(self, channel: ClientChannel) -> None:
        metrics.CONNECTIONS.inc()
        metrics.ACTIVE.inc()
        session = self.session
        peer = channel.get_extra_info("peername")
        local = channel.get_extra_info("sockname")
        session.client_ip = plain_ip(peer[0]) if isinstance(peer, tuple) else "127.0.0.1"
        sock = channel.get_extra_info("socket")
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Each reply leaves in one write: Nagle would hold a reply sent right behind another
            # (the 354 behind a pipelined group's replies) for the client's delayed ACK, 40 ms.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session.local_ip = plain_ip(local[0]) if isinstance(local, tuple) else "127.0.0.1"
        session.log.info("accepted connection from: %s", session.client_ip)
        self._task = channel.loop.create_task(self._handle_client())

    def _lost(self) -> None:
        """The client's connection is gone: whatever the session was doing has nobody left to
        answer (a message not yet forwarded is not: the client never saw its 250)."""
        self._release()
        if self._task is not None:
            self._task.cancel()

    def _release(self) -> None:
        """The session no longer counts against MaxConnections (once)."""
        if self in self.context.sessions:
            self.context.sessions.discard(self)
            metrics.ACTIVE.dec()

    async def push(self, status: str | bytes) -> None:
        data = status.encode() if isinstance(status, str) else status
        if self.channel.put(data + b"\r\n"):
            await self._drained()

    async def _send(self, data: bytes) -> None:
        if self.channel.put(data):
            await self._drained()

    async def _drained(self) -> None:
        """The client is slow to take what was written: wait for it, within TimeOut."""
        try:
            await self.channel.drained()
        except TimeoutError:
            self.session.log.warning("network write operation timed out (client)")
            raise ClientGone from None

    async def _push_reply(self, reply: Reply) -> None:
        self._no_message_started(reply)
        self._debug_lines("SERVER > ", reply.lines)
        if self.channel.put(reply.wire()):  # (no coroutine per reply: one rarely waits)
            await self._drained()

    def _no_message_started(self, reply: Reply) -> None:
        """A 354 answers the proxy's own DATA only (DataPhase). To a relayed command (a verb the
        next hop takes for DATA where we do not) it would make the client's next lines a message
        nobody scans: the next hop's connection is dropped unfinished, so none of it is
        delivered, and the session ends with our 421."""
        if reply.code == 354:
            self.session.next_hop.abort()
            raise UpstreamError(f"server started a message the proxy did not ask for "
                                f"({reply.text}); connection dropped")

    def _debug_lines(self, prefix: str, lines: Iterable[bytes]) -> None:
        if self._debug:
            for line in lines:
                self.session.log.debug("%s%s", prefix, line[:79].decode("utf-8", "replace"))

    def close(self) -> None:
        self._closing = True
        self.channel.close()

    def shutdown(self) -> None:
        """Server stopping: an idle session is told so now; one in DATA finishes first."""
        if not self.session.in_data and self.transport is not None and not self._closing:
            self.channel.write((REPLY_SHUTDOWN + "\r\n").encode())
            self.close()

    # -- the command loop -------------------------------------------------------------------

    async def _handle_client(self) -> None:
        log = self.session.log
        try:
            await self._serve()
        except ClientGone:
            pass
        except xclient.XclientError as e:
            log.error("%s", e)  # the client must not reach the next hop as the proxy itself
            metrics.NEXT_HOP_ERRORS.labels("session").inc()
            await self._say_and_close(REPLY_XCLIENT_FAILED)
        except UpstreamError as e:
            log.error("%s", e)
            metrics.NEXT_HOP_ERRORS.labels("session").inc()
            # The session cannot go on without the next hop: RFC 5321's 421 says so, except as
            # the answer to a message, where it is the original's 451.
            in_message = isinstance(e, NextHopLostInMessage)
            await self._say_and_close(REPLY_LOCAL_ERROR if in_message else REPLY_NEXT_HOP_LOST)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error; the client is told to try again later")
            await self._say_and_close(REPLY_LOCAL_ERROR)
        finally:
            upstream = self.session.upstream
            if upstream is not None:
                upstream.close()
            self.close()
            self._count_tls()

    def _count_tls(self) -> None:
        session = self.session
        if session.passthrough:
            client_mode = "passthrough"
        else:
            client_mode = "tls" if session.client_tls else "clear"
        metrics.child(metrics.TLS_SESSIONS, "client", client_mode).inc()
        upstream = session.upstream
        if upstream is not None:
            mode = "tls" if upstream.ssl_object is not None else "clear"
            mode = "passthrough" if session.passthrough else mode
            metrics.child(metrics.TLS_SESSIONS, "next_hop", mode).inc()

    async def _say_and_close(self, reply: str) -> None:
        with contextlib.suppress(ClientGone):
            await self.push(reply)
        self.close()

    async def _serve(self) -> None:
        session = self.session
        blocked_for = self.context.infected.blocked_for(session.client_ip)
        if blocked_for:  # before any next hop is contacted
            session.log.warning("refused: %s is blocked for %d s more (InfectedHostLimit)",
                                session.client_ip, blocked_for)
            metrics.CONNECTIONS_BLOCKED.inc()
            await self._say_and_close(REPLY_BLOCKED)
            return
        try:
            await self._refuse_own_connection()
            destination = self.context.destination(session.client_ip, self.channel)
        except DestinationError as e:
            session.log.error("%s", e)
            await self._say_and_close(e.reply)
            return
        if self.config.transparent_proxy:
            session.log.info("original destination: %s", destination)
        # TransparentProxy: full: the next hop sees the client's own address, not ours
        source = session.client_ip if self.config.transparent_proxy is Transparency.FULL else None
        session.destination = destination
        # (with ClientTLS: passthrough the next hop's TLS is the client's own, if it asks)
        session.next_hop_tls_pending = (
            self.context.tls.client is not None
            and self.config.client_tls is not ClientTLS.PASSTHROUGH
        )
        try:
            session.upstream = await Upstream.connect(
                destination, self.config.timeout, self.context.outgoing, source=source
            )
        except UpstreamError as e:
            session.log.error("SERVER: %s", e)
            metrics.NEXT_HOP_ERRORS.labels("connect").inc()
            await self._say_and_close(REPLY_NEXT_HOP_DOWN)
            return
        try:
            greeting = await session.upstream.read_reply()
        except UpstreamError as e:
            session.log.error("SERVER: no greeting: %s", e)
            metrics.NEXT_HOP_ERRORS.labels("connect").inc()
            await self._say_and_close(REPLY_NEXT_HOP_DOWN)
            return
        if greeting.code == 220 and len(greeting.lines) == 1:
            self._debug_lines("SERVER > ", greeting.lines)
            greeting = Reply(220, (REPLY_GREETING.encode(),))
        await self._push_reply(greeting)
        await self._end_if_next_hop_left(greeting)
        while not self._closing:
            if self.context.stopping:
                await self._say_and_close(REPLY_SHUTDOWN)
                return
            line = await self._read_command()
            if line is None:
                continue
            verb = command_verb(line)
            if session.blocked and verb != b"QUIT":  # InfectedHostLimit blocked it just now
                await self._say_and_close(REPLY_BLOCKED)
                return
            if (session.next_hop_tls_pending and verb not in _BEFORE_TLS
                    and self.config.out_tls.required):
                await self.push(REPLY_SEND_EHLO_FIRST)  # nothing goes to the next hop in clear
                continue
            if (session.pipelining and verb in GROUPED_VERBS and self._buffered_line()
                    and (verb != b"RCPT" or len(self.envelope.rcpt_tos) < MAX_RECIPIENTS)):
                await self._relay_group(line, verb)
                continue
            handler = _VERBS.get(verb, RelaySession._relay)
            await handler(self, line, verb)

    async def _refuse_own_connection(self) -> None:
        """A connection from one of our own outgoing connections: the firewall sent the proxy's
        forwarded mail back to it (e.g. an OUTPUT rule without the owner exemption), or
        OutAddress points at the proxy itself. The original could only loop until MaxConnections.
        """
        peer = self.channel.get_extra_info("peername")
        if isinstance(peer, tuple) and await self.context.outgoing.is_ours(peer[:2]):
            raise DestinationError(
                f"loop detected: this connection is the proxy's own, from {peer[0]}:{peer[1]}",
                REPLY_LOOP,
            )

    async def _read_command(self) -> bytes | None:
        """One command line without its line ending; None if it was refused (already answered)."""
        try:
            line = await self.channel.read_line(MAX_LINE)
        except LineTooLong:
            await self.push(REPLY_LINE_TOO_LONG)
            return None
        except TimeoutError:
            self.session.log.warning("network read operation timed out (client)")
            await self._say_and_close(REPLY_TIMEOUT)
            raise ClientGone from None
        line = line.rstrip(b"\r\n")
        if b"\r" in line:
            # A next hop that takes a bare CR for a line end would read several commands (even
            # DATA and a whole unscanned message) where we saw one: never relay it.
            self.session.log.warning("command with a bare CR refused")
            await self.push(REPLY_BARE_CR)
            return None
        if b"\0" in line:
            # `DATA\0x` is no DATA to us, but a C server reading the line as a string sees
            # DATA and takes the client's next lines as a message we never scan.
            self.session.log.warning("command with a NUL character refused")
            await self.push(REPLY_NUL)
            return None
        if self._debug:  # (no AUTH masking when not logged)
            self._debug_lines("CLIENT < ", (loggable_command(line),))
        return line

    # -- pipelining (RFC 2920) --------------------------------------------------------------

    def _buffered_line(self) -> bytes | None:
        """The next whole command line the client already sent (with its LF), not consumed;
        None if no whole line is buffered."""
        return self.channel.peek_line(MAX_LINE)

    def _next_grouped(self, rcpts: int) -> bytes | None:
        """Take the next buffered line if it may join the group: a clean command line (every
        refusal of _read_command still applies to it, on its own, after the group) whose verb
        may be followed by more, and an RCPT only while the envelope has room."""
        raw = self._buffered_line()
        if raw is None or len(raw) >= MAX_LINE:
            return None
        line = raw.rstrip(b"\r\n")
        if b"\r" in line or b"\0" in line:
            return None
        verb = command_verb(line)
        if verb not in GROUPED_VERBS or (verb == b"RCPT" and rcpts >= MAX_RECIPIENTS):
            return None
        self.channel.skip(len(raw))
        self._debug_lines("CLIENT < ", (line,))
        return line

    async def _relay_group(self, line: bytes, verb: bytes) -> None:
        """A pipelined group (MAIL, RCPT, RSET already sent by the client): one write to the
        next hop, then its replies relayed in order, verbatim, each tracked as if alone. The
        group ends at any other verb (DATA ends it, and its 354 is the proxy's as ever)."""
        await self._introduce_before(verb)
        session = self.session
        group = [(line, verb)]
        # recipients the envelope may hold once the group is through (if all are accepted)
        rcpts = 0 if verb in (b"MAIL", b"RSET") else len(self.envelope.rcpt_tos) + 1
        while len(group) < MAX_GROUP:
            more = self._next_grouped(rcpts)
            if more is None:
                break
            more_verb = command_verb(more)
            rcpts = 0 if more_verb in (b"MAIL", b"RSET") else rcpts + 1
            group.append((more, more_verb))
        upstream = session.next_hop
        owed = len(group)
        # The replies leave in one write, as a pipelining server answers a group: written one
        # by one, the second would wait for the client's delayed ACK of the first (Nagle), 40 ms
        # per group on Linux.
        answers: list[bytes] = []
        try:
            await upstream.send(b"".join(one + b"\r\n" for one, _ in group))
            for one, one_verb in group:
                reply = await upstream.read_reply()
                self._no_message_started(reply)
                owed -= 1
                if reply.positive:
                    self._track(one, one_verb)
                self._debug_lines("SERVER > ", reply.lines)
                answers.append(reply.wire())
                if reply.code == 421 or (owed and upstream.at_eof):
                    break
        except UpstreamError as e:
            session.log.error("%s (%d pipelined command(s) unanswered)", e, owed)
            metrics.NEXT_HOP_ERRORS.labels("session").inc()
            await self._owe(answers, owed)
            return
        if owed:
            session.log.error("SERVER: connection closed mid-group (%d command(s) unanswered)",
                              owed)
            metrics.NEXT_HOP_ERRORS.labels("session").inc()
            await self._owe(answers, owed)
            return
        await self._send(b"".join(answers))
        await self._end_if_next_hop_left(reply)

    async def _owe(self, answers: list[bytes], owed: int) -> None:
        """The next hop is gone with `owed` commands of a group unanswered: after the replies
        it gave (`answers`), each gets our 421, and so do the commands the client already sent
        behind the group, up to its DATA (none of them reached a message: DATA is never in a
        group); then the session ends."""
        while owed < MAX_GROUP:
            raw = self._buffered_line()
            if raw is None:
                break
            self.channel.skip(len(raw))
            owed += 1
            if command_verb(raw) == b"DATA":
                break  # what follows is its body, not commands
        with contextlib.suppress(ClientGone):
            await self._send(b"".join(answers) + (REPLY_NEXT_HOP_LOST + "\r\n").encode() * owed)
        self.close()

    # -- commands ---------------------------------------------------------------------------

    async def _relay(self, line: bytes, verb: bytes) -> None:
        await self._introduce_before(verb)
        upstream = self.session.next_hop
        reply = await upstream.command(line)
        if reply.positive:
            self._track(line, verb)
        await self._push_reply(reply)
        await self._end_if_next_hop_left(reply)

    async def _end_if_next_hop_left(self, reply: Reply) -> None:
        """After relaying `reply`: the next hop's 421 ends the session as it said. A next hop
        that hung up after any other reply gets the client our 421 now; without it the client
        would see its connection dropped with no word, right after a 250."""
        if reply.code == 421:
            self.close()
        elif self.session.next_hop.at_eof:
            self.session.log.error("SERVER: connection closed after its reply (%d)", reply.code)
            metrics.NEXT_HOP_ERRORS.labels("session").inc()
            await self._say_and_close(REPLY_NEXT_HOP_LOST)

    def _track(self, line: bytes, verb: bytes) -> None:
        """Follow the envelope as the next hop accepted it (for logs and VirusAction)."""
        if verb == b"MAIL":
            self.envelope = Envelope()
            self.envelope.mail_from = envelope_address(line)
        elif verb == b"RCPT":
            self.envelope.rcpt_tos.append(envelope_address(line))
        elif verb == b"RSET":
            self.envelope = Envelope()
        elif verb == b"XFORWARD":
            self.session.xforward.update(xforward_attributes(line))

    async def smtp_RCPT(self, line: bytes, verb: bytes) -> None:
        if len(self.envelope.rcpt_tos) >= MAX_RECIPIENTS:
            await self.push(REPLY_TOO_MANY_RECIPIENTS)  # not relayed: the envelope is full
            return
        await self._relay(line, verb)

    async def smtp_EHLO(self, line: bytes, verb: bytes) -> None:
        await self._greet(line, verb)

    async def smtp_HELO(self, line: bytes, verb: bytes) -> None:
        await self._greet(line, verb)

    async def _greet(self, line: bytes, verb: bytes) -> None:
        session = self.session
        reply: Reply | None
        if session.next_hop_tls_pending:
            session.next_hop_tls_pending = False
            memory = self.context.clear_next_hops
            if (verb == b"HELO" and not self.config.out_tls.required
                    and session.destination is not None and session.destination in memory):
                # OutTLS: may, and this next hop offered no STARTTLS moments ago: no EHLO
                # probe before the client's HELO (docs/dev/tlsmemory.md)
                session.log.info("SERVER: no STARTTLS offered (within %g s): the next hop's leg "
                                 "is in clear", memory.seconds)
                reply = await session.next_hop.command(line)
            else:
                reply = await self._secure_next_hop(line, verb)
                if reply is None:
                    return
        else:
            reply = await self.session.next_hop.command(line)
        if reply.positive:
            self.envelope = Envelope()
            self.session.host_name = line[5:].strip().decode("utf-8", "replace")
            self.session.size_limit = ehlo_size(reply.lines)
            self.session.pipelining = verb == b"EHLO" and advertises(reply.lines, b"PIPELINING")
            if self.config.xclient and not self.session.introduced:
                reply = await self._introduce_after_greeting(line, verb, reply)
            # (after XCLIENT the second EHLO's reply is the one the client sees)
            self.session.pipelining = verb == b"EHLO" and advertises(reply.lines, b"PIPELINING")
        if reply.positive:
            self._no_message_started(reply)
            self._debug_lines("SERVER > ", reply.lines)
            offer = (b"STARTTLS",) if verb == b"EHLO" and self._offers_starttls(reply) else ()
            reply = Reply(reply.code, filter_ehlo(reply.lines, add=offer))
            await self._send(reply.wire())
        else:
            await self._push_reply(reply)
        await self._end_if_next_hop_left(reply)

    async def _introduce_before(self, verb: bytes) -> None:
        """XClient: on: before the first command the next hop's access rules judge (MAIL, RCPT,
        AUTH, VRFY, ...), XCLIENT must have been accepted. It is sent now if the client's
        HELO/EHLO did not bring it (no greeting, or the next hop refused it)."""
        session = self.session
        if not self.config.xclient or session.introduced or verb in xclient.BEFORE_XCLIENT:
            return
        await xclient.introduce(session.next_hop, None, client_ip=session.client_ip, helo=None,
                                proto="", log=session.log)
        session.introduced = True

    async def _introduce_after_greeting(self, line: bytes, verb: bytes, reply: Reply) -> Reply:
        """After the client's accepted HELO/EHLO: XCLIENT, then that HELO/EHLO again (the 220
        to XCLIENT reset the next hop's session). Returns the reply to relay to the client."""
        session = self.session
        await xclient.introduce(
            session.next_hop, reply if verb == b"EHLO" else None,  # HELO hides the extensions
            client_ip=session.client_ip, helo=session.host_name,
            proto="ESMTP" if verb == b"EHLO" else "SMTP", log=session.log,
        )
        session.introduced = True
        again = await session.next_hop.command(line)
        if not again.positive:
            session.log.warning("server refused %s after XCLIENT: %s", verb.decode(), again.text)
        return again

    def _offers_starttls(self, reply: Reply) -> bool:
        if self.config.client_tls is ClientTLS.PASSTHROUGH:
            return advertises(reply.lines, b"STARTTLS")  # the next hop's own, passed on
        return self.context.tls.server is not None and self.session.client_tls is None

    async def _secure_next_hop(self, line: bytes, verb: bytes) -> Reply | None:
        """STARTTLS towards the next hop, at the client's first HELO/EHLO: EHLO (the client's,
        or one in its name for HELO), STARTTLS, handshake; returns the next hop's reply to the
        client's line, sent inside TLS when that worked. None: the session is over (OutTLS:
        encrypt or verify, and the leg could not be encrypted; the client was told)."""
        session = self.session
        upstream = session.next_hop
        mode = self.config.out_tls
        probe = line if verb == b"EHLO" else b"EHLO " + line[5:].strip()
        reply = await upstream.command(probe)
        memory = self.context.clear_next_hops
        assert session.destination is not None  # (set before the connection)
        if reply.code != 250 or not advertises(reply.lines, b"STARTTLS"):
            why = "no STARTTLS offered" if reply.code == 250 else f"EHLO refused: {reply.text}"
            if mode.required:
                await self._insecure(why)
                return None
            if reply.code == 250 or reply.code >= 500:  # (not a passing 4xx)
                memory.remember(session.destination)
            session.log.info("SERVER: %s: the next hop's leg is in clear", why)
            # the probe was the client's own EHLO: its reply, even a refusal, is the answer
            return reply if verb == b"EHLO" else await upstream.command(line)
        memory.forget(session.destination)
        answer = await upstream.command(b"STARTTLS")
        if answer.code != 220:
            why = f"STARTTLS refused: {answer.text}"
            if mode.required:
                await self._insecure(why)
                return None
            session.log.warning("SERVER: %s: the next hop's leg is in clear", why)
            return await upstream.command(line)
        context = self.context.tls.client
        assert context is not None  # (next_hop_tls_pending is set only with one)
        try:
            await upstream.start_tls(context, self.context.tls.server_hostname)
        except HandshakeError as e:
            metrics.TLS_HANDSHAKE_FAILURES.labels("next_hop").inc()
            if mode.required:
                await self._insecure(str(e))
                return None
            # OutTLS: may must never make undeliverable what clear text delivers (as Postfix)
            session.log.warning("SERVER: %s: connecting again, in clear", e)
            return await self._reconnect_in_clear(line)
        session.log.info("SERVER: TLS: %s", _version_cipher(upstream.ssl_object))
        return await upstream.command(line)

    async def _insecure(self, why: str) -> None:
        self.session.log.error("SERVER: cannot encrypt the connection (OutTLS: %s): %s",
                               self.config.out_tls, why)
        metrics.NEXT_HOP_ERRORS.labels("tls").inc()
        await self.session.next_hop.quit()
        await self._say_and_close(REPLY_NEXT_HOP_INSECURE)

    async def _reconnect_in_clear(self, line: bytes) -> Reply:
        session = self.session
        session.next_hop.close()
        full = self.config.transparent_proxy is Transparency.FULL
        assert session.destination is not None  # (set before the first connection)
        session.upstream = await Upstream.connect(
            session.destination, self.config.timeout, self.context.outgoing,
            source=session.client_ip if full else None,
        )
        greeting = await session.upstream.read_reply()
        if greeting.code != 220:
            raise UpstreamError(f"server greeting on the second connection: {greeting.text}")
        return await session.upstream.command(line)

    async def smtp_AUTH(self, line: bytes, verb: bytes) -> None:
        """SASL passes through: relay the challenges and the client's answers as they come."""
        session = self.session
        if session.client_tls is not None and session.next_hop.ssl_object is None:
            # The client encrypted its password for a reason: it does not cross in clear.
            session.log.warning("AUTH refused: the connection to the next hop is not encrypted")
            await self.push(REPLY_AUTH_NEEDS_TLS)
            return
        await self._introduce_before(verb)
        upstream = self.session.next_hop
        reply = await upstream.command(line)
        while reply.code == 334:
            await self._push_reply(reply)
            try:
                answer = await self.channel.read_line(MAX_AUTH_LINE)
            except LineTooLong:
                answer = b"*"  # cancels the exchange at the next hop (RFC 4954 4)
                await upstream.command(answer)
                await self.push(REPLY_AUTH_LINE_TOO_LONG)
                return
            except TimeoutError:  # as at any other read: logged, and the client told
                self.session.log.warning("network read operation timed out (client)")
                await self._say_and_close(REPLY_TIMEOUT)
                raise ClientGone from None
            self.session.log.debug("CLIENT < [authentication data]")
            answer = answer.rstrip(b"\r\n")
            if b"\r" in answer or b"\n" in answer or b"\0" in answer:
                answer = b"*"  # a bare CR or LF (or a NUL) could end the line early there
            reply = await upstream.command(answer)
        if reply.code == 235:
            self.session.authenticated = True  # (SkipAuthenticated)
            self.session.log.info("client authenticated at the next hop")
        await self._push_reply(reply)
        await self._end_if_next_hop_left(reply)

    async def smtp_QUIT(self, line: bytes, verb: bytes) -> None:
        upstream = self.session.next_hop
        reply = await upstream.command(line)
        await self._push_reply(reply)
        if reply.code == 221 or reply.code == 421 or upstream.at_eof:
            self.close()  # (after a refused QUIT, e.g. 501 to "QUIT now", the session goes on)

    async def smtp_STARTTLS(self, line: bytes, verb: bytes) -> None:
        """ClientTLS: on: TLS with the proxy's certificate; the session goes on inside it."""
        session = self.session
        if self.config.client_tls is ClientTLS.PASSTHROUGH:
            await self._pass_starttls(line)
            return
        context = self.context.tls.server
        if context is None:
            await self.push(REPLY_NOT_IMPLEMENTED)
            return
        if session.client_tls is not None:
            await self.push(REPLY_TLS_ACTIVE)
            return
        if line.strip().upper() != b"STARTTLS":
            await self.push(REPLY_TLS_SYNTAX)
            return
        if self.envelope.mail_from is not None:
            await self.push(REPLY_TLS_IN_TRANSACTION)
            return
        await self.push(REPLY_TLS_READY)
        # No await between the 220 and the handshake: bytes the client sent behind STARTTLS
        # in clear are in the channel's buffer now, and it drops them (RFC 3207 section 6,
        # CVE-2011-0411).
        try:
            session.client_tls = await self.channel.start_tls(context, self.config.timeout)
        except (OSError, EOFError, TimeoutError) as e:
            metrics.TLS_HANDSHAKE_FAILURES.labels("client").inc()
            if isinstance(e, (TimeoutError, ConnectionAbortedError)):
                reason = "not completed within TimeOut"
            else:
                reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
            session.log.warning("TLS handshake with client failed: %s", reason)
            # asyncio calls no connection_lost() for a TLS session that never started
            self.channel.abort()
            self._release()
            raise ClientGone from None
        session.log.info("client TLS: %s", _version_cipher(session.client_tls))
        # RFC 3207 4.2: everything learnt before is forgotten; the client says EHLO again
        self.envelope = Envelope()
        session.host_name = None
        session.pipelining = False

    async def _pass_starttls(self, line: bytes) -> None:
        """ClientTLS: passthrough: the next hop answers the client's STARTTLS; after its 220 the
        two connections are spliced, and the proxy never sees that session's mail."""
        session = self.session
        if self.envelope.mail_from is not None:
            await self.push(REPLY_TLS_IN_TRANSACTION)
            return
        # XClient: on: after the splice the proxy sees no command, so the client must be
        # introduced now (a client that skipped HELO would reach the next hop as the proxy)
        await self._introduce_before(b"STARTTLS")
        upstream = session.next_hop
        reply = await upstream.command(line)
        if reply.code != 220:
            await self._push_reply(reply)
            await self._end_if_next_hop_left(reply)
            return
        next_hop = upstream.raw_streams()
        # as for ClientTLS: on, clear text the client sent behind STARTTLS is dropped
        self.channel.end_passthrough()
        session.passthrough = True
        session.log.info("STARTTLS passed through to the next hop: the session is spliced, "
                         "its mail is NOT scanned")
        await self._push_reply(reply)
        idle = False
        try:
            # (cancelled when the client's connection is lost: the session ends either way)
            _, _, idle = await splice(
                self.channel, StreamEnd(*next_hop), self.config.timeout
            )
        finally:
            if idle:
                session.log.warning("network operation timed out (spliced TLS session)")
            session.log.info("%s", summary(None, (), Unscanned.TLS.status))
            metrics.UNSCANNED.labels(Unscanned.TLS.value).inc()
            self.close()

    async def smtp_DATA(self, line: bytes, verb: bytes) -> None:
        """The message: our 354, then `DataPhase` spools, scans and forwards or refuses it."""
        envelope = self.envelope
        if not envelope.rcpt_tos:
            await self.push(REPLY_NEED_RCPT)
            return
        self.envelope = Envelope()  # whatever happens, the transaction ends here
        session = self.session
        phase = DataPhase(
            channel=self.channel, upstream=session.next_hop, scanner=self.context.scanner,
            actions=self.context.actions, config=self.config, log=session.log,
            infected=self.context.infected, envelope=envelope,
            sender=Sender(
                client_ip=session.client_ip, local_ip=session.local_ip,
                authenticated=session.authenticated, size_limit=session.size_limit,
                remote=session.xforward.get("ADDR"), remote_helo=session.xforward.get("HELO"),
                tls=session.tls_summary,
            ),
        )
        session.in_data = True
        try:
            reply = await phase.run()
        finally:
            session.in_data = False
            session.blocked = session.blocked or phase.blocked
        if phase.closing:
            self.close()
        elif reply is not None:
            await self._end_if_next_hop_left(reply)

    async def smtp_BDAT(self, line: bytes, verb: bytes) -> None:
        await self.push(REPLY_NOT_IMPLEMENTED)

    async def smtp_BURL(self, line: bytes, verb: bytes) -> None:
        """BURL (RFC 4468): the next hop would fetch the message from an IMAP server, so the
        proxy would never see it. Refused as BDAT is (and not advertised), even when the next
        hop offers it."""
        await self.push(REPLY_NOT_IMPLEMENTED)

    async def smtp_XCLIENT(self, line: bytes, verb: bytes) -> None:
        self.session.log.warning("client attempted use of privileged XCLIENT feature")
        await self.push(REPLY_XCLIENT)


# The verbs with a handler of their own; every other verb is relayed as it is (_relay).
_VERBS: dict[bytes, Callable[[RelaySession, bytes, bytes], Awaitable[None]]] = {
    verb[5:].encode(): method
    for verb, method in vars(RelaySession).items()
    if verb.startswith("smtp_")
}


def _version_cipher(tls: ssl.SSLObject | None) -> str:
    """`TLSv1.3, TLS_AES_256_GCM_SHA384` for the log line after a handshake."""
    if tls is None:  # (not after a handshake that went through)
        return "None, None"
    cipher = tls.cipher()
    return f"{tls.version()}, {cipher[0] if cipher else None}"
