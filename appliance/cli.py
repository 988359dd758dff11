"""`clamsmtpd [-d level] [-f configfile] [-p pidfile] | -v | --check-config`.

The same flags as the C original. Exit codes: 0 ok, 1 could not start (bind, pid file), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

from . import __version__, eventloop, process, workers
from .capabilities import CAP_NET_ADMIN
from .config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    Transparency,
    describe,
    load_config,
    replace,
)
from .maillog import LogTarget, choose_target, log, setup_logging
from .server import ACTIONS_GRACE, Appliance, BindError, bind
from .shared import DaemonState, WorkerState
from .tls import TLSContexts, TLSError
from .tls import load as load_tls
from .unitcheck import private_tmp_warnings
from .upstream import transparent_problem

#: How long sessions in flight may finish after SIGTERM/SIGINT.
STOP_GRACE = 10.0

#: What TransparentProxy: full keeps after the privilege drop: IP_TRANSPARENT on each connection.
KEEP_FOR_FULL = frozenset({CAP_NET_ADMIN})

#: Stop (SIGTERM, SIGINT) and reload (SIGHUP); held from the start of start-up (see HeldSignals).
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The C original's old flags, still parsed there with a warning; here a pointer to the directive.
_LEGACY = {
    "-b": "Action: bounce", "-c": "ClamAddress:", "-D": "TempDirectory:",
    "-l": "Listen:", "-m": "MaxConnections:", "-t": "TimeOut:", "-q": "Quarantine: on",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 2 with the original's usage line
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
        usage="clamsmtpd [-d debuglevel] [-f configfile] [-p pidfile]\n       clamsmtpd -v\n"
              "       clamsmtpd --check-config [-f configfile] [-p pidfile]",
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


def _print_to_stdout(text: str) -> int:
    """Print for a pipe that may close early (`--check-config | head`): no traceback then."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"clamsmtpd (version {__version__})\n          (config: {DEFAULT_CONFIG_PATH})")
        return 0
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"clamsmtpd: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        try:
            tls = load_tls(config)  # (a certificate that cannot be used fails the check)
        except ConfigError as e:
            print(f"clamsmtpd: {e}", file=sys.stderr)
            return 2
        for warning in (*config.warnings, *tls.warnings, *private_tmp_warnings(config)):
            print(f"clamsmtpd: warning: {warning}", file=sys.stderr)
        return _print_to_stdout(describe(config))

    held = process.HeldSignals(_HANDLED_SIGNALS)
    target = None
    if args.debug is None:
        target = choose_target()
        if target.notice():
            print(f"clamsmtpd: {target.notice()}", file=sys.stderr)
    to_stderr = target is None or target.kind == "stderr"
    setup_logging(args.debug, target=target)
    for warning in config.warnings:
        log.warning("%s", warning)
    try:
        account = _account_to_become(config)
        process.check_pid_file(config.pid_file)
        full = config.transparent_proxy is Transparency.FULL
        sock = bind(config.listen, transparent=full)
        metrics_sock = None
        if config.metrics_listen is not None:
            metrics_sock = bind(config.metrics_listen, "MetricsListen")
        tls = load_tls(config)  # as root: the key may be readable by root alone
        for warning in tls.warnings:
            log.warning("%s", warning)
    except (BindError, process.ProcessError, TLSError) as e:
        _start_up_failed(str(e), to_stderr)
        return 1
    ready_fd = None
    if args.debug is None:
        ready_fd = process.daemonize()  # stderr stays ours until ready: failures are seen
        setup_logging(None, target=target)  # syslog ident carries the daemon's own pid
    try:
        process.write_pid_file(config.pid_file)
        eventloop.prepare(config.event_loop)  # (as root: see process.FIRST_USE_MODULES)
        keep = KEEP_FOR_FULL if full else frozenset()
        if account is not None:
            process.drop_privileges(account, keep)
            log.info("running as user %s (uid %d, gid %d)", account.name, account.uid, account.gid)
        elif os.geteuid() == 0:
            log.warning("running as root is NOT recommended (set User: in %s)", config.path)
        elif keep:
            process.keep_only(keep)  # started unprivileged, e.g. by systemd with ambient caps
        if full:
            problem = transparent_problem()
            if problem:
                raise process.ProcessError(problem)
            if account is not None or os.geteuid() != 0:
                log.info("TransparentProxy: full: kept CAP_NET_ADMIN, and no other capability")
    except (OSError, process.ProcessError) as e:
        _start_up_failed(str(e), to_stderr)
        process.remove_pid_file(config.pid_file)
        return 1
    if config.worker_count > 1:
        try:
            return _supervise(args, config, sock, metrics_sock, ready_fd, held, tls, to_stderr,
                              target)
        finally:
            process.remove_pid_file(config.pid_file)
    try:
        eventloop.run(_serve(args, config, sock, metrics_sock, ready_fd, held, tls, to_stderr),
                      config.event_loop)
    except _StartFailed as e:
        _start_up_failed(str(e), to_stderr)
        return 1
    except Exception:
        log.exception("stopped on an internal error")
        return 1
    finally:
        process.remove_pid_file(config.pid_file)
    return 0


class _StartFailed(Exception):
    """Start-up inside the event loop failed, before the daemon said it was serving."""


def _start_up_failed(message: str, logged_to_stderr: bool) -> None:
    """Log a start-up failure, and print it on stderr too if the log does not go there: the
    admin who ran the command sees why it exited non-zero (detached or not)."""
    log.error("%s", message)
    if not logged_to_stderr:
        print(f"clamsmtpd: {message}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if args.pidfile:
        config = replace(config, pid_file=args.pidfile)
    if config.virus_action and not config.virus_action_as_root and _runs_as_root(config):
        raise ConfigError(config.path, 0, "VirusAction",
                          "would run as root: set User: (or VirusActionAsRoot: on, not advised)")
    return config


def _runs_as_root(config: Config) -> bool:
    if os.geteuid() != 0:
        return False
    if not config.user:
        return True
    try:
        return process.lookup_user(config.user).uid == 0
    except process.ProcessError:
        return False  # reported as such when the daemon starts


def _account_to_become(config: Config) -> process.Account | None:
    if not config.user:
        return None
    account = process.lookup_user(config.user)
    if os.geteuid() == account.uid:
        return None  # started as that user already (systemd's User=): nothing to drop
    if os.geteuid() != 0:
        log.warning("must be started as root to switch to user: %s", config.user)
        return None
    return account


def _supervise(
    args: argparse.Namespace, config: Config, sock: socket.socket,
    metrics_sock: socket.socket | None, ready_fd: int | None, held: process.HeldSignals,
    tls: TLSContexts, to_stderr: bool, target: LogTarget | None,
) -> int:
    """`Workers` > 1: this process becomes the parent of that many workers (appliance/workers.py),
    each of them `_serve` with a handle on the daemon-wide state."""
    count = config.worker_count
    workers.block_signals()
    if _stop_held_at_fork(held):
        log.info("stopped")  # asked to stop while starting: no worker started
        return 0
    state = DaemonState(count)
    state.set_clamds([str(address) for address in config.clam_addresses])
    try:
        directory = (workers.make_metrics_directory(config.temp_directory)
                     if metrics_sock is not None else None)
    except workers.StartError as e:
        _start_up_failed(str(e), to_stderr)
        return 1

    #: the configuration of the last SIGHUP the parent found good: a worker started after it
    #: (a replacement) takes it over as its siblings did, not the one read at start-up
    reloaded: list[tuple[Config, TLSContexts]] = []

    def check_reload() -> bool:
        latest = _check_reload(args)
        if latest is not None:
            reloaded[:] = [latest]
            state.set_clamds([str(address) for address in latest[0].clam_addresses])
        return latest is not None

    def run_worker(index: int, worker_ready: int | None) -> int:
        worker_held = process.HeldSignals(_HANDLED_SIGNALS)  # its own, before the unblocking
        if args.debug is None:
            setup_logging(None, target=target)  # syslog ident carries the worker's own pid
        handle = workers.become_worker(state, index, directory)
        try:
            # its own loop, made here in the child (the parent never runs one: nothing crosses
            # the fork); EventLoop is restart-only, so it is the start-up configuration's
            eventloop.run(_serve(args, config, sock, metrics_sock, worker_ready, worker_held, tls,
                                 to_stderr, worker=handle,
                                 reloaded=reloaded[0] if reloaded else None),
                          config.event_loop)
        except _StartFailed as e:
            _start_up_failed(str(e), to_stderr)
            return 1
        except Exception:
            log.exception("stopped on an internal error")
            return 1
        return 0

    supervisor = workers.Supervisor(
        count, run_worker, state=state, check_reload=check_reload,
        stop_grace=STOP_GRACE + ACTIONS_GRACE, metrics_directory=directory,
    )
    try:
        try:
            started = supervisor.start()
        except workers.StartError as e:
            _start_up_failed(f"could not start: {e}", to_stderr)
            return 1
        if started:
            process.ready(ready_fd, keep_stderr=to_stderr)
            supervisor.run()
        log.info("stopped")
        return 0
    finally:
        supervisor.close()


def _stop_held_at_fork(held: process.HeldSignals) -> bool:
    """The parent of workers takes over the signals held while starting (its own are blocked by
    now, for the supervisor's sigtimedwait): True for a stop. A SIGHUP is made pending again, so
    the supervisor reloads once the workers serve; it was dropped before, and the file it
    announced never read (a reload sent right after the bind, seen with Workers: 2)."""
    taken = held.take()
    if signal.SIGHUP in taken:
        os.kill(os.getpid(), signal.SIGHUP)  # (blocked: it waits for sigtimedwait)
    return any(signum in (signal.SIGTERM, signal.SIGINT) for signum in taken)


def _check_reload(args: argparse.Namespace) -> tuple[Config, TLSContexts] | None:
    """The parent's look at a SIGHUP's configuration, before any worker is told: the new
    configuration and its TLS contexts, or None (logged) if it cannot be used."""
    try:
        config = _load(args)
        return config, load_tls(config)
    except ConfigError as e:
        log.error("SIGHUP: configuration not reloaded: %s", e)
        return None


async def _serve(
    args: argparse.Namespace, config: Config, sock: socket.socket,
    metrics_sock: socket.socket | None, ready_fd: int | None,
    held: process.HeldSignals, tls: TLSContexts, to_stderr: bool,
    worker: WorkerState | None = None, reloaded: tuple[Config, TLSContexts] | None = None,
) -> None:
    """`reloaded`: a worker started after a SIGHUP takes that configuration over as the others
    did (restart-only directives keep the start-up values)."""
    try:
        appliance = Appliance(config, sock, metrics_sock, tls, worker)
        if reloaded is not None:
            appliance.reload(*reloaded)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if worker is None or worker.index == 0:  # (one line a daemon, as "listening on")
            log.info("event loop: %s", eventloop.version(config.event_loop))
        handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: stop.set, signal.SIGINT: stop.set,
            signal.SIGHUP: lambda: _reload(args, appliance, speaks=worker is None or
                                           worker.index == 0),
        }
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
        for signum in held.take():  # arrived while starting: acted on now
            handlers[signum]()
        await appliance.start()
    except Exception as e:
        raise _StartFailed(f"could not start: {e}") from e
    process.ready(ready_fd, keep_stderr=to_stderr)
    await stop.wait()
    # with Workers, the parent says it for the daemon; each worker only at -d 4
    said = log.info if worker is None else log.debug
    said("stopping: no new connections, letting messages in flight finish")
    await appliance.stop(STOP_GRACE)
    said("stopped")


def _reload(args: argparse.Namespace, appliance: Appliance, speaks: bool = True) -> None:
    """SIGHUP: read the configuration again; keep the old one if the new one is wrong.

    `speaks`: this process logs what the reload did. With `Workers`, only worker 0 does (the
    others read the same file and come to the same result): the admin sees one set of lines
    per daemon, as with one process (docs/dev/workers.md). A worker that refuses what the
    parent found good (the file changed in between) says so whichever it is."""
    try:
        config = _load(args)
        tls = load_tls(config)  # a renewed certificate and key, read as User
    except ConfigError as e:  # (TLSError too: a key we can no longer read keeps the old one)
        log.error("SIGHUP: configuration not reloaded: %s", e)
        return
    pending = appliance.reload(config, tls)
    if not speaks:  # (seen at -d 4, where a test waits for every worker)
        log.debug("SIGHUP: this worker took the new configuration too")
        return
    for warning in (*config.warnings, *tls.warnings):
        log.warning("%s", warning)
    for name in pending:
        log.warning("SIGHUP: %s changed: restart clamsmtpd to apply it", name)
    log.info("SIGHUP: configuration reloaded from %s", config.path)


if __name__ == "__main__":
    sys.exit(main())
