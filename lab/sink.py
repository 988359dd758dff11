"""A real SMTP next hop that records what it receives and answers as a test scripts it.

It is aiosmtpd's threaded Controller on 127.0.0.1 with a small handler, as `ReceivingHandler` in
aiosmtpd's own test helpers, plus three knobs a proxy test needs:

    replies={"MAIL": "451 4.3.0 try later",              # any MAIL FROM
             "RCPT:bad@example.com": "550 5.1.1 no such user",  # one address only
             "DATA": "554 5.7.1 no"}                      # the reply after the final dot
    ehlo_extensions=["8BITMIME", "PIPELINING", "STARTTLS", "CHUNKING"]  # what EHLO advertises
    greeting="554 go away"                                # instead of "220 nexthop.test ..."
    tls_context=ssl_server_context                        # offer STARTTLS (aiosmtpd's own)
    auth_users={"alice": "secret"}                       # offer AUTH PLAIN/LOGIN, without TLS

Keys are a command (EHLO, HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, XCLIENT), or a command and
an address for MAIL and RCPT; case does not matter. `replies` may be changed while the server runs.
Accepted messages land in `.messages`, refused ones (scripted DATA reply) in `.rejected`.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

HOSTNAME = "nexthop.test"


@dataclass
class Received:
    """One mail transaction as the next hop saw it."""

    mail_from: str
    rcpt_tos: list[str]
    original_content: bytes  # the message as sent, after dot-unstuffing, CRLF line ends
    mail_options: list[str]
    rcpt_options: list[str]
    peer: tuple
    helo: str | None
    reply: str  # what the next hop answered after the final dot
    tls: str | None = None  # the TLS version the message came in over, None in clear
    time: float = field(default_factory=time.time)
    #: the ADDR= of the XCLIENT this session took (whom its access rules judged), else None
    xclient_addr: str | None = None

    @property
    def size(self) -> int:
        return len(self.original_content)

    def header(self, name: str) -> str | None:
        """The first header `name` of the message (None if absent), unfolded."""
        head = self.original_content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        prefix = name.lower() + ":"
        lines = head.split("\r\n")
        for i, line in enumerate(lines):
            if line.lower().startswith(prefix):
                value = line[len(prefix):]
                for cont in lines[i + 1:]:
                    if not cont[:1].isspace():
                        break
                    value += cont
                return value.strip()
        return None


class _Handler:
    def __init__(self, hop: RecordingNextHop) -> None:
        self.hop = hop

    def _scripted(self, command: str, address: str | None = None) -> str | None:
        replies = self.hop.replies
        if address is not None:
            reply = replies.get(f"{command}:{address.lower()}")
            if reply is not None:
                return reply
        return replies.get(command)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.hop._event(f"EHLO {hostname}")
        session.host_name = hostname
        reply = self._scripted("EHLO")
        if reply is not None:
            return [reply]
        if self.hop.ehlo_extensions is None:
            return responses
        lines = [f"250-{server.hostname}"] + [f"250-{ext}" for ext in self.hop.ehlo_extensions]
        return lines[:-1] + ["250 " + lines[-1][4:]]

    async def handle_HELO(self, server, session, envelope, hostname):
        self.hop._event(f"HELO {hostname}")
        session.host_name = hostname
        return self._scripted("HELO") or f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self._scripted("MAIL", address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self._scripted("RCPT", address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        reply = self._scripted("DATA") or "250 2.0.0 OK queued as lab"
        received = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            original_content=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            peer=session.peer,
            helo=session.host_name,
            reply=reply,
            xclient_addr=getattr(session, "xclient_addr", None),
            tls=session.ssl["ssl_object"].version() if session.ssl else None,
        )
        self.hop._record(received, accepted=reply.startswith("2"))
        return reply

    async def handle_RSET(self, server, session, envelope):
        self.hop._event("RSET")
        return self._scripted("RSET") or "250 OK"

    async def handle_NOOP(self, server, session, envelope, arg):
        self.hop._event("NOOP")
        return self._scripted("NOOP") or "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        return self._scripted("QUIT") or "221 Bye"


class _NextHopSMTP(SMTP):
    """aiosmtpd's SMTP that keeps its transport in a shared set (closed on stop) and can have
    its greeting replaced.

    A 220 greeting only changes the text. Any other one is a refusal (RFC 5321 3.1): a 421 is
    followed by closing the connection; after e.g. a 554 the server answers 503 to everything
    except QUIT.
    """

    def __init__(self, handler, *, greeting: str | None, open_transports: set, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self._greeting = greeting
        self._replace_next_push = greeting is not None and greeting.startswith("220")
        self._open_transports = open_transports
        self._own_transport = None

    def connection_made(self, transport) -> None:
        self._own_transport = transport
        self._open_transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        self._open_transports.discard(self._own_transport)
        super().connection_lost(error)

    async def push(self, status):
        inject = self.event_handler.hop.inject_after_starttls
        if inject and status.startswith("220 Ready to start TLS"):
            status += "\r\n" + inject  # a hostile next hop: clear text behind its 220
        if self._replace_next_push:  # the first push of a session is the greeting
            self._replace_next_push = False
            status = self._greeting
        await super().push(status)

    async def smtp_XCLIENT(self, arg: str) -> None:
        """Postfix's XCLIENT, when advertised: record it, then start over with a new greeting
        (Postfix forgets the HELO here, so a client must send it again)."""
        hop = self.event_handler.hop
        if not any(ext.upper().startswith("XCLIENT") for ext in hop.ehlo_extensions or ()):
            await self.push('500 Error: command "XCLIENT" not recognized')
            return
        hop._event(f"XCLIENT {arg}")
        scripted = hop.replies.get("XCLIENT")
        if scripted is not None and not scripted.startswith("220"):
            await self.push(scripted)
            return
        self._set_rset_state()
        self.session.xclient_addr = next(
            (word[5:] for word in arg.split() if word.upper().startswith("ADDR=")), None)
        self.session.host_name = None
        await self.push(f"220 {self.hostname} ESMTP lab next hop")

    async def _handle_client(self) -> None:
        if self._greeting is None or self._greeting.startswith("220"):
            await super()._handle_client()
            return
        await self.push(self._greeting)
        if not self._greeting.startswith("421"):
            while self.transport is not None:
                line = await self._reader.readline()
                if not line:
                    break
                if line.strip().upper() == b"QUIT":
                    await self.push("221 Bye")
                    break
                await self.push("503 5.5.1 Bad sequence of commands")
        if self.transport is not None:
            self.transport.close()


class _Controller(Controller):
    def __init__(self, handler, *, greeting: str | None, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self._greeting = greeting
        self._open_transports: set = set()

    def factory(self):
        return _NextHopSMTP(self.handler, greeting=self._greeting,
                                     open_transports=self._open_transports, **self.SMTP_kwargs)

    async def _close_connections(self) -> None:
        # Stop accepting without closing the listening socket yet: closing the server while
        # an accept is half done makes asyncio (3.11) leak that connection.
        for sock in self.server.sockets:
            self.loop.remove_reader(sock.fileno())
        for _ in range(10):  # let connections accepted just now reach connection_made()
            await asyncio.sleep(0)
        for transport in list(self._open_transports):
            transport.close()
        for _ in range(10):  # let connection_lost() and the session tasks run
            await asyncio.sleep(0)

    def stop(self, no_assert: bool = False) -> None:
        # aiosmtpd's stop() cancels the sessions' tasks but can leave their sockets open
        # (ResourceWarning): close the connections first, in the server's loop.
        if self._thread is not None:
            future = asyncio.run_coroutine_threadsafe(self._close_connections(), self.loop)
            future.result(timeout=5)
        super().stop(no_assert)

    def _trigger_server(self):
        # Learn the real port when asked for port 0, before the controller dials it.
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class RecordingNextHop:
    """An SMTP server on `host`:`port` (0 = a free port) that records each transaction."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        replies: Mapping[str, str] | None = None,
        ehlo_extensions: Iterable[str] | None = None,
        greeting: str | None = None,
        hostname: str = HOSTNAME,
        on_message: Callable[[Received], None] | None = None,
        tls_context: ssl.SSLContext | None = None,
        auth_users: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.replies: dict[str, str] = {}
        for key, reply in (replies or {}).items():
            self.set_reply(key, reply)
        self.ehlo_extensions = list(ehlo_extensions) if ehlo_extensions is not None else None
        self.greeting = greeting
        self.hostname = hostname
        self.on_message = on_message
        self.tls_context = tls_context
        #: lines sent in clear right behind the 220 to STARTTLS, in the same packet (a test of
        #: the CVE-2011-0411 class: they must never be read as replies)
        self.inject_after_starttls: str | None = None
        self.auth_users = dict(auth_users) if auth_users is not None else None
        self.messages: list[Received] = []
        self.rejected: list[Received] = []
        #: (time, "NOOP" | "RSET" | "EHLO name" | "HELO name" | "XCLIENT args"), in order
        self.events: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._controller: _Controller | None = None

    def set_reply(self, key: str, reply: str | None) -> None:
        """Script the reply for "COMMAND" or "COMMAND:address" (None: back to the default)."""
        command, sep, address = key.partition(":")
        key = command.upper() + sep + address.lower()
        if reply is None:
            self.replies.pop(key, None)
        else:
            self.replies[key] = reply

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> RecordingNextHop:
        controller = _Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname=self.hostname,
            greeting=self.greeting,
            data_size_limit=None,
            ident="ESMTP lab next hop",
            tls_context=self.tls_context,
            **self._auth_options(),
        )
        controller.start()
        self._controller = controller
        self.port = controller.port
        return self

    def _auth_options(self) -> dict:
        """aiosmtpd's own AUTH, over plain TCP (a lab: no TLS), against `auth_users`."""
        if self.auth_users is None:
            return {}
        users = self.auth_users

        def authenticate(server, session, envelope, mechanism, data) -> AuthResult:
            ok = (isinstance(data, LoginPassword)
                  and users.get(data.login.decode("utf-8", "replace")) == data.password.decode(
                      "utf-8", "replace"))
            self._event(f"AUTH {mechanism} {'ok' if ok else 'failed'}")
            return AuthResult(success=ok, handled=False)

        return {"authenticator": authenticate, "auth_require_tls": False}

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _event(self, what: str) -> None:
        with self._changed:
            self.events.append((time.time(), what))

    def event_names(self) -> list[str]:
        with self._changed:
            return [what for _, what in self.events]

    def _record(self, received: Received, *, accepted: bool) -> None:
        with self._changed:
            (self.messages if accepted else self.rejected).append(received)
            self._changed.notify_all()
        if accepted and self.on_message is not None:
            self.on_message(received)

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `n` messages were accepted; return a copy of `.messages`."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(
                    f"next hop accepted {len(self.messages)} message(s) in {timeout} s, "
                    f"expected {n} (refused: {len(self.rejected)})"
                )
            return list(self.messages)

    def clear(self) -> None:
        with self._changed:
            self.messages.clear()
            self.rejected.clear()

    def __enter__(self) -> RecordingNextHop:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RecordingNextHop {self.host}:{self.port} messages={len(self.messages)}>"
