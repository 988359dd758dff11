"""One message body, kept private and always removed: in memory while small, else on disk.

Most mail is small, and a file per message costs an open, writes, reads and a close for nothing:
so a body is first kept in memory, and only a body over `MEMORY_LIMIT`, or one arriving while
the bodies already in memory add up to `MEMORY_BUDGET`, goes to a file in TempDirectory. Memory
stays bounded whatever the message sizes and the number of sessions.

Mail is confidential (README.Debian), so the file has no name at all where Linux allows it
(O_TMPFILE, mode 0600: it vanishes when closed, even if the daemon is killed), else it is made by
mkstemp (0600, O_EXCL) and unlinked; either way it is gone as soon as the message has been
forwarded or refused, on every path, errors included. The body is kept in the decoded form
(dot-stuffing undone), so clamd scans what the recipient will read.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

READ_CHUNK = 1 << 16
#: A body up to this size stays in memory (the 1-100 KB of most mail)...
MEMORY_LIMIT = 1 << 18
#: ...as long as all the bodies in memory at once stay under this.
MEMORY_BUDGET = 32 << 20
#: errno values meaning "this file system cannot make a nameless file": use a named one
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}

class SpoolError(OSError):
    """The body could not be kept; the message says what failed, in the original's words
    ("couldn't open cache file in DIR: ..." or "couldn't write to cache file: ...")."""


_in_memory = 0  # bytes held by all spools in memory (the event loop is the only writer)


class Spool:
    """A body being received, then read back for the scan and for forwarding."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        # The body while it is in memory (bytes once finished); None once on disk or removed.
        # Its length is what this spool counts in _in_memory.
        self._memory: bytearray | bytes | None = bytearray()
        self._file: BinaryIO | None = None
        self.path: str | None = None  # on disk only
        self._named = False
        self.size = 0
        #: Offset of the empty line that ends the header section (-1: none seen yet).
        self.header_end = -1
        self._tail = b""  # the last bytes written, to find "\r\n\r\n" across writes

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        """Add to the body; SpoolError when it has to go to disk and cannot."""
        global _in_memory
        if not data:
            return
        if self.header_end < 0:
            self._find_header_end(data)
        if self._memory is not None:
            grown = len(self._memory) + len(data)
            if grown <= MEMORY_LIMIT and _in_memory + len(data) <= MEMORY_BUDGET:
                self._memory += data
                _in_memory += len(data)
                self.size += len(data)
                return
            self._spill()
        self._to_file(data)
        self.size += len(data)

    def _spill(self) -> None:
        """Move what is in memory to a new file in TempDirectory."""
        try:
            self._file, self.path, self._named = _new_file(self._directory)
        except OSError as e:
            raise SpoolError(f"couldn't open cache file in {self._directory}: "
                             f"{e.strerror or e}") from None
        assert self._memory is not None
        self._to_file(self._memory)
        self._release_memory()

    def _to_file(self, data: bytes | bytearray) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as e:
            raise SpoolError(f"couldn't write to cache file: {e}") from None

    def _release_memory(self) -> None:
        global _in_memory
        if self._memory is not None:
            _in_memory -= len(self._memory)
            self._memory = None

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
        """After this the body is complete and can be scanned (a file is flushed to the kernel)."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                raise SpoolError(f"couldn't write to cache file: {e}") from None
        elif self._memory is not None:
            self._memory = bytes(self._memory)  # shared, not copied, by the readers below

    def chunks(self, header: bytes = b"") -> Iterator[bytes]:
        """The body read back in chunks, with `header` inserted as the original does.

        A header that starts with `Received:` goes first (a trace header); any other goes last in
        the header section. A message with no header/body separator gets the header first, where a
        header line is always valid (the original silently left it out).
        """
        at = 0 if header[:9].lower() == b"received:" or self.header_end < 0 else self.header_end
        if not header:
            at = 0
        with self.open() as f:
            while at > 0:
                chunk = f.read(min(at, READ_CHUNK))
                if not chunk:
                    break
                at -= len(chunk)
                yield chunk
            if header:
                yield header
            while True:
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    return
                yield chunk

    def open(self) -> BinaryIO:
        """The body as a binary file, for the scanner and for forwarding."""
        if self.path is None:
            return io.BytesIO(self._memory or b"")  # (shares the bytes, no copy)
        return open(self.path, "rb")

    def save_as(self, target: str) -> None:
        """Give the body the name `target` (a new file, 0600): Quarantine's copy.
        FileExistsError when the name is taken."""
        if self.path is not None:
            _link(self.path, target)
            return
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                fd = -1
                out.write(self._memory or b"")
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def remove(self) -> None:
        """Close and delete; safe to call more than once."""
        self._release_memory()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            if self._named and self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                self._named = False

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _new_file(directory: str) -> tuple[BinaryIO, str, bool]:
    """A new private file in `directory`: (file, path, has a name to unlink)."""
    try:
        # A file with no name (Linux O_TMPFILE): nothing to unlink, and nothing left in
        # TempDirectory even if the daemon is killed. It is reached as /proc/self/fd/N,
        # which is also what Quarantine hard-links to give it a name.
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        path, named = f"/proc/self/fd/{fd}", False
    except (AttributeError, IsADirectoryError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in _NO_TMPFILE:
            raise
        fd, path = tempfile.mkstemp(prefix="clamsmtpd.", dir=directory)
        named = True
    return os.fdopen(fd, "wb", buffering=READ_CHUNK), path, named


def check_directory(directory: str) -> str | None:
    """Why `directory` cannot hold spool files (None: it can), for a warning at start-up:
    small bodies never touch it, so a broken TempDirectory would otherwise go unnoticed."""
    try:
        file, path, named = _new_file(directory)
    except OSError as e:
        return e.strerror or str(e)
    file.close()
    if named:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def _link(source: str, target: str) -> None:
    """link(2), following `source` when it is a /proc/self/fd/N link (a nameless spool file).

    os.link() only follows symlinks through linkat(), and only uses linkat() when a directory
    fd is given: hence the one for "/" (ignored for an absolute path, as the source is)."""
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(source, target, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)
