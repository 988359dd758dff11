"""One message body on disk, in TempDirectory: private (0600) and always removed.

Mail is confidential (README.Debian), so the file has no name at all where Linux allows it
(O_TMPFILE, mode 0600: it vanishes when closed, even if the daemon is killed), else it is made by
mkstemp (0600, O_EXCL) and unlinked; either way it is gone as soon as the message has been
forwarded or refused, on every path, errors included. The body is written in the decoded form
(dot-stuffing undone), so clamd scans what the recipient will read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator

READ_CHUNK = 1 << 16
#: errno values meaning "this file system cannot make a nameless file": use a named one
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}


class Spool:
    """A spool file being written, then read back for the scan and for forwarding."""

    def __init__(self, directory: str) -> None:
        try:
            # A file with no name (Linux O_TMPFILE): nothing to unlink, and nothing left in
            # TempDirectory even if the daemon is killed. It is reached as /proc/self/fd/N,
            # which is also what Quarantine hard-links to give it a name.
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            self.path = f"/proc/self/fd/{fd}"
            self._named = False
        except (AttributeError, IsADirectoryError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in _NO_TMPFILE:
                raise
            fd, self.path = tempfile.mkstemp(prefix="clamsmtpd.", dir=directory)
            self._named = True
        self._file = os.fdopen(fd, "wb", buffering=READ_CHUNK)
        self.size = 0
        #: Offset of the empty line that ends the header section (-1: none seen yet).
        self.header_end = -1
        self._tail = b""  # the last bytes written, to find "\r\n\r\n" across writes

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.header_end < 0:
            self._find_header_end(data)
        self._file.write(data)
        self.size += len(data)

    def _find_header_end(self, data: bytes) -> None:
        if self.size == 0 and data.startswith(b"\r\n"):
            self.header_end = 0  # no header at all: the body starts with the empty line
            return
        window = self._tail + data
        found = window.find(b"\r\n\r\n")
        if found >= 0:
            self.header_end = self.size - len(self._tail) + found + 2
        else:
            self._tail = window[-3:]

    def finish(self) -> None:
        """Flush to the kernel; after this the file is complete and can be scanned."""
        self._file.flush()

    def chunks(self, header: bytes = b"") -> Iterator[bytes]:
        """The body read back in chunks, with `header` inserted as the original does.

        A header that starts with `Received:` goes first (a trace header); any other goes last in
        the header section. A message with no header/body separator gets the header first, where a
        header line is always valid (the original silently left it out).
        """
        at = 0 if header[:9].lower() == b"received:" or self.header_end < 0 else self.header_end
        with open(self.path, "rb") as f:
            if header:
                while at > 0:
                    chunk = f.read(min(at, READ_CHUNK))
                    if not chunk:
                        break
                    at -= len(chunk)
                    yield chunk
                yield header
            while True:
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    return
                yield chunk

    def open(self):
        """The body as a binary file, for the scanner."""
        return open(self.path, "rb")

    def remove(self) -> None:
        """Close and delete; safe to call more than once."""
        with contextlib.suppress(OSError):
            self._file.close()
        if self._named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
