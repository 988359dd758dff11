"""Side effects after a virus verdict: keep the file (Quarantine), run the admin's VirusAction.

Both run only after the decision is made, and neither can block or lose mail: the quarantine is
a hard link (no copy) or one small write, and the script runs in the background with a timeout,
no terminal, its output and exit status logged. Values that come from the network (sender,
recipients, HELO, virus name) reach the script only through its environment, never through its
command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import tempfile
from dataclasses import dataclass

from .maillog import log
from .spool import Spool

#: A VirusAction still running after this many seconds is killed (with its process group).
VIRUS_ACTION_TIMEOUT = 60.0
#: At most this many scripts at once; past it, more wait; past MAX_PENDING they are skipped.
MAX_RUNNING = 4
MAX_PENDING = 64
#: How much of a script's output is logged.
MAX_OUTPUT = 4096
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: RECIPIENTS is cut to at most this many bytes. Linux refuses to exec with one environment
#: string over 128 KiB (MAX_ARG_STRLEN: "Argument list too long"), which ~1000 ordinary
#: recipients reach; past the limit the whole list is in the file named by RECIPIENTS_FILE.
MAX_RECIPIENTS_ENV = 64 * 1024


def quarantine(spool: Spool, directory: str) -> str:
    """Keep the infected message as `<directory>/virus.XXXXXX` (mode 0600; a hard link when
    the body is on disk)."""
    for _ in range(100):
        target = os.path.join(directory, "virus." + secrets.token_hex(3))
        try:
            spool.save_as(target)
        except FileExistsError:
            log.warning("race condition when quarantining virus file")
            continue
        return target
    raise OSError("no free quarantine file name")


@dataclass(frozen=True)
class VirusEvent:
    """What the original exported to VirusAction (clamsmtpd(8), VIRUS ACTIONS)."""

    sender: str | None
    recipients: tuple[str, ...]
    client: str
    server: str
    virus: str
    tmpdir: str
    email: str | None = None  # the quarantine file, only with Quarantine on
    remote: str | None = None  # from XFORWARD ADDR=
    remote_helo: str | None = None  # from XFORWARD HELO=
    blocked: int | None = None  # seconds: this message made InfectedHostLimit block the client

    @property
    def recipients_cut(self) -> bool:
        """Whether RECIPIENTS is too long for the environment (see MAX_RECIPIENTS_ENV)."""
        return len("\n".join(self.recipients).encode()) > MAX_RECIPIENTS_ENV

    def environment(self, recipients_file: str | None = None) -> dict[str, str]:
        """The script's environment. With a long recipient list, RECIPIENTS holds the first
        ones and a last line `... N more: see RECIPIENTS_FILE`, and RECIPIENTS_FILE (if the
        file could be written) names a file with all of them, one per line."""
        env = {
            "PATH": SAFE_PATH,
            "CLIENT": self.client,
            "SERVER": self.server,
            "VIRUS": self.virus,
            "TMPDIR": self.tmpdir,
            "RECIPIENTS": _recipients_value(self.recipients),
        }
        optional = {
            "SENDER": self.sender, "EMAIL": self.email,
            "REMOTE": self.remote, "REMOTE_HELO": self.remote_helo,
            "RECIPIENTS_FILE": recipients_file,
            "BLOCKED": str(self.blocked) if self.blocked is not None else None,
        }
        env.update({k: v for k, v in optional.items() if v is not None})
        # A NUL cannot travel in an environment; nothing else is filtered (values are data).
        return {k: v.replace("\0", "") for k, v in env.items()}


class VirusActions:
    """Runs VirusAction scripts in the background, a few at a time, each with a deadline."""

    def __init__(self, command: str | None, timeout: float = VIRUS_ACTION_TIMEOUT) -> None:
        self.command = command
        self.timeout = timeout
        self._slots = asyncio.Semaphore(MAX_RUNNING)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, event: VirusEvent, prefix: str = "") -> None:
        command = self.command
        if not command:
            return
        if len(self._tasks) >= MAX_PENDING:
            log.error("%sVirusAction skipped: %d already running or waiting", prefix, MAX_PENDING)
            return
        task = asyncio.get_running_loop().create_task(self._run(command, event, prefix))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, command: str, event: VirusEvent, prefix: str) -> None:
        async with self._slots:
            recipients_file = _recipients_file(event, prefix) if event.recipients_cut else None
            try:
                await self._run_script(command, event, recipients_file, prefix)
            finally:
                if recipients_file is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(recipients_file)

    async def _run_script(self, command: str, event: VirusEvent, recipients_file: str | None,
                          prefix: str) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=event.environment(recipients_file),
                cwd=event.tmpdir if os.path.isdir(event.tmpdir) else "/",
                start_new_session=True,  # no controlling terminal; killable as a group
            )
        except OSError as e:
            log.error("%scouldn't run VirusAction: %s", prefix, e.strerror or e)
            return
        assert proc.stdout is not None  # stdout=PIPE
        try:
            async with asyncio.timeout(self.timeout):
                output = await proc.stdout.read(MAX_OUTPUT)
                await _drain(proc.stdout)
                status = await proc.wait()
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            log.error("%sVirusAction killed after %.0f s", prefix, self.timeout)
            return
        except asyncio.CancelledError:  # the daemon is stopping
            _kill_group(proc.pid)
            log.error("%sVirusAction killed: clamsmtpd is stopping", prefix)
            raise
        text = output.decode("utf-8", "replace").strip()
        level = log.info if status == 0 else log.error
        level("%sVirusAction exited with status %d%s", prefix, status,
              f": {_one_line(text)}" if text else "")

    async def stop(self, timeout: float) -> None:
        """At shutdown: let running scripts finish for `timeout` seconds, then kill them."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _recipients_value(recipients: tuple[str, ...]) -> str:
    """RECIPIENTS: one per line; past MAX_RECIPIENTS_ENV bytes, cut at a line and marked."""
    whole = "\n".join(recipients)
    if len(whole.encode()) <= MAX_RECIPIENTS_ENV:
        return whole
    kept: list[str] = []
    size = 64  # room for the marker line
    for rcpt in recipients:
        size += len(rcpt.encode()) + 1
        if size > MAX_RECIPIENTS_ENV:
            break
        kept.append(rcpt)
    return "\n".join([*kept, f"... {len(recipients) - len(kept)} more: see RECIPIENTS_FILE"])


def _recipients_file(event: VirusEvent, prefix: str) -> str | None:
    """All recipients, one per line, in TMPDIR (mode 0600, removed after the script)."""
    try:
        fd, path = tempfile.mkstemp(prefix="recipients.", dir=event.tmpdir)
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as out:
            out.write("".join(rcpt.replace("\0", "") + "\n" for rcpt in event.recipients))
    except OSError as e:
        log.error("%scouldn't write the recipient list for VirusAction (RECIPIENTS is cut): %s",
                  prefix, e.strerror or e)
        return None
    log.info("%sVirusAction: %d recipients: RECIPIENTS is cut, all are in %s", prefix,
             len(event.recipients), path)
    return path


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


def _one_line(text: str) -> str:
    return " | ".join(line for line in text.splitlines() if line.strip())

