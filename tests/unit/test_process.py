"""The daemon as a Unix process: what can be tried without root or a fork."""

from __future__ import annotations

import os
import signal

from appliance.process import HeldSignals


def test_signals_held_during_start_up_are_kept_once_each_in_order():
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        held = HeldSignals((signal.SIGHUP, signal.SIGTERM))
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGHUP):
            os.kill(os.getpid(), signum)  # delivered to the main thread before kill() returns
        assert held.take() == [signal.SIGHUP, signal.SIGTERM]
        assert held.take() == []
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_sighup_held_while_starting_reaches_the_parent_of_workers():
    """Workers: the parent blocks its signals before forking, for the supervisor's
    sigtimedwait; a SIGHUP that came before (a reload sent right after the bind) was dropped
    with the held record, and the file it announced never read. Now it is pending again."""
    from appliance import cli, workers

    handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in handled}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        held = HeldSignals(handled)
        os.kill(os.getpid(), signal.SIGHUP)
        workers.block_signals()
        assert cli._stop_held_at_fork(held) is False
        assert signal.SIGHUP in signal.sigpending()
        assert signal.sigtimedwait(workers.SIGNALS, 0).si_signo == signal.SIGHUP
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
