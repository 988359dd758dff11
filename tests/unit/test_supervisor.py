"""appliance/workers.py's Supervisor with real forked workers that are plain functions (the
real daemon's workers are in tests/integration/test_workers.py). The test process plays the
parent: its signals are blocked for the test and whatever is left pending is taken after."""

from __future__ import annotations

import os
import signal
import time

import pytest

from appliance import workers
from appliance.shared import DaemonState


@pytest.fixture
def parent():
    """The test process as the parent: SIGNALS blocked, and unblocked after, once what is
    pending (our own SIGTERM, the workers' SIGCHLDs) has been taken."""
    state = DaemonState(2)
    workers.block_signals()
    try:
        yield state
    finally:
        while signal.sigtimedwait(workers.SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, workers.SIGNALS)
        state.close()


def serve_until_sigterm(index: int, ready: int | None) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, workers.SIGNALS)
    if ready is not None:
        os.write(ready, b"1")
        os.close(ready)
    time.sleep(30)
    return 0


def test_a_worker_dying_before_it_serves_fails_the_start(parent):
    def run_worker(index: int, ready: int | None) -> int:
        if index == 1:
            return 3  # (its own error would be logged here)
        return serve_until_sigterm(index, ready)

    supervisor = workers.Supervisor(2, run_worker, state=parent, check_reload=lambda: True,
                                    stop_grace=5)
    forked = []
    fork = supervisor._fork

    def recording_fork(worker, *args, **kwargs):
        fork(worker, *args, **kwargs)
        forked.append(worker.pid)

    supervisor._fork = recording_fork
    with pytest.raises(workers.StartError, match="a worker stopped before it served"):
        supervisor.start()
    assert len(forked) == 2 and not any(w.pid for w in supervisor.workers)
    for pid in forked:  # the other one was stopped too, and both reaped
        assert not os.path.exists(f"/proc/{pid}")


def test_workers_start_are_replaced_and_stop_on_sigterm(parent, caplog):
    supervisor = workers.Supervisor(2, serve_until_sigterm, state=parent,
                                    check_reload=lambda: True, stop_grace=5)
    assert supervisor.start()
    first = [w.pid for w in supervisor.workers]
    assert all(first)
    parent.worker(1).claim(10)  # a session the dead worker held
    os.kill(first[1], signal.SIGKILL)
    signal.sigwaitinfo({signal.SIGCHLD})
    assert supervisor._reap()
    assert parent.open_connections() == 0  # its place given back
    assert f"worker 1 (pid {first[1]}) killed by signal 9 (SIGKILL)" in caplog.text
    supervisor._restart_due()
    assert supervisor.workers[1].restart_at is not None  # it died young: after a pause
    supervisor.workers[1].restart_at = time.monotonic()
    supervisor._restart_due()
    replacement = supervisor.workers[1].pid
    assert replacement and replacement not in first
    os.kill(os.getpid(), signal.SIGTERM)  # taken by run(), which drains and returns
    supervisor.run()
    assert not any(w.pid for w in supervisor.workers)
    for pid in (first[0], replacement):
        assert not os.path.exists(f"/proc/{pid}")
