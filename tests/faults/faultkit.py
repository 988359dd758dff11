"""Misbehaving peers for the fault tests: real sockets and threads, no mocks.

- `FakeSMTPServer`: a raw-socket SMTP next hop that records every byte it receives and can be
  armed to refuse, hang, close or answer with monster replies at any stage, for the next
  `faulty_sessions` connections (later ones behave, so a test can check the proxy still serves).
  `mode` says what it takes for a line ending: "crlf" (strict, as RFC 5321), "lf" (splits on
  b"\\n", as the lenient servers of the 2023 SMTP-smuggling reports) or "any" (CR, LF or CRLF).
- `FakeClamd`: a unix-socket clamd that answers PING, then misbehaves on the first `faulty`
  INSTREAM scans (never answers, answers late, closes mid-stream, answers garbage) and relays
  later ones to a real clamd.

Both are context managers, expose what they saw, and stop their threads on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import smtplib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Self

HANG = "<hang>"  # read on, never answer
CLOSE = "<close>"  # close the connection instead of answering
RESET = "<reset>"  # close with a TCP RST (SO_LINGER 0) instead of answering

WAIT = 10.0  # default wait_* timeout


class ThenClose(str):
    """A reply to send, after which the next hop closes the connection at once: the reply and
    the FIN travel in one segment, as they do from a real server that closes quickly."""


def rst_close(sock: socket.socket) -> None:
    """Close `sock` with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the next hop ------------------------------------------------------------------------------


@dataclass
class Transaction:
    mail_from: bytes
    rcpts: list[bytes] = field(default_factory=list)
    data: bytes = b""  # the DATA bytes exactly as they came (still dot-stuffed, no end line)
    content: bytes = b""  # the same, dot-unstuffed (line endings as they came)
    complete: bool = False  # the end-of-data line was seen
    reply: str = ""  # what was answered to the end of data


@dataclass
class Session:
    index: int
    raw: bytearray = field(default_factory=bytearray)  # every byte received, in order
    reads: list[bytes] = field(default_factory=list)  # the same, as each recv() returned it
    commands: list[bytes] = field(default_factory=list)  # command lines, without line ending
    transactions: list[Transaction] = field(default_factory=list)
    ended: str = ""  # "quit", "peer closed", "we closed", "stopped"


_MODES = {
    "crlf": re.compile(rb"\r\n"),
    "lf": re.compile(rb"\n"),
    "any": re.compile(rb"\r\n|\r|\n"),
}

DEFAULT_EHLO = ("250-fake.test", "250-8BITMIME", "250 SIZE 200000000")


class _Closed(Exception):
    pass


class _Listening:
    """What both fakes share: a listening socket whose accept loop runs in a thread, and the
    connections and threads that `stop()` shuts down. A subclass passes the lock it guards
    `_conns` with, and defines `start()` (which calls `_listen()`) and `_take()`."""

    def __init__(self, guard: threading.Lock | threading.Condition) -> None:
        self._guard = guard  # guards _conns
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()

    def start(self) -> Self:
        raise NotImplementedError

    def _take(self, conn: socket.socket) -> threading.Thread:
        """Register the accepted `conn` (in `_conns`, under the lock); the thread to serve it."""
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = self._take(conn)
            thread.start()
            self._threads.append(thread)

    def _listen(self, listener: socket.socket, name: str) -> None:
        """Serve `listener` from now on: its accept loop runs in a daemon thread `name`."""
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._guard:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeSMTPServer(_Listening):
    """A scripted SMTP server on 127.0.0.1:<free port>.

    It behaves until `arm()`: the `appliance` fixture's readiness probe opens a session here
    too, and that one must not take the fault. `arm(script, ...)` waits for the sessions so far
    to end, then applies to the next `faulty_sessions` sessions.

    `script` keys: "greeting", "EHLO", "HELO", "MAIL", "RCPT", "DATA" (the DATA command),
    "DOT" (the reply after the end of data), "NOOP", "RSET", "QUIT", "*" (other verbs), or
    "EHLO name" / "HELO name" (that greeting only, before the plain "EHLO" entry). A value
    is a reply (a string, or a list of lines) or HANG / CLOSE / RESET. Each entry is used once
    (the first time it applies) unless `repeat`.
    `close_in_body_after=n`: drop the connection (RST if `reset_in_body`) once n body bytes came.
    """

    def __init__(
        self,
        *,
        mode: str = "crlf",
        ehlo: tuple[str, ...] | list[str] = DEFAULT_EHLO,
        max_data: int | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.splitter = _MODES[mode]
        self.mode = mode
        self.ehlo = list(ehlo)
        self.max_data = max_data
        self.script: dict = {}
        self.repeat = False
        self.close_in_body_after: int | None = None
        self.reset_in_body = False
        self.armed_at: int | None = None  # index of the first faulty session
        self.faulty_sessions = 0
        self._used: set[str] = set()  # answer 552 after the dot to a body larger than this
        self.sessions: list[Session] = []
        self._cond = threading.Condition()
        super().__init__(self._cond)
        self._queued = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> FakeSMTPServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listen(listener, "fake-smtp-accept")
        return self

    def arm(self, script: dict | None = None, *, faulty_sessions: int = 1, repeat: bool = False,
            close_in_body_after: int | None = None, reset_in_body: bool = False) -> None:
        """Misbehave as told in the next `faulty_sessions` sessions (after the probe's)."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self.sessions and all(s.ended for s in self.sessions), WAIT
            ):
                raise AssertionError("the appliance's probe session never reached the next hop "
                                     "or never ended")
            self.script = dict(script or {})
            self.repeat = repeat
            self.close_in_body_after = close_in_body_after
            self.reset_in_body = reset_in_body
            self._used.clear()
            self.armed_at = len(self.sessions)
            self.faulty_sessions = faulty_sessions

    def disarm(self) -> None:
        """Behave again, from the next command on."""
        with self._cond:
            self.faulty_sessions = 0
            self.close_in_body_after = None

    def armed_session(self, timeout: float = WAIT) -> Session:
        """The first session that got the fault."""
        assert self.armed_at is not None, "arm() was not called"
        return self.wait_sessions(self.armed_at + 1, timeout)[self.armed_at]

    def _faulty(self, session: Session) -> bool:
        return (self.armed_at is not None
                and self.armed_at <= session.index < self.armed_at + self.faulty_sessions)

    # -- what it saw -------------------------------------------------------------------------

    def transactions(self, complete_only: bool = True) -> list[Transaction]:
        with self._cond:
            return [t for s in self.sessions for t in s.transactions
                    if t.complete or not complete_only]

    def delivered(self) -> list[Transaction]:
        """Transactions that ended with a 2xx after the end of data."""
        return [t for t in self.transactions() if t.reply.startswith("2")]

    def wait_sessions(self, n: int, timeout: float = WAIT) -> list[Session]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sessions) >= n, timeout):
                raise AssertionError(f"fake next hop saw {len(self.sessions)} connection(s), "
                                     f"expected {n}")
            return list(self.sessions)

    def wait_ended(self, index: int, timeout: float = WAIT) -> Session:
        with self._cond:
            if not self._cond.wait_for(
                lambda: len(self.sessions) > index and self.sessions[index].ended, timeout
            ):
                raise AssertionError(f"fake next hop session {index} did not end")
            return self.sessions[index]

    def wait_delivered(self, n: int, timeout: float = WAIT) -> list[Transaction]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.delivered()) >= n, timeout):
                raise AssertionError(f"fake next hop has {len(self.delivered())} message(s), "
                                     f"expected {n}")
            return self.delivered()

    # -- serving -----------------------------------------------------------------------------

    def _take(self, conn: socket.socket) -> threading.Thread:
        with self._cond:
            session = Session(len(self.sessions))
            self.sessions.append(session)
            self._conns.add(conn)
            self._cond.notify_all()
        return threading.Thread(target=self._serve, args=(conn, session), daemon=True,
                                name=f"fake-smtp-{session.index}")

    def _reply_for(self, session: Session, key: str, default):
        with self._cond:
            if (self._faulty(session) and key in self.script
                    and (self.repeat or key not in self._used)):
                self._used.add(key)
                return self.script[key]
        return default

    def _serve(self, conn: socket.socket, session: Session) -> None:
        conn.settimeout(60)
        buf = bytearray()
        how = "stopped"
        try:
            how = self._dialogue(conn, session, buf)
        except _Closed as closed:
            how = str(closed)
        except OSError:
            how = "peer closed"
        finally:
            with self._cond:
                session.ended = how
                self._conns.discard(conn)
                self._cond.notify_all()
            if how != "we reset":
                conn.close()

    def _recv(self, conn: socket.socket, session: Session, buf: bytearray) -> None:
        if self._stop.is_set():
            raise _Closed("stopped")
        chunk = conn.recv(65536)
        if not chunk:
            raise _Closed("peer closed")
        with self._cond:
            session.raw += chunk
            session.reads.append(chunk)
        buf += chunk

    def _line(self, conn, session, buf) -> tuple[bytes, bytes]:
        """The next line and its terminator, per `mode`."""
        while True:
            match = self.splitter.search(buf)
            # in "any" mode a CR at the very end may be the first half of a CRLF: wait
            if match and not (self.mode == "any" and match.group() == b"\r"
                              and match.end() == len(buf)):
                line, ending = bytes(buf[:match.start()]), match.group()
                del buf[:match.end()]
                if self.mode == "lf" and line.endswith(b"\r"):
                    line, ending = line[:-1], b"\r\n"
                return line, ending
            self._recv(conn, session, buf)

    def _send(self, conn, reply) -> None:
        if isinstance(reply, ThenClose):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # held until the FIN joins
            conn.sendall(reply.encode() + b"\r\n")
            conn.shutdown(socket.SHUT_WR)
            raise _Closed("we closed")
        if reply == HANG:
            return
        if reply == CLOSE:
            raise _Closed("we closed")
        if reply == RESET:
            rst_close(conn)
            raise _Closed("we reset")
        if isinstance(reply, list | tuple):
            reply = "\r\n".join(reply)
        conn.sendall(reply.encode() + b"\r\n")

    def _hang(self, conn, session, buf) -> None:
        while True:  # never answer; notice when the peer gives up
            self._recv(conn, session, buf)

    def _dialogue(self, conn, session, buf) -> str:
        greeting = self._reply_for(session, "greeting", "220 fake.test ESMTP fake next hop")
        if greeting == HANG:
            self._hang(conn, session, buf)
        self._send(conn, greeting)
        txn: Transaction | None = None
        n_delivered = 0
        while True:
            line, _ = self._line(conn, session, buf)
            with self._cond:
                session.commands.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            key = verb.decode("ascii", "replace")
            if verb == b"EHLO":
                default = list(self.ehlo)
            elif verb == b"HELO":
                default = "250 fake.test"
            elif verb == b"MAIL":
                if txn is not None:
                    default = "503 5.5.1 Error: nested MAIL command"
                else:
                    default = "250 2.1.0 OK"
            elif verb == b"RCPT":
                default = "250 2.1.5 OK" if txn is not None else "503 5.5.1 Error: need MAIL"
            elif verb == b"DATA":
                default = ("354 End data with <CR><LF>.<CR><LF>" if txn and txn.rcpts
                           else "503 5.5.1 Error: need RCPT command")
            elif verb in (b"RSET", b"NOOP"):
                default = "250 2.0.0 OK"
            elif verb == b"QUIT":
                default = "221 2.0.0 Bye"
            else:
                key = "*"
                default = "500 5.5.2 Error: command not recognized"
            if verb in (b"EHLO", b"HELO"):  # "EHLO client.test": for that name only
                default = self._reply_for(session, line.decode("ascii", "replace"), default)
            reply = self._reply_for(session, key, default)
            if reply == HANG:
                self._hang(conn, session, buf)
            code_ok = isinstance(reply, str) and reply[:1] in ("2", "3")
            if verb == b"MAIL" and code_ok:
                txn = Transaction(mail_from=line[10:].strip() if len(line) > 10 else b"")
                with self._cond:
                    session.transactions.append(txn)
            elif verb == b"RCPT" and code_ok and txn is not None:
                txn.rcpts.append(line[8:].strip())
            elif verb in (b"RSET", b"HELO", b"EHLO") and code_ok:
                txn = None
            self._send(conn, reply)
            if verb == b"QUIT" and code_ok:
                return "quit"
            if verb == b"DATA" and isinstance(reply, str) and reply.startswith("354"):
                self._read_data(conn, session, buf, txn)
                if self.max_data is not None and len(txn.content) > self.max_data:
                    default = "552 5.3.4 Message size exceeds fixed limit"
                else:
                    n_delivered += 1
                    default = f"250 2.0.0 Ok: queued as FAKE{session.index}x{n_delivered}"
                reply = self._reply_for(session, "DOT", default)
                with self._cond:
                    txn.complete = True
                    txn.reply = reply if isinstance(reply, str) else str(reply)
                    self._cond.notify_all()
                txn = None
                if reply == HANG:
                    self._hang(conn, session, buf)
                self._send(conn, reply)

    def _read_data(self, conn, session, buf, txn: Transaction) -> None:
        limit = self.close_in_body_after if self._faulty(session) else None
        data, content = bytearray(), bytearray()
        while True:
            if limit is not None and len(data) + len(buf) >= limit:
                with self._cond:
                    txn.data, txn.content = bytes(data), bytes(content)
                if self.reset_in_body:
                    rst_close(conn)
                    raise _Closed("we reset")
                raise _Closed("we closed")
            if limit is not None and not self.splitter.search(buf):
                self._recv(conn, session, buf)  # count partial lines toward the limit too
                continue
            line, ending = self._line(conn, session, buf)
            if line == b".":
                break
            data += line + ending
            content += (line[1:] if line.startswith(b".") else line) + ending
        with self._cond:
            txn.data, txn.content = bytes(data), bytes(content)


# -- clamd -------------------------------------------------------------------------------------


class FakeClamd(_Listening):
    """A clamd that misbehaves on its first `faulty` scans, on a unix socket in `workdir` (or,
    with `tcp=True`, on 127.0.0.1:<free port>). `socket_path` is what ClamAddress should say.

    behaviour:
      "silent"        read the whole stream, never answer (until the scanner gives up)
      "slow"          read the whole stream, answer `reply` after `delay` seconds
      "close_mid"     close after `after` bytes of the stream (with an RST if `reset`, over TCP)
      "half_close_mid"  after `after` bytes, shut down its sending side (a FIN: "no reply will
                      come") but keep draining the stream, so the scanner's writes all succeed
      "close_at_end"  read the whole stream, then close without a word (a crash mid-scan)
      "reply"         read the whole stream, answer `reply` (bytes), close
      "trickle"       read the whole stream, answer `reply` one byte every `delay` seconds
    Later scans, and PING at any time, go to the real clamd at `relay_to` (a unix socket).
    """

    def __init__(self, workdir, *, behaviour: str, faulty: int = 1, relay_to: str | None = None,
                 reply: bytes = b"stream: OK\n", delay: float = 0.0, after: int = 1 << 16,
                 reset: bool = False, tcp: bool = False) -> None:
        self.tcp = tcp
        self.socket_path = os.path.join(str(workdir), "fake-clamd.sock")
        self.behaviour = behaviour
        self.faulty = faulty
        self.relay_to = relay_to
        self.reply = reply
        self.delay = delay
        self.after = after
        self.reset = reset
        self.scans = 0  # INSTREAM connections seen
        self.pings = 0
        self.stream_bytes: list[int] = []  # bytes of the stream read, per faulty scan
        self.client_gave_up: list[bool] = []  # per faulty scan: the scanner closed first
        self.faulty_done = threading.Event()  # a faulty scan's connection is over
        self._lock = threading.Lock()
        super().__init__(self._lock)

    def start(self) -> FakeClamd:
        if self.tcp:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            self.socket_path = f"127.0.0.1:{listener.getsockname()[1]}"
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.socket_path)
        listener.listen(32)
        self._listen(listener, "fake-clamd")
        return self

    def stop(self) -> None:
        super().stop()
        if not self.tcp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def _take(self, conn: socket.socket) -> threading.Thread:
        with self._lock:
            self._conns.add(conn)
        return threading.Thread(target=self._serve, args=(conn,), daemon=True)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        keep = False
        try:
            keep = self._handle(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            if not keep:
                conn.close()

    @staticmethod
    def _read_command(conn, buf: bytearray) -> bytes | None:
        while not re.search(rb"[\n\0]", buf):
            chunk = conn.recv(4096)
            if not chunk:
                return None
            buf += chunk
        end = re.search(rb"[\n\0]", buf).end()
        command = bytes(buf[:end])
        del buf[:end]
        return command

    def _handle(self, conn: socket.socket) -> bool:
        """Serve one connection; True if it was already closed (with an RST)."""
        buf = bytearray()
        command = self._read_command(conn, buf)
        if command is None:  # pyclamd's constructor only connects and closes
            return False
        name = command[1:-1]
        if name == b"PING":
            with self._lock:
                self.pings += 1
            conn.sendall(b"PONG" + command[-1:])
            return False
        with self._lock:
            index = self.scans
            self.scans += 1
        if name != b"INSTREAM" or index >= self.faulty:
            self._relay(conn, command + bytes(buf))
            return False
        try:
            return self._misbehave(conn, buf)
        finally:
            self.faulty_done.set()

    def _misbehave(self, conn: socket.socket, buf: bytearray) -> bool:
        got = len(buf)
        gave_up = False

        def fill(size: int) -> bool:
            """Read until `buf` holds `size` bytes; False if the peer closed first."""
            nonlocal got
            while len(buf) < size:
                chunk = conn.recv(65536)
                if not chunk:
                    return False
                buf.extend(chunk)
                got += len(chunk)
            return True

        try:
            if self.behaviour in ("close_mid", "half_close_mid"):
                while got < self.after:
                    chunk = conn.recv(min(65536, self.after - got))
                    if not chunk:
                        gave_up = True
                        return False
                    got += len(chunk)
                if self.behaviour == "half_close_mid":
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        pass
                    return False
                if self.reset:
                    rst_close(conn)
                    return True
                return False
            while True:  # the whole stream: <4-byte length><payload> ... <0000>
                if not fill(4):
                    gave_up = True
                    return False
                (length,) = struct.unpack("!L", bytes(buf[:4]))
                if length == 0:
                    break
                if not fill(4 + length):
                    gave_up = True
                    return False
                del buf[: 4 + length]
            if self.behaviour == "silent":
                while conn.recv(4096):
                    pass
                gave_up = True
                return False
            if self.behaviour == "close_at_end":
                return False
            if self.behaviour == "slow" and self._stop.wait(self.delay):
                return False
            if self.behaviour == "trickle":
                for byte in self.reply:
                    if self._stop.wait(self.delay):
                        return False
                    conn.sendall(bytes([byte]))
                return False
            conn.sendall(self.reply)
            return False
        except OSError:
            gave_up = True
            return False
        finally:
            with self._lock:
                self.stream_bytes.append(got)
                self.client_gave_up.append(gave_up)

    def _relay(self, conn: socket.socket, first: bytes) -> None:
        if self.relay_to is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as real:
            real.settimeout(30)
            real.connect(self.relay_to)
            real.sendall(first)
            peer = {conn: real, real: conn}
            with selectors.DefaultSelector() as selector:
                for sock in peer:
                    selector.register(sock, selectors.EVENT_READ)
                open_ends = 2
                deadline = time.monotonic() + 60
                while open_ends and time.monotonic() < deadline:
                    for key, _ in selector.select(1.0):
                        src = key.fileobj
                        data = src.recv(65536)
                        if data:
                            peer[src].sendall(data)
                            continue
                        selector.unregister(src)
                        open_ends -= 1
                        with contextlib.suppress(OSError):
                            peer[src].shutdown(socket.SHUT_WR)


# -- client side -------------------------------------------------------------------------------


def clean_message(token: str) -> bytes:
    return (f"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: {token}\r\n"
            f"\r\nA clean message, {token}.\r\n").encode()


def delivered_contents(hop) -> list[bytes]:
    """What a next hop (RecordingNextHop or FakeSMTPServer) accepted, as message contents."""
    if isinstance(hop, FakeSMTPServer):
        return [t.content for t in hop.delivered()]
    return [m.original_content for m in hop.messages]


def assert_no_spool_files(appliance, timeout: float = 5.0) -> None:
    """The spool is empty now, while the daemon runs (its shutdown must not be what cleans up)."""
    deadline = time.monotonic() + timeout
    while appliance.spool_files():
        if time.monotonic() > deadline:
            raise AssertionError(f"spool files left behind: {appliance.spool_files()}")
        time.sleep(0.05)


def assert_still_serving(appliance, hop, token: str = "still-serving") -> None:
    """One more clean message, on a new connection, reaches the next hop exactly once."""
    assert appliance.proc.poll() is None, "the daemon died"
    token = f"{token}-{time.time_ns()}"
    with smtplib.SMTP(appliance.host, appliance.port, local_hostname="client.test",
                      timeout=30) as client:
        client.sendmail("alice@example.com", ["bob@example.com"], clean_message(token))
    deadline = time.monotonic() + 10
    while True:
        found = [c for c in delivered_contents(hop) if token.encode() in c]
        if found:
            break
        if time.monotonic() > deadline:
            raise AssertionError("the follow-up clean message did not reach the next hop")
        time.sleep(0.05)
    assert len(found) == 1, "the follow-up message arrived more than once"
    assert_no_spool_files(appliance)
    assert "Traceback" not in appliance.log(), appliance.log()[-3000:]
