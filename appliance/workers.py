"""`Workers: N` (N > 1): a parent process that starts N workers on the socket(s) it bound,
replaces one that dies, and passes SIGHUP and SIGTERM on. Why this shape: docs/dev/workers.md.

The parent serves no mail and runs no event loop: it forks from plain code (never from inside a
running asyncio loop), with the signals it handles blocked and taken one at a time with
sigtimedwait, so nothing it does can be interrupted half-way. Each worker is the one-process
daemon (cli._serve) with a handle on the daemon-wide state (appliance/shared.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics, spool
from .maillog import log, use_connection_ids
from .shared import DaemonState, WorkerState

#: What the parent takes from sigtimedwait; blocked in the parent, unblocked in each worker.
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
#: A worker that dies sooner than this after its start is restarted after a growing pause
#: (1, 2, 4 ... 30 s), not at once: a worker that cannot run must not make a fork loop.
QUICK_DEATH = 5.0
MAX_PAUSE = 30.0
#: After SIGTERM, workers that have not exited after their own grace plus this are killed.
STOP_MARGIN = 5.0
_PR_SET_PDEATHSIG = 1  # prctl(2)


class StartError(Exception):
    """A worker died before it served: the daemon does not start (exit 1)."""


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None  # when a dead worker is started again


def make_metrics_directory(temp_directory: str) -> str:
    """A private directory (mode 0700) for the workers' metrics files (prometheus-client's
    multiprocess mode), made by the parent as `User` so the workers can write it, removed at
    exit: in the system's temporary directory (the unit's PrivateTmp), else in TempDirectory
    (never the spool's own files, which must be only messages)."""
    for parent in (None, temp_directory):
        try:
            return tempfile.mkdtemp(prefix="clamsmtpd-metrics-", dir=parent)
        except OSError as e:
            problem = f"{e.strerror or e}"
    raise StartError(f"MetricsListen with Workers: cannot make a directory for the workers' "
                     f"metrics in {tempfile.gettempdir()} or {temp_directory}: {problem}")


def become_worker(state: DaemonState, index: int, metrics_directory: str | None) -> WorkerState:
    """In a new worker, before it serves: take ids from the daemon-wide sequence, its share of
    the spool's memory budget, the daemon-wide metrics; the handled signals unblocked (their
    handlers must already be installed: see cli)."""
    _stop_with_parent()
    worker = state.worker(index)
    use_connection_ids(worker.connection_ids())
    spool.MEMORY_BUDGET = spool.MEMORY_BUDGET // state.workers
    if metrics_directory is not None:
        metrics.share_between_processes(metrics_directory, clamd_up=state.clamd_health)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    return worker


def _stop_with_parent() -> None:
    """A worker gets SIGTERM (and drains) if the parent dies, even by SIGKILL: no worker
    serves on, unsupervised, holding the port a restarted daemon needs."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by signal {number} ({signal.Signals(number).name})"
        return f"killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The parent: `run_worker(index, ready_fd)` is what a worker runs (it returns the exit code,
    and writes to `ready_fd` once it serves); `check_reload()` says whether a SIGHUP's new
    configuration is good (and logs why not)."""

    def __init__(
        self, count: int, run_worker: Callable[[int, int | None], int], *,
        state: DaemonState, check_reload: Callable[[], bool], stop_grace: float,
        metrics_directory: str | None = None,
    ) -> None:
        self.workers = [_Worker(index) for index in range(count)]
        self.run_worker = run_worker
        self.state = state
        self.check_reload = check_reload
        self.stop_grace = stop_grace
        self.metrics_directory = metrics_directory

    # -- start ---------------------------------------------------------------------------

    def start(self) -> bool:
        """Start every worker and wait until each serves. False: a SIGTERM/SIGINT came first
        (the workers started are stopped). StartError: a worker died before serving."""
        read_end, write_end = os.pipe()
        try:
            for worker in self.workers:
                self._fork(worker, write_end, close=read_end)
        finally:
            os.close(write_end)
        ready = 0
        reload = False
        try:
            while ready < len(self.workers):
                readable, _, _ = select.select([read_end], [], [], 0.2)
                if readable:
                    data = os.read(read_end, 64)
                    ready += len(data)
                    if not data and ready < len(self.workers):
                        self._reap()
                        raise StartError("a worker stopped before it served")
                signum = self._next_signal(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.stop()
                    return False
                if signum == signal.SIGCHLD and self._reap():
                    raise StartError("a worker stopped before it served")
                reload = reload or signum == signal.SIGHUP
        except StartError:
            self.stop()
            raise
        finally:
            os.close(read_end)
        log.info("%d workers serving (pids %s)", len(self.workers),
                 " ".join(str(w.pid) for w in self.workers))
        if reload:  # a SIGHUP while they started: the file may have changed since
            self._reload()
        return True

    def _fork(self, worker: _Worker, ready_fd: int | None, close: int | None = None) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                if close is not None:
                    os.close(close)
                code = self.run_worker(worker.index, ready_fd)
            except BaseException:
                with contextlib.suppress(BaseException):
                    log.exception("worker %d stopped on an internal error", worker.index)
            finally:
                os._exit(code)
        worker.pid, worker.started, worker.restart_at = pid, time.monotonic(), None

    # -- run -----------------------------------------------------------------------------

    def run(self) -> None:
        """Supervise until SIGTERM or SIGINT, then drain every worker and return."""
        while True:
            signum = self._next_signal(self._until_restart())
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping: no new connections, letting messages in flight finish")
                self.stop()
                return
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum == signal.SIGHUP:
                self._reload()
            self._restart_due()

    def _next_signal(self, timeout: float) -> int | None:
        info = signal.sigtimedwait(SIGNALS, max(timeout, 0))
        return info.si_signo if info is not None else None

    def _until_restart(self) -> float:
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        return min(due) - time.monotonic() if due else 60.0

    def _reload(self) -> None:
        """Read the new configuration once, here: a broken one is refused once and no worker
        changes; a good one is read again by each worker (cli._reload)."""
        if not self.check_reload():
            return
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)

    def _reap(self) -> bool:
        """Collect the workers that exited; log each and schedule its replacement.
        True if any did."""
        died = False
        for worker, pid, status in self._exited():
            died = True
            worker.pid = 0
            self.state.forget(worker.index)
            if self.metrics_directory is not None:
                metrics.process_dead(self.metrics_directory, pid)
            lived = time.monotonic() - worker.started
            worker.quick_deaths = worker.quick_deaths + 1 if lived < QUICK_DEATH else 0
            pause = min(2.0 ** (worker.quick_deaths - 1), MAX_PAUSE) if worker.quick_deaths else 0
            worker.restart_at = time.monotonic() + pause
            log.error("worker %d (pid %d) %s; its connections were cut; a new worker starts%s",
                      worker.index, pid, describe_status(status),
                      f" in {pause:g} s" if pause else "")
        return died

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None and worker.restart_at <= now:
                self._fork(worker, None)
                log.info("worker %d started (pid %d)", worker.index, worker.pid)

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM to every worker (each drains as the one-process daemon does); those still
        running after their grace are killed."""
        for worker in self.workers:
            worker.restart_at = None
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace + STOP_MARGIN
        while self._running() and time.monotonic() < deadline:
            self._next_signal(min(0.5, deadline - time.monotonic()))
            self._collect()
        for worker in self.workers:
            if worker.pid:
                log.error("worker %d (pid %d) did not stop: killed", worker.index, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.pid = 0

    def _running(self) -> bool:
        return any(w.pid for w in self.workers)

    def _collect(self) -> None:
        """While stopping: reap without restarting (a second SIGTERM changes nothing)."""
        for worker, pid, status in self._exited():
            worker.pid = 0
            if status != 0:
                log.warning("worker %d (pid %d) %s while stopping", worker.index, pid,
                            describe_status(status))

    def _exited(self) -> list[tuple[_Worker, int, int]]:
        """The workers that exited since the last look, reaped: (worker, pid, wait status).
        Each worker's own pid is waited for, never any child: the parent's other children, if
        it had any (a test's), are not ours to reap."""
        exited = []
        for worker in self.workers:
            if not worker.pid:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid:
                exited.append((worker, pid, status))
        return exited

    def close(self) -> None:
        self.state.close()
        if self.metrics_directory is not None:
            shutil.rmtree(self.metrics_directory, ignore_errors=True)


def block_signals() -> None:
    """In the parent, before the first fork: from now on its signals wait for sigtimedwait."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
