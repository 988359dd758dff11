"""Property tests of the SMTP session, against ONE running daemon (see conftest.py).

Hypothesis writes whole client sessions: valid verbs with random arguments and letter case,
random bytes (NUL, 8-bit, bare CR, odd line endings), overlong lines around the 4222-byte limit
and far past it, DATA with random bodies (dot lines, the SMTP-smuggling end-of-data lookalikes,
bare CR/LF, NUL, long lines, now and then the EICAR string) and commands pipelined behind the
end of data, RSET/NOOP/QUIT, AUTH PLAIN/LOGIN with continuation lines. Each session goes over a
raw socket, one line at a time, and every reply is checked as it comes:

- the daemon never crashes: the process is alive after each session, and its log has no
  "Traceback" nor "unexpected error";
- it never hangs: each line gets its reply within TimeOut (3 s) + 2 s;
- every reply line is well formed (3 digits, then " " or "-", CRLF at the end, no bare LF),
  and the lines of a multi-line reply share one code;
- exactly one reply per line: the session ends with QUIT, whose 221 must be the very next reply
  and must be followed by the end of the connection (a reply too many would show there);
- a session may end early only after a reply that says so (221, 421, 451, or the reply to a
  QUIT), never with a line unanswered;
- no spool file remains after the session;
- a message the next hop accepted is exactly what the client meant: dot-unstuffed, bare CR and
  LF turned into CRLF, the scan header inserted, nothing else (so CRLF line endings only, and no
  end-of-data the proxy did not see); an infected one gets the virus reply and never arrives.

The same decoding is then checked without the daemon: `DataDecoder` against a plain reference
model, fed in random chunkings, and the pure `appliance.dialogue` functions on arbitrary bytes.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import time

import replies as R
from fuzzkit import BAD_LOG, PASSWORD, STATS, TIMEOUT, USER
from helpers import starttls
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from appliance.dialogue import ehlo_size, envelope_address, filter_ehlo, xforward_attributes
from appliance.dotstuff import DataDecoder, normalise_line_endings, stuff
from lab import EICAR

#: Sessions per run: about 60-90 s for this file on the 2-core CI machine (see docs).
SESSIONS = int(os.environ.get("CLAMSMTP_FUZZ_SESSIONS", "1200"))
REPLY_WAIT = TIMEOUT + 2.0  # seconds a line may wait for its reply
MAX_LINE = 4222  # a command line this long (line ending included) is refused
HOP_LINE_LIMIT = 1001  # aiosmtpd (the next hop) refuses DATA lines longer than this, CRLF included
SCAN_HEADER = b"X-Virus-Scanned: ClamAV using ClamSMTP\r\n"
DISCARDED = b"250 Virus Detected; Discarded Email"
DELIVERED = b"250 2.0.0 OK queued as lab"
HOP_TOO_LONG = b"500 Line too long (see RFC5321 4.5.3.1.6)"
REPLY_LINE = re.compile(rb"\A(\d{3})([ -])[^\n]*\r\n\Z")

# -- the reference model of DATA transparency ------------------------------------------------

END_OF_DATA = b"\r\n.\r\n"


def reference_decode(wire: bytes) -> tuple[bytes, bytes] | None:
    """(message content, what follows the end of data) as RFC 5321 4.5.2 and the project's
    policy define it, or None if `wire` has no end of data: the data ends at the first
    CRLF "." CRLF (counting the CRLF before the body), a dot that starts a line is removed, and
    then every bare CR and bare LF is a CRLF."""
    at = (b"\r\n" + wire).find(END_OF_DATA)
    if at < 0:
        return None
    lines = wire[:at].split(b"\r\n")
    content = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return re.sub(rb"\r\n|\r|\n", b"\r\n", content), wire[at + 3:]


def with_scan_header(content: bytes) -> bytes:
    """Where the proxy adds its header: after the header section (at its empty line), or
    first when there is none."""
    if content.startswith(b"\r\n"):
        at = 0
    else:
        end = content.find(b"\r\n\r\n")
        at = end + 2 if end >= 0 else 0
    return content[:at] + SCAN_HEADER + content[at:]


def hop_refuses_long_line(message: bytes) -> bool:
    wire = b"".join(stuff([message]))
    return any(len(line) + 2 > HOP_LINE_LIMIT for line in wire.split(b"\r\n"))


def safe_body(body: bytes) -> bytes:
    """`body` with every CRLF "." CR changed to CRLF ".x" CR: no end of data inside it, nor one
    made with the terminator appended (see `terminated`)."""
    framed = b"\r\n" + body + b"\r\n"
    while b"\r\n.\r" in framed:
        framed = framed.replace(b"\r\n.\r", b"\r\n.x\r")
    return framed[2:-2]


def terminated(body: bytes) -> bytes:
    return body + (b".\r\n" if body == b"" or body.endswith(b"\r\n") else END_OF_DATA)


# -- strategies --------------------------------------------------------------------------------

ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r\r\n", b" \r\n", b"\t\n"])
CASES = st.sampled_from([bytes.upper, bytes.lower, bytes.title, bytes.swapcase])
NO_LF = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))
TEXT = st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=40).map(
    str.encode)
ADDRESS = st.one_of(
    st.sampled_from([b"<alice@example.com>", b"<bob@example.com>", b"<>", b"<carol@example.test>",
                     b"bob@example.com", b"<@route:x@y>", b"<a b@c>", b"<\"q\"@example.com>"]),
    TEXT.map(lambda t: b"<" + t + b">"),
    NO_LF,
)
PARAMS = st.sampled_from([b"", b"", b" SIZE=100", b" BODY=8BITMIME", b" SMTPUTF8",
                          b" NOTIFY=NEVER", b" X=\xff", b" AUTH=<>"])


def _short(value) -> str:
    if isinstance(value, bytes) and len(value) > 200:
        return f"<{len(value)} bytes: {value[:60]!r}...{value[-20:]!r}>"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return repr(value)


class Step(tuple):
    """One step of a session; printed short (a 70 kB line is not worth a 70 kB report)."""

    def __repr__(self) -> str:
        return "(" + ", ".join(_short(v) for v in self) + ")"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@st.composite
def command_line(draw) -> bytes:
    """One command line: a verb (any letter case) and plausible or random arguments."""
    verb = draw(st.sampled_from([
        b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"EXPN", b"HELP",
        b"STARTTLS", b"BDAT", b"XCLIENT", b"XFORWARD", b"ETRN", b"DATA", b"TURN", b"FOO"]))
    verb = draw(CASES)(verb)
    upper = verb.upper()
    if upper in (b"EHLO", b"HELO"):
        args = draw(st.sampled_from([b" client.test", b" [192.0.2.1]", b"", b" x y"]) | NO_LF)
    elif upper == b"MAIL":
        args = b" FROM:" + draw(ADDRESS) + draw(PARAMS)
    elif upper == b"RCPT":
        args = b" TO:" + draw(ADDRESS) + draw(PARAMS)
    elif upper == b"XFORWARD":
        args = draw(st.sampled_from([b" ADDR=192.0.2.7 HELO=x", b" ADDR=[UNAVAILABLE]", b" ="]))
    elif upper == b"BDAT":
        args = draw(st.sampled_from([b" 10 LAST", b" 0", b""]))
    else:
        args = draw(st.sampled_from([b"", b"", b" x"]) | NO_LF)
    return verb + args + draw(ENDINGS)


@st.composite
def overlong_line(draw) -> bytes:
    """A line just under, at or over the limit, or far over it (never buffered whole)."""
    total = draw(st.integers(MAX_LINE - 3, MAX_LINE + 3) | st.sampled_from([9000, 70_000]))
    head = draw(st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"X", b"AUTH PLAIN "]))
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    return head + b"a" * (total - len(head) - len(ending)) + ending


RAW_LINE = st.tuples(NO_LF, ENDINGS).map(b"".join)

BODY_TOKENS = st.sampled_from([
    b"Subject: fuzz\r\n", b"From: alice@example.com\r\n", b"\r\n\r\n", b"text", b" ", b"\r\n",
    b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.", b"\r\n..", b"\n.\n", b"\r.\r", b"\n.\r\n",
    b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\x00", b"\xff\xfe\x80", b"\t",
    b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n",
    b"QUIT\r\n", b"=2E\r\n", b"\r\n\r\n.\r\n\r\n",
])


@st.composite
def message_body(draw) -> bytes:
    parts = draw(st.lists(BODY_TOKENS | st.binary(max_size=30), max_size=40))
    if draw(st.integers(0, 9)) == 0:  # now and then a line too long for the next hop
        parts.insert(draw(st.integers(0, len(parts))), b"L" * draw(st.integers(990, 1200)))
    if draw(st.integers(0, 7)) == 0:  # now and then a virus
        parts.insert(draw(st.integers(0, len(parts))), b"\r\n" + EICAR + b"\r\n")
    return safe_body(b"".join(parts))


#: Commands that may follow the end of data in the same write (pipelined).
TAILS = st.sampled_from([b"", b"", b"NOOP\r\n", b"RSET\r\nNOOP\r\n", b"QUIT\r\n"])


def data_step(body=message_body()):  # noqa: B008 - a strategy, built once
    return st.builds(lambda case, body, tail, pieces: Step(("data", case(b"DATA") + b"\r\n",
                                                            body, tail, pieces)),
                     CASES, body, TAILS, st.integers(1, 3))


AUTH_ANSWER = st.one_of(
    st.sampled_from([b"*", b"", b"not base64!", base64.b64encode(USER), base64.b64encode(PASSWORD),
                     base64.b64encode(b"wrong")]),
    NO_LF,
    # SASL lines may be longer than commands (RFC 4954: 12288 octets): relayed as they are.
    # Past the proxy's 128 KiB reader limit: "500 5.5.6" and "*" to the next hop. (Not between
    # 64 and 128 KiB: aiosmtpd, the next hop here, answers such a line twice.)
    st.sampled_from([MAX_LINE - 3, MAX_LINE, 12288, 200_000]).map(lambda n: b"QUFB" * (n // 4)),
)


@st.composite
def auth_step(draw):
    mechanism = draw(st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b""]))
    initial = draw(st.sampled_from([b"", b" =", b" " + base64.b64encode(b"\0" + USER + b"\0"
                                                                       + PASSWORD),
                                    b" " + base64.b64encode(b"\0x\0y"), b" !!"]))
    answers = draw(st.lists(AUTH_ANSWER, max_size=3))
    good_login = [base64.b64encode(USER), base64.b64encode(PASSWORD)]
    if draw(st.booleans()):
        answers = good_login if mechanism.upper() == b"LOGIN" else answers
    return Step(("auth", b"AUTH " + mechanism + initial + b"\r\n",
                 [a + b"\r\n" for a in answers]))


def line_step(line=command_line()):  # noqa: B008
    return line.map(lambda line: Step(("line", line)))


def _plain_command(line: bytes) -> bool:
    """Not a verb that makes the proxy wait for more than one line (a pipelined batch must
    get exactly one reply per line)."""
    verb = line.split(None, 1)[0].upper() if line.strip() else b""
    return verb not in (b"DATA", b"AUTH", b"QUIT")


#: Several lines in one write (pipelining, though not offered): bare LF ends a line too.
BATCH = st.lists(command_line() | RAW_LINE | overlong_line(), min_size=2, max_size=5).map(
    lambda lines: Step(("batch", b"".join(ln for ln in lines if _plain_command(ln))
                        or b"NOOP\r\n")))


ENVELOPE = [("line", b"EHLO client.test\r\n"), ("line", b"MAIL FROM:<alice@example.com>\r\n"),
            ("line", b"RCPT TO:<bob@example.com>\r\n")]

#: A step is ("line", line) | ("data", DATA line, body, pipelined tail, pieces) |
#: ("auth", AUTH line, continuation lines) | ("batch", lines) | ("txn", steps)
STEP = st.one_of(
    line_step(),
    line_step(),
    line_step(RAW_LINE),
    line_step(overlong_line()),
    data_step(),
    auth_step(),
    BATCH,
    data_step().map(lambda data: Step(("txn", [*ENVELOPE, data]))),
    data_step().map(lambda data: Step(("txn", [*ENVELOPE, data]))),
)
SESSION = st.lists(STEP, min_size=1, max_size=8)


def flat(steps):
    for step in steps:
        if step[0] == "txn":
            yield from step[1]
        else:
            yield step


# -- the client --------------------------------------------------------------------------------


class SessionClosed(Exception):
    pass


class Client:
    """A raw SMTP client that reads and checks replies exactly as they come."""

    def __init__(self, address) -> None:
        self.sock = socket.create_connection(address, timeout=REPLY_WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.transcript: list[tuple[str, bytes]] = []
        self.last: bytes = b""  # the last reply, all its lines

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, pieces: int = 1) -> None:
        self.transcript.append(("C", data[:300]))
        step = max(1, -(-len(data) // pieces))
        try:
            for i in range(0, len(data), step):
                self.sock.sendall(data[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reply read next says what happened

    def _line(self, what: str) -> bytes | None:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return line
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no reply within {REPLY_WAIT} s to {what}") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self.buf, f"the connection ended inside a reply line: {self.buf!r}"
                return None
            self.buf += chunk

    def reply(self, what: str) -> bytes:
        """One whole reply (every line, CRLFs included); SessionClosed at a clean EOF."""
        lines: list[bytes] = []
        while True:
            line = self._line(what)
            if line is None:
                assert not lines, f"the connection ended inside a reply: {lines!r}"
                raise SessionClosed
            match = REPLY_LINE.match(line)
            assert match, f"malformed reply line {line[:200]!r} to {what}"
            assert not lines or line[:3] == lines[0][:3], f"code changed mid-reply: {lines!r}"
            lines.append(line)
            if match.group(2) == b" ":
                break
        self.last = b"".join(lines)
        self.transcript.append(("S", self.last[:300]))
        STATS.replies += 1
        return self.last


def may_close_after(reply: bytes, line: bytes) -> bool:
    """A reply after which the proxy may end the session. (It also closes after the reply to a
    QUIT with arguments, a 501 from the next hop: harmless, clients never send one.)"""
    verb = line.split(None, 1)[0].upper() if line.strip() else b""
    return reply[:3] in (b"221", b"421", b"451") or verb == b"QUIT"


class SessionRun:
    """Play one generated session, checking each reply against what is known for sure."""

    def __init__(self, rig, steps) -> None:
        self.rig = rig
        self.steps = list(flat(steps))
        self.client = Client(rig.address)
        assert self.client.reply("the connection") == b"220 smtp.passthru\r\n"
        if rig.tls:  # the whole session inside a TLS session the proxy terminates
            self.client.sock = starttls(self.client.sock, self.client.buf)
        self.expected_messages: list[bytes] = []  # contents the next hop must have got, in order
        self.replied_to = b""  # the line the last reply answered

    def exchange(self, line: bytes, *, continuation: bool = False) -> bytes:
        """Send one line and read its one reply."""
        STATS.lines += 1
        self.client.send(line)
        reply = self.client.reply(repr(line[:80]))
        self.replied_to = line
        length = line.find(b"\n") + 1
        if length >= MAX_LINE and not continuation:
            assert reply == b"500 Line too long\r\n", reply
            STATS.too_long += 1
        if not continuation and length < MAX_LINE and b"\r" in line.rstrip(b"\r\n"):
            # refused before its verb is looked at (STARTTLS\r\x00 is not a STARTTLS)
            assert reply == R.BARE_CR.encode() + b"\r\n", reply
            return reply
        if not continuation and length < MAX_LINE and b"\0" in line:
            assert reply == R.NUL.encode() + b"\r\n", reply  # (DATA\0x: DATA to a C server)
            return reply
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if not continuation and verb in (b"STARTTLS", b"BDAT") and length < MAX_LINE:
            if verb == b"STARTTLS" and self.rig.tls:
                assert reply == R.TLS_ACTIVE.encode() + b"\r\n", reply
            else:
                assert reply == b"502 Command not implemented\r\n", reply
        if not continuation and verb == b"XCLIENT" and length < MAX_LINE:
            assert reply == b"554 Insufficient authorization\r\n", reply
        return reply

    def batch(self, data: bytes) -> None:
        """Lines in one write, then one reply per line, in order."""
        lines = re.findall(rb"[^\n]*\n", data)  # the proxy's own idea of a line
        STATS.lines += len(lines)
        self.client.send(data)
        for line in lines:
            reply = self.client.reply(f"pipelined {line[:80]!r}")
            self.replied_to = line
            if len(line) >= MAX_LINE:
                assert reply == b"500 Line too long\r\n", reply
                STATS.too_long += 1

    def follow(self, reply: bytes, answers: list[bytes] = (), step=None) -> None:
        """What a reply asks for: a SASL continuation line (334) or the message (354)."""
        answers = list(answers)
        while reply.startswith(b"334"):
            answer = answers.pop(0) if answers else b"*\r\n"
            reply = self.exchange(answer, continuation=True)
        if reply.startswith(b"354"):
            self.send_body(step if step is not None and step[0] == "data" else
                           ("data", b"DATA\r\n", b"a default body\r\n", b"", 1))

    def send_body(self, step) -> None:
        _, _, body, tail, pieces = step
        STATS.data_phases += 1
        wire = terminated(body)
        content, rest = reference_decode(wire + tail)
        assert rest == tail  # the generator's own promise: no early end of data
        self.client.transcript.append(("body", body[:300]))
        self.client.send(wire + tail, pieces)
        reply = self.client.reply("the end of data")
        if EICAR in content:
            assert reply == DISCARDED + b"\r\n", reply
            STATS.viruses += 1
        elif hop_refuses_long_line(with_scan_header(content)):
            assert reply == HOP_TOO_LONG + b"\r\n", reply
        else:
            assert reply.startswith(DELIVERED), reply
            self.expected_messages.append(with_scan_header(content))
        for line in tail.splitlines(keepends=True):
            reply = self.client.reply(f"pipelined {line!r}")
            self.replied_to = line
            assert reply[:1] == b"2", reply

    def play(self) -> None:
        try:
            for step in self.steps:
                kind, line = step[0], step[1]
                if kind == "batch":
                    self.batch(line)
                    continue
                reply = self.exchange(line)
                self.follow(reply, step[2] if kind == "auth" else (), step)
            # 221; or 421/451 when the next hop has hung up (aiosmtpd does after 5 unknown verbs)
            assert self.exchange(b"QUIT\r\n")[:3] in (b"221", b"421", b"451"), self.client.last
        except SessionClosed:
            STATS.closed_early += 1
            assert may_close_after(self.client.last, self.replied_to), (
                f"the session ended after {self.client.last!r} to {self.replied_to!r}")
            return
        try:
            extra = self.client.reply("nothing (after 221)")
        except SessionClosed:
            return
        raise AssertionError(f"a reply after the one to QUIT: {extra!r}")


def check_daemon(rig) -> None:
    log = rig.new_log()
    assert rig.proc.poll() is None, f"the daemon died ({rig.proc.returncode}):\n{log[-3000:]}"
    for bad in BAD_LOG:
        assert bad not in log, log[-5000:]
    deadline = time.monotonic() + 3
    while (left := spool_files(rig)) or rig.active_sessions():
        assert time.monotonic() < deadline, (
            f"3 s after the client left: spool files {left}, "
            f"{rig.active_sessions()} session(s) still open")
        time.sleep(0.01)


def spool_files(rig) -> list[str]:
    """Files in TempDirectory, and files the daemon holds open there (a nameless O_TMPFILE spool
    file shows only as an open descriptor, "<dir>/#1234 (deleted)")."""
    names = sorted(p.name for p in rig.spool.iterdir())
    fd_dir = f"/proc/{rig.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(f"{rig.spool}/"):
            names.append(f"open: {target}")
    return names


@settings(max_examples=SESSIONS, deadline=None, suppress_health_check=list(HealthCheck),
          print_blob=True)
@given(steps=SESSION)
def test_sessions_never_crash_hang_or_desync(rig, steps):
    STATS.sessions += 1
    STATS.started = STATS.started or time.monotonic()
    before = len(rig.hop.messages)
    run = SessionRun(rig, steps)
    try:
        run.play()
    finally:
        run.client.close()
        note("transcript:\n" + "\n".join(f"{who} {data!r}" for who, data in
                                          run.client.transcript))
    check_daemon(rig)
    got = [m.original_content for m in rig.hop.messages[before:]]
    assert got == run.expected_messages
    for content in got:
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None  # CRLF line endings only
        assert EICAR not in content
    STATS.delivered += len(got)
    STATS.seconds = time.monotonic() - STATS.started


@settings(max_examples=max(SESSIONS // 4, 1), deadline=None,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(steps=SESSION)
def test_sessions_inside_tls_never_crash_hang_or_desync(tls_rig, steps):
    """The same properties inside STARTTLS (ClientTLS: on), a quarter as many sessions: TLS
    records cut the bytes differently, and AUTH gets 538 (the next hop's leg is clear)."""
    test_sessions_never_crash_hang_or_desync.hypothesis.inner_test(tls_rig, steps)


def test_fuzzed_daemon_still_serves(rig):
    """After all the sessions above: a plain message still goes through, byte for byte."""
    before = len(rig.hop.messages)
    run = SessionRun(rig, [("txn", [*ENVELOPE, ("data", b"DATA\r\n", b"Subject: after\r\n\r\n"
                                                 b"still here\r\n", b"", 1)])])
    run.play()
    run.client.close()
    check_daemon(rig)
    assert [m.original_content for m in rig.hop.messages[before:]] == run.expected_messages
    assert len(run.expected_messages) == 1


# -- the same decoding without the daemon -----------------------------------------------------

WIRE_TOKENS = st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b"\r\n.\r\n",
                               b".\r\n", b"\n.\n", b"\r.\r", b"\r\n..\r\n", b"a", b"\x00",
                               b"\xff"])
WIRE = st.lists(WIRE_TOKENS | st.binary(max_size=8), max_size=60).map(b"".join)


def decode_in(wire: bytes, cuts: list[int]) -> tuple[bytes, DataDecoder]:
    decoder = DataDecoder()
    out, pos = [], 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        out.append(decoder.feed(wire[pos:cut]))
        pos = cut
    return b"".join(out), decoder


@settings(max_examples=3000, deadline=None)
@given(wire=WIRE, data=st.data())
def test_decoder_any_chunking_matches_the_reference(wire, data):
    """Any bytes, cut anywhere (one piece, a few, or byte by byte): the same output, the same
    end and rest as the reference model; without an end of data, adding one gives the model's
    answer for the whole."""
    cuts = data.draw(st.one_of(st.lists(st.integers(0, len(wire)), max_size=6),
                               st.just(list(range(len(wire))))))
    whole, whole_decoder = decode_in(wire, [])
    pieces, decoder = decode_in(wire, cuts)
    assert (pieces, decoder.done, decoder.rest) == (whole, whole_decoder.done, whole_decoder.rest)
    expected = reference_decode(wire)
    if expected is not None:
        assert decoder.done and (pieces, decoder.rest) == expected
        return
    assert not decoder.done
    finished = pieces + decoder.feed(END_OF_DATA)
    assert decoder.done and (finished, decoder.rest) == reference_decode(wire + END_OF_DATA)
    assert normalise_line_endings(finished) == finished


@settings(max_examples=2000, deadline=None)
@given(content=st.lists(WIRE_TOKENS | st.binary(max_size=8), max_size=40).map(b"".join),
       data=st.data())
def test_stuffing_then_decoding_is_the_identity(content, data):
    """What the proxy sends on (`stuff` of a normalised body, in any file chunking) decodes, at
    any next hop that reads CRLF "." CRLF, to exactly that body, with no early end of data."""
    body = normalise_line_endings(content)
    body += b"" if body == b"" or body.endswith(b"\r\n") else b"\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    wire = b"".join(stuff(chunks)) + b".\r\n"
    assert reference_decode(wire) == (body, b"")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert b"\r\n.\r\n" not in b"\r\n" + wire[:-3]


REPLY_LINES = st.lists(st.binary(max_size=30), min_size=1, max_size=6).map(tuple)


@settings(max_examples=3000, deadline=None)
@given(lines=REPLY_LINES | st.lists(
    st.tuples(st.sampled_from([b"250", b"220", b"550"]), st.sampled_from([b"-", b" "]),
              st.sampled_from([b"PIPELINING", b"STARTTLS", b"SIZE 100", b"SIZE", b"SIZE x",
                               b"CHUNKING", b"8BITMIME", b"XCLIENT NAME", b" ", b"", b"\t"])
              | st.binary(max_size=20)).map(b"".join), min_size=1, max_size=6).map(tuple))
def test_ehlo_functions_never_raise(lines):
    """filter_ehlo and ehlo_size take any reply lines; a well-formed reply stays well formed.
    (This found the IndexError on a line of only blanks: tests/faults/test_fuzz_findings.py.)"""
    out = filter_ehlo(lines)
    assert 1 <= len(out) <= len(lines)
    assert out[0].startswith(lines[0][:3]) and out[0].endswith(b"smtp.passthru")
    size = ehlo_size(lines)
    assert size is None or size > 0
    well_formed = (all(line[3:4] == b"-" for line in lines[:-1]) and lines[-1][3:4] == b" "
                   and len({line[:3] for line in lines}) == 1)
    if well_formed:
        assert all(line[3:4] == b"-" for line in out[:-1]) and out[-1][3:4] == b" ", out
        assert all(line[:3] == lines[0][:3] for line in out)


@settings(max_examples=3000, deadline=None)
@given(line=st.binary(max_size=80) | st.tuples(
    st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"XFORWARD ", b"mail from:"]),
    st.sampled_from([b"<", b"", b" <", b"<<", b">"]), st.binary(max_size=20),
    st.sampled_from([b">", b"", b"> SIZE=1", b" ADDR=[x] HELO=y", b"ADDR=", b"="])).map(b"".join))
def test_envelope_functions_never_raise(line):
    address = envelope_address(line)
    assert isinstance(address, str) and address
    found = xforward_attributes(line)
    assert set(found) <= {"ADDR", "HELO"} and all(found.values())
