#!/usr/bin/env bash
# vagrant/provision/clamd.sh: start (or stop) the lab's private clamd, an EICAR-only database.
#
#   clamd.sh [up] [--workdir DIR]     start it unless it already runs; prints the socket path
#   clamd.sh down [--workdir DIR]     stop it
#
# clamd listens on DIR/clamd.sock (use it as ClamAddress); DIR also holds clamd.conf, the
# database, clamd.log and clamdrun.log. Without internet there are no real signatures, so the
# database is one line: the EICAR test signature (lab/clamd.py). Idempotent: a second
# `up` leaves the running clamd alone.
#
# Environment: CLAMD_WORKDIR (= --workdir, default /var/lib/clamsmtp-lab/clamd), and see lib.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=up
WORKDIR="${CLAMD_WORKDIR:-/var/lib/clamsmtp-lab/clamd}"
while [ $# -gt 0 ]; do
    case "$1" in
        up|down) ACTION="$1" ;;
        --workdir) WORKDIR="${2:?--workdir needs a directory}"; shift ;;
        *) other_arg "$1" ;;
    esac
    shift
done

stop_if_down clamdrun.pid clamd
need clamd clamav-daemon
use_workdir clamdrun.pid
if [ -n "$(pid_of "$PIDFILE")" ]; then
    say "clamd already running (pid $(pid_of "$PIDFILE")), socket $WORKDIR/clamd.sock"
    exit 0
fi
start_background "$WORKDIR/clamdrun.log" "$PIDFILE" clamd \
    env PYTHONPATH="$LAB_PYTHONPATH" "$(tool python)" -m lab.clamdrun --workdir "$WORKDIR" --pidfile "$PIDFILE"
say "ClamAddress: $WORKDIR/clamd.sock"
