"""Every SMTP reply the proxy says itself (the next hop's replies are relayed verbatim).

One place, so a reply changes in one edit. The C original's strings (clamsmtp-behaviour.md
5.10) are kept byte for byte: clients, log parsers and monitoring match on them. Ours carry an
enhanced status code. tests/replies.py holds the same table written out independently, and
tests/unit/test_replies.py checks the two agree, so a changed string fails a test.

Strings without the CRLF; the relay adds it. A leaf module: it imports nothing of the project.
"""

from __future__ import annotations

#: The name that replaces the next hop's in its greeting and its HELO/EHLO reply, so that a
#: mail loop check on either side does not see its own name (the original's behaviour).
PASSTHRU_NAME = "smtp.passthru"

#: The last line of an EHLO reply whose extension was filtered out, after the code (the original's).
XFILTERED = "XFILTERED"

# -- At connect, before any command ------------------------------------------------------------
#: The next hop's single-line 220 greeting, rewritten (the original's).
REPLY_GREETING = "220 smtp.passthru"
#: MaxConnections sessions are open: said before the session starts, then closed (the original's).
REPLY_BUSY = "421 Server busy, too many connections"
#: The client's address is blocked by InfectedHostLimit: at connect, then closed.
REPLY_BLOCKED = "421 4.7.0 Too many infected messages from your address; try again later"
#: The next hop cannot be reached (or no next hop could be found): then closed.
REPLY_NEXT_HOP_DOWN = "421 4.4.1 Local Error, cannot connect to next hop; try again later"
#: Transparent mode found the proxy itself (or the client) as the destination: then closed.
REPLY_LOOP = "421 4.4.6 Local Error, mail loop detected"

# -- Any command line --------------------------------------------------------------------------
#: A client line of MAX_LINE bytes or more (the original's).
REPLY_LINE_TOO_LONG = "500 Line too long"
#: A command line with a CR before its end: never relayed (a next hop could split it).
REPLY_BARE_CR = "500 5.5.2 Error: bare CR in command line"
#: A command line with a NUL: never relayed (a C next hop would read `DATA\0x` as DATA).
REPLY_NUL = "500 5.5.2 Error: NUL character in command line"
#: BDAT, and STARTTLS when ClientTLS is off (the original's); BURL.
REPLY_NOT_IMPLEMENTED = "502 Command not implemented"
#: The client's own XCLIENT: never relayed (the original's).
REPLY_XCLIENT = "554 Insufficient authorization"
#: A continuation line of AUTH too long to relay.
REPLY_AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"
#: RCPT past MAX_RECIPIENTS in one message: not relayed (RFC 5321 4.5.3.1.10).
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"

# -- The session ends (then the connection closes) ---------------------------------------------
#: The client said nothing within TimeOut.
REPLY_TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
#: The next hop failed between commands (within a message the answer is REPLY_LOCAL_ERROR).
REPLY_NEXT_HOP_LOST = "421 4.4.2 Local Error, connection to next hop lost; try again later"
#: The daemon is stopping: to idle sessions, and to a message that outlived the grace time.
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
#: XClient: on and the next hop did not take XCLIENT (refused, or not offered): nothing relayed.
REPLY_XCLIENT_FAILED = (
    "421 4.7.0 Local Error, the next hop did not accept XCLIENT; try again later"
)
#: OutTLS: encrypt/verify and the next hop's leg could not be encrypted (docs/dev/tls.md).
REPLY_NEXT_HOP_INSECURE = (
    "421 4.7.0 Local Error, cannot encrypt the connection to next hop; try again later"
)

# -- STARTTLS from the client (ClientTLS, docs/dev/tls.md) -------------------------------------
#: A command other than EHLO/HELO/QUIT/NOOP/RSET before the next hop's leg is encrypted.
REPLY_SEND_EHLO_FIRST = "503 5.5.1 Error: send HELO/EHLO first"
#: STARTTLS accepted: the handshake follows.
REPLY_TLS_READY = "220 2.0.0 Ready to start TLS"
#: STARTTLS inside TLS.
REPLY_TLS_ACTIVE = "554 5.5.1 Error: TLS already active"
#: STARTTLS with an argument.
REPLY_TLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
#: STARTTLS between MAIL and the end of the message.
REPLY_TLS_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
#: AUTH in clear while ClientTLS: require.
REPLY_AUTH_NEEDS_TLS = "538 5.7.11 Encryption required"

# -- DATA and the end of a message -------------------------------------------------------------
#: DATA accepted: the proxy answers it itself and spools the body (the original's).
REPLY_START_DATA = "354 Start mail input; end with <CRLF>.<CRLF>"
#: DATA without an accepted RCPT.
REPLY_NEED_RCPT = "503 5.5.1 Error: need RCPT command"
#: The message grew past the SIZE limit the next hop advertised: read to its end, not relayed.
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
#: Action: drop: the client is told the message was taken (the original's).
REPLY_DISCARDED = "250 Virus Detected; Discarded Email"
#: Action: bounce, the default of RejectMessage (%v there is the virus name; the original's).
REPLY_REJECTED = "550 Virus Detected; Content Rejected"
#: Any internal failure within a message: the client retries it (the original's).
REPLY_LOCAL_ERROR = "451 Local Error"
#: OversizeAction: reject.
REPLY_OVERSIZE_REJECTED = "552 5.3.4 Message too big to be scanned"
#: OversizeAction: defer.
REPLY_OVERSIZE_DEFERRED = "451 4.3.4 Message too big to be scanned; try again later"
