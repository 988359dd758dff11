"""`clamsmtpd [-d level] [-f configfile] [-p pidfile] | -v | --check-config`.

The same flags as the C original. Exit codes: 0 ok, 1 could not start (bind, pid file), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from . import __version__
from .config import DEFAULT_CONFIG_PATH, ConfigError, describe, load_config, replace
from .maillog import log, setup_logging
from .server import Appliance, BindError, bind

#: How long sessions in flight may finish after SIGTERM/SIGINT.
STOP_GRACE = 10.0

# The C original's old flags, still parsed there with a warning; here a pointer to the directive.
_LEGACY = {
    "-b": "Action: bounce", "-c": "ClamAddress:", "-D": "TempDirectory:", "-h": "Header:",
    "-l": "Listen:", "-m": "MaxConnections:", "-t": "TimeOut:", "-q": "Quarantine: on",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with the original's usage line
        self.print_usage(sys.stderr)
        self.exit(2, f"clamsmtpd: {message}\n")


def _debug_level(text: str) -> int:
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid debug log level") from None
    if not 0 <= level <= 4:
        raise argparse.ArgumentTypeError("invalid debug log level (must be between 0 and 4)")
    return level


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="clamsmtpd",
        usage="clamsmtpd [-d debuglevel] [-f configfile] [-p pidfile]\n       clamsmtpd -v",
        description="An SMTP proxy that scans mail for viruses with clamd.",
    )
    parser.add_argument("-d", dest="debug", type=_debug_level, metavar="LEVEL",
                        help="stay in the foreground and log to stderr, 0 (errors) .. 4 (debug)")
    parser.add_argument("-f", dest="config", default=DEFAULT_CONFIG_PATH, metavar="FILE",
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("-p", dest="pidfile", metavar="FILE",
                        help="write the process id here (overrides PidFile)")
    parser.add_argument("-v", dest="version", action="store_true", help="print the version")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print the effective values, exit")
    args, rest = parser.parse_known_args(argv)
    for arg in rest:
        hint = _LEGACY.get(arg[:2])
        if hint:
            parser.error(f"{arg[:2]} is no longer supported: use '{hint}' in {args.config}")
        parser.error(
            f"unexpected argument {arg!r}: put the next hop in {args.config} as 'OutAddress: {arg}'"
            if not arg.startswith("-") else f"unknown option {arg}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"clamsmtpd (version {__version__})\n          (config: {DEFAULT_CONFIG_PATH})")
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"clamsmtpd: {e}", file=sys.stderr)
        return 2
    if args.pidfile:
        config = replace(config, pid_file=args.pidfile)
    if args.check_config:
        for warning in config.warnings:
            print(f"clamsmtpd: warning: {warning}", file=sys.stderr)
        print(describe(config))
        return 0

    setup_logging(args.debug)
    for warning in config.warnings:
        log.warning("%s", warning)
    try:
        sock = bind(config.listen)
    except BindError as e:
        log.error("%s", e)
        if args.debug is None:
            print(f"clamsmtpd: {e}", file=sys.stderr)
        return 1
    if args.debug is None:
        _daemonize()
        setup_logging(None)  # syslog ident carries the daemon's own pid
    try:
        _write_pid_file(config.pid_file)
    except OSError as e:
        log.error("couldn't write pid file %s: %s", config.pid_file, e.strerror or e)
        return 1
    try:
        asyncio.run(_serve(config, sock))
    finally:
        if config.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
    return 0


async def _serve(config, sock) -> None:
    appliance = Appliance(config, sock)
    await appliance.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored: restart to reload"))
    await stop.wait()
    log.info("stopping: letting sessions in flight finish")
    await appliance.stop(STOP_GRACE)


def _write_pid_file(path: str | None) -> None:
    if not path:
        return
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def _daemonize() -> None:
    """Detach as daemon(0, 0) does: new session, cwd /, stdio on /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


if __name__ == "__main__":
    sys.exit(main())
