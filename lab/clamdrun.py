"""Run the lab's private clamd (EICAR-only database) until SIGTERM or Ctrl-C.

    python -m lab.clamdrun --workdir DIR [--tcp] [--pidfile FILE]

Writes DIR/clamd.conf and DIR/db/eicar.ndb (see `PrivateClamd`), starts clamd on
DIR/clamd.sock, waits until it answers PING, then prints one line

    clamdrun: ready: socket DIR/clamd.sock, clamd pid N

and, only then, writes its own pid to FILE: a script that waits for the pid file knows clamd
is up. SIGTERM or SIGINT stops clamd and removes the pid file. If clamd dies, this exits 1.
vagrant/provision/clamd.sh starts it in the background; in a real VM, a packaged clamd with
real signatures can be used instead (ClamAddress /var/run/clamav/clamd.ctl).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .clamd import ClamdError, PrivateClamd

PROG = "clamdrun"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m lab.{PROG}",
        description="Run a private clamd with an EICAR-only signature database.",
    )
    parser.add_argument("--workdir", required=True,
                        help="directory for clamd.conf, the database, the socket and the log "
                        "(created if missing, kept afterwards)")
    parser.add_argument("--tcp", action="store_true",
                        help="also listen on 127.0.0.1:<a free port> (printed when ready)")
    parser.add_argument("--pidfile", help="write this process's pid here once clamd is ready")
    parser.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds to wait for clamd to answer PING (default %(default)s)")
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pidfile(path: str) -> None:
    with contextlib.suppress(OSError):
        if Path(path).read_text().strip() == str(os.getpid()):
            os.unlink(path)


def run_until_stopped(say: Callable[[str], None], pidfile: str | None,
                      start: Callable[[], int], serve: Callable[[], int],
                      stop: Callable[[], None]) -> int:
    """The run loop of a lab runner (this one and sinkrun); returns the exit status.

    From now on SIGTERM, SIGINT and SIGHUP stop the runner. `start()` brings the service up and
    returns 0 (else the exit status: it failed); then this process's pid goes to `pidfile` and
    `serve()` runs until such a signal (exit 0) or returns the exit status itself. Last, always,
    with SIGTERM and SIGINT ignored: `stop()`, and the pid file is removed.
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    try:
        status = start()
        if status:
            return status
        if pidfile:
            write_pidfile(pidfile)
        return serve()
    except (_Stop, KeyboardInterrupt) as stopped:
        say(f"stopping ({stopped or 'SIGINT'})")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop()
        if pidfile:
            remove_pidfile(pidfile)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clamd = PrivateClamd(Path(args.workdir).resolve(), tcp=args.tcp,
                         start_timeout=args.start_timeout)

    def start() -> int:
        try:
            clamd.start()
        except ClamdError as error:
            say(f"error: {error}")
            return 1
        tcp = f", tcp 127.0.0.1:{clamd.tcp_port}" if clamd.tcp_port else ""
        say(f"ready: socket {clamd.socket_path}{tcp}, clamd pid {clamd.pid}, "
            f"log {clamd.log_path}")
        return 0

    def serve() -> int:
        while clamd.is_running():
            time.sleep(0.5)
        say(f"error: clamd exited with status {clamd.proc.returncode}")
        return 1

    return run_until_stopped(say, args.pidfile, start, serve, clamd.stop)


if __name__ == "__main__":
    sys.exit(main())
