"""The replies the proxy itself generates, from clamsmtp-behaviour.md 5.10 (and our additions).

Tests assert against these names, so a changed string is one edit here and a failing test there.
"""

GREETING = "220 smtp.passthru"
EHLO_FIRST = "250-smtp.passthru"
XFILTERED = "250 XFILTERED"
START_DATA = "354 Start mail input; end with <CRLF>.<CRLF>"
DISCARDED = "250 Virus Detected; Discarded Email"
REJECTED = "550 Virus Detected; Content Rejected"
LOCAL_ERROR = "451 Local Error"
LINE_TOO_LONG = "500 Line too long"
NOT_IMPLEMENTED = "502 Command not implemented"
INSUFFICIENT_AUTHORIZATION = "554 Insufficient authorization"
BUSY = "421 Server busy, too many connections"
# Ours: the original closed silently here.
NEXT_HOP_DOWN = "421 4.4.1 Local Error, cannot connect to next hop; try again later"
#: the next hop failed between commands: the session cannot go on (in a message: LOCAL_ERROR)
NEXT_HOP_LOST = "421 4.4.2 Local Error, connection to next hop lost; try again later"
TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
#: a command line with a CR before its end: never relayed (a next hop could split it)
BARE_CR = "500 5.5.2 Error: bare CR in command line"

DEFAULT_HEADER = b"X-Virus-Scanned: ClamAV using ClamSMTP"
INFECTED_HEADER = b"X-Virus-Infected: Virus Detected!"
#: XClient: on and the next hop did not take XCLIENT (refused, or not offered): nothing relayed
XCLIENT_FAILED = "421 4.7.0 Local Error, the next hop did not accept XCLIENT; try again later"
# TLS (docs/dev/tls.md)
NEXT_HOP_INSECURE = (
    "421 4.7.0 Local Error, cannot encrypt the connection to next hop; try again later")
SEND_EHLO_FIRST = "503 5.5.1 Error: send HELO/EHLO first"
TLS_READY = "220 2.0.0 Ready to start TLS"
TLS_ACTIVE = "554 5.5.1 Error: TLS already active"
TLS_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required"
#: a command line with a NUL: never relayed (a C next hop would read `DATA\0x` as DATA)
NUL = "500 5.5.2 Error: NUL character in command line"
TLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
#: the message grew past the next hop's SIZE
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
OVERSIZE_REJECTED = "552 5.3.4 Message too big to be scanned"
OVERSIZE_DEFERRED = "451 4.3.4 Message too big to be scanned; try again later"
#: InfectedHostLimit: the client's address is blocked
BLOCKED = "421 4.7.0 Too many infected messages from your address; try again later"
#: transparent mode found the proxy itself (or the client) as the destination
LOOP = "421 4.4.6 Local Error, mail loop detected"
SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
