"""clamsmtp-netsetup under faults (root only, throwaway network namespaces, see nslab.py).

- `enable` SIGKILLed half-way, at a chosen kernel change (the command prints each change just
  before it makes it, so reading its output lets the test kill it there), or at random moments,
  or during its own rollback: then `status` still works, and `enable` or `disable` converge to
  exactly the rule set of a clean `enable`, or to the rule set from before
  (iptables-legacy-save, counters aside, compared line for line);
- two runs at the same time (enable + enable, enable + disable, and status while they run): the
  xtables lock serialises them, so the end is one clean enabled set (one jump per hook, no
  duplicate) or none at all.

Rules deleted by hand, a double jump and a leftover chain are in test_netns.py
(test_hand_deleted_rules_converge, test_leftover_of_a_crash_is_cleared).
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import faultinject
import pytest
from test_netns import REASON, ruleset

from lab import nslab

PORT = "10025"
CHAIN = f"CLAMSMTP-{PORT}"
#: enable --local on the router namespace: 9 kernel changes per family (see the dry run).
OPTIONS = ("--local", "--user", "0")
OPS_PER_FAMILY = 9
OP_LINE = re.compile(r"^  ip6?tables-legacy -t nat ")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(REASON is not None, reason=f"network-namespace tests: {REASON}"),
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(nslab.REPO_ROOT), "PYTHONUNBUFFERED": "1"}


def _argv(command: str, *options: str, fail_after: int | None = None,
          delay: float = 0.0) -> list[str]:
    """The real command; with faults (``fail_after``, ``delay`` after each change), the same
    run through faultinject.py."""
    if fail_after is None and not delay:
        return [sys.executable, "-m", "netsetup.cli", command, *options, "--proxy-port", PORT]
    return faultinject.argv(command, *options, "--proxy-port", PORT, fail_after=fail_after,
                            delay=delay)


def netsetup(ns: str, command: str, *options: str) -> subprocess.CompletedProcess:
    result = nslab.run_in(ns, _argv(command, *options), env=_env())
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def start(ns: str, command: str, *options: str, fail_after: int | None = None,
          delay: float = 0.0) -> subprocess.Popen:
    """The command in its own process group (its two xtables workers are in it too)."""
    return nslab.popen_in(ns, _argv(command, *options, fail_after=fail_after, delay=delay),
                          env=_env(),
                          stderr=subprocess.STDOUT, start_new_session=True, bufsize=1)


def _lines(proc: subprocess.Popen) -> tuple[queue.Queue, threading.Thread]:
    """The command's output lines as they come (None at the end), read by a thread that ends
    when every holder of the pipe (the command, its orphaned workers) has gone."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


def kill(proc: subprocess.Popen, whole_group: bool) -> None:
    """SIGKILL the command (and its workers too if `whole_group`; else they are orphaned)."""
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait(30)


def kill_at(ns: str, op: int, *, whole_group: bool = True, after: str | None = None,
            fail_after: int | None = None, delay: float = 0.0) -> list[str]:
    """Run `enable` (with faults: see faultinject.py); SIGKILL it as soon as it has announced
    its `op`-th kernel change (counted from 1, and from the line `after` if given). Returns
    its output up to then."""
    proc = start(ns, "enable", *OPTIONS, fail_after=fail_after, delay=delay)
    lines, pump = _lines(proc)
    seen: list[str] = []
    counting = after is None
    deadline = time.monotonic() + 60
    try:
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"enable ended before op {op}:\n{''.join(seen)}"
            seen.append(line)
            counting = counting or after in line
            if counting and OP_LINE.match(line):
                op -= 1
                if op == 0:
                    kill(proc, whole_group)
                    return seen
    finally:
        if proc.poll() is None:
            kill(proc, True)
        pump.join(15)
        assert not pump.is_alive(), "something still holds the command's output open"
        proc.stdout.close()


def wait_no_processes(ns: str, timeout: float = 10.0) -> None:
    """Orphaned xtables workers must go away by themselves (their parent's pipe closed)."""
    deadline = time.monotonic() + timeout
    while nslab.namespace_pids(ns):
        assert time.monotonic() < deadline, f"left running in {ns}: {nslab.namespace_pids(ns)}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def router():
    with nslab.router_namespace("csf") as ns:
        yield ns


@pytest.fixture(scope="module")
def states(router):
    """(before, enabled): the router's nat tables with an admin's own rules, and the same after
    a clean `enable --local`; the module's tests start from `before` and must end there."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        nslab.run_in(router, [tool, "-w", "-t", "nat", "-A", "PREROUTING", "-i", "wan0", "-j",
                              "RETURN"], check=True)
        nslab.run_in(router, [tool, "-w", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j",
                              "RETURN"], check=True)
    before = ruleset(router)
    ok(netsetup(router, "enable", *OPTIONS))
    enabled = ruleset(router)
    ok(netsetup(router, "disable"))
    assert ruleset(router) == before
    assert enabled.count(f"-A PREROUTING -j {CHAIN}") == 2  # one per family
    return before, enabled


def status_of(ns: str) -> str:
    """`status` must work whatever a crash left; returns the two family headlines."""
    result = ok(netsetup(ns, "status", *OPTIONS))
    return "\n".join(line for line in result.stdout.splitlines() if "table nat)" in line)


def converge(ns: str, states, how: str) -> None:
    before, enabled = states
    started = time.monotonic()
    if how == "enable":
        ok(netsetup(ns, "enable", *OPTIONS))
        assert ruleset(ns) == enabled
    ok(netsetup(ns, "disable"))
    assert ruleset(ns) == before
    # A lock the dead process held would cost LOCK_TIMEOUT (10 s) and then an error, which ok()
    # reports; the bound only has to stay well below two of those on a loaded machine.
    assert time.monotonic() - started < 30, "waited for a lock the dead process held?"


# Kill points: the first change, the last rule before the IPv4 jump, the IPv4 jump itself, the
# start of IPv6, the IPv6 jump to the forwarded-mail chain, the very last change.
KILL_POINTS = [1, 3, 4, OPS_PER_FAMILY + 1, OPS_PER_FAMILY + 4, 2 * OPS_PER_FAMILY]


@pytest.mark.parametrize("op", KILL_POINTS, ids=[f"op{n}" for n in KILL_POINTS])
def test_enable_killed_at_a_kernel_change_converges(router, states, op):
    """SIGKILL while `enable` makes change `op` (it may or may not have landed), the whole
    process group or only the main process (its workers orphaned) in turn: status works, and
    enable then disable, or disable alone, get back to exactly the known rule sets."""
    before, _ = states
    whole_group = KILL_POINTS.index(op) % 2 == 0
    # a pause after each change: the kill lands before change op+1 however busy the machine is
    kill_at(router, op, whole_group=whole_group, delay=0.2)
    wait_no_processes(router)
    if op > 1:  # change op-1 was complete before change op was announced
        assert ruleset(router) != before
    if op < 2 * OPS_PER_FAMILY:  # and change op+1 was never made
        assert ruleset(router) != states[1]
    heads = status_of(router)
    assert "IPv4 (iptables-legacy, table nat): " in heads
    converge(router, states, "enable" if KILL_POINTS.index(op) % 4 < 2 else "disable")


def test_enable_killed_at_random_moments_accumulates_nothing(router, states):
    """Six enables SIGKILLed at random moments, one after another (start-up, kernel checks,
    the removal it starts with, the changes), then one enable and one disable converge."""
    seed = random.randrange(1 << 30)
    print(f"random kill seed {seed}")  # shown with the failure, if any
    rng = random.Random(seed)
    for _ in range(6):
        proc = start(router, "enable", *OPTIONS)
        time.sleep(rng.uniform(0.3, 1.6))
        if proc.poll() is None:
            kill(proc, rng.random() < 0.5)
        else:
            proc.wait()
        proc.stdout.close()
        wait_no_processes(router)
    status_of(router)
    converge(router, states, "enable")


def test_rollback_killed_half_way_converges(router, states):
    """enable fails at its 11th change (injected: faultinject.py) and is SIGKILLed during
    the rollback that follows: what is left is cleared all the same."""
    seen = kill_at(router, 3, after="rolling back", fail_after=10)
    assert any("enable failed; rolling back" in line for line in seen), seen
    wait_no_processes(router)
    status_of(router)
    converge(router, states, "disable")


def _together(ns: str, *commands: str, offset: float = 0.0) -> list[subprocess.CompletedProcess]:
    procs = []
    for i, command in enumerate(commands):
        if i and offset:
            time.sleep(offset)
        procs.append(start(ns, command, *OPTIONS))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_two_enables_at_once_install_one_rule_set(router, states, offset):
    before, enabled = states
    for result in _together(router, "enable", "enable", offset=offset):
        assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout
    assert ruleset(router) == enabled  # one jump per hook and family, no duplicate chain
    converge(router, states, "disable")


@pytest.mark.parametrize(("order", "offset"), [(("enable", "disable"), 0.0),
                                               (("disable", "enable"), 0.2)])
def test_enable_and_disable_at_once_end_in_one_state(router, states, order, offset):
    before, enabled = states
    if order[0] == "disable":
        ok(netsetup(router, "enable", *OPTIONS))  # something to disable
    for result in _together(router, *order, offset=offset):
        assert result.returncode == 0 and "Traceback" not in result.stdout, result.stdout
    assert ruleset(router) in (before, enabled)
    converge(router, states, "disable")


def test_status_while_enable_and_disable_run(router, states):
    """status reads without the lock: during changes it may see a half-built set, but it must
    neither crash nor hang."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for command in ("enable", "disable"):
                nslab.run_in(router, _argv(command, *OPTIONS), env=_env())

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(4):
            result = netsetup(router, "status", *OPTIONS)
            assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stop.set()
        worker.join(60)
    converge(router, states, "disable")
