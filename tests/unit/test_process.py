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
