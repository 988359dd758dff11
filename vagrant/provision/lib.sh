# vagrant/provision/lib.sh: helpers shared by the provisioning scripts (sourced, not run).
#
# The scripts run the same in a VM and inside a network namespace (`ip netns exec NS ...`):
# they only touch the network stack they run in, the files under their --workdir, and the
# processes named by their own pid files. Long-running programs are started in the background
# with setsid, stdin from /dev/null and output to a log file in the work directory, so the
# script that started them can exit (and a caller capturing its output is not kept waiting).
#
# A script sources it first thing, after `set -euo pipefail`; its messages are prefixed with
# its file name (PROG).
#
# Environment read here:
#   CLAMSMTP_REPO  the project checkout (default: two levels above this file)
#   CLAMSMTP_BIN   directory with python, clamsmtpd and clamsmtp-netsetup
#                  (default: $CLAMSMTP_REPO/.venv/bin when it exists, else commands from PATH)

PROVISION_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLAMSMTP_REPO="${CLAMSMTP_REPO:-$(cd "$PROVISION_DIR/../.." && pwd)}"
if [ -z "${CLAMSMTP_BIN:-}" ] && [ -x "$CLAMSMTP_REPO/.venv/bin/python" ]; then
    CLAMSMTP_BIN="$CLAMSMTP_REPO/.venv/bin"
fi
CLAMSMTP_BIN="${CLAMSMTP_BIN:-}"
START_TIMEOUT="${START_TIMEOUT:-60}"
PROG="${BASH_SOURCE[1]##*/}"
# The lab kit (lab/: clamdrun, sinkrun) is in neither the package nor scripts/install's venv:
# `env PYTHONPATH="$LAB_PYTHONPATH" python -m lab.X` runs the checkout's.
LAB_PYTHONPATH="$CLAMSMTP_REPO${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$PROG: $*"; }
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
die() { echo "$PROG: error: $*" >&2; exit 1; }

other_arg() {  # other_arg ARG: an argument the script's own options do not take
    case "$1" in
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
}

tool() {  # tool NAME: the project's command NAME (python, clamsmtpd, clamsmtp-netsetup)
    if [ -n "$CLAMSMTP_BIN" ] && [ -x "$CLAMSMTP_BIN/$1" ]; then
        echo "$CLAMSMTP_BIN/$1"
    elif [ "$1" = python ] && command -v python3 >/dev/null 2>&1; then
        command -v python3
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "$1 not found: run scripts/setup (it creates $CLAMSMTP_REPO/.venv) or set CLAMSMTP_BIN"
    fi
}

lab_python() {  # a Python that can run the lab's SMTP peer (lab.sinkrun needs aiosmtpd)
    # The product no longer depends on aiosmtpd (docs/dev/relay.md): scripts/install's venv has
    # none, the dev venv and Debian's python3-aiosmtpd (the box has it) do.
    local py
    for py in "$(tool python)" "$(command -v python3 || true)"; do
        if [ -n "$py" ] && "$py" -c 'import aiosmtpd' >/dev/null 2>&1; then
            echo "$py"
            return
        fi
    done
    die "no Python with aiosmtpd for the lab's mail server: apt-get install python3-aiosmtpd"
}

need() {  # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "$1 not found: install the Debian package $2 (scripts/setup)"
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
}

set_sysctl() {  # set_sysctl KEY VALUE (through /proc: no procps needed; not persisted)
    local path="/proc/sys/${1//.//}"
    [ -w "$path" ] || die "cannot set $1: $path is not writable"
    if [ "$(cat "$path")" != "$2" ]; then
        echo "$2" > "$path"
        say "$1 = $2"
    else
        say "$1 = $2 (already)"
    fi
}

alive() {  # alive PID: running, and not a zombie (an orphan's exit waits for its reaper)
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -n 's/^.*) \([A-Z]\) .*$/\1/p' "/proc/$1/stat" 2>/dev/null || true)"
    [ "$state" != Z ] && [ "$state" != X ]
}

pid_of() {  # pid_of PIDFILE: the live pid it names, or nothing
    local pid
    [ -s "$1" ] || return 0
    pid="$(tr -dc 0-9 < "$1")"
    if [ -n "$pid" ] && alive "$pid"; then
        echo "$pid"
    fi
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid i
    pid="$(pid_of "$1")"
    if [ -z "$pid" ]; then
        rm -f "$1"
        return 0
    fi
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$2 (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

start_background() {  # start_background LOGFILE PIDFILE NAME COMMAND...: start, wait for PIDFILE
    local log="$1" pidfile="$2" name="$3" pid deadline
    shift 3
    rm -f "$pidfile"
    setsid "$@" < /dev/null >> "$log" 2>&1 &
    pid=$!
    deadline=$((SECONDS + START_TIMEOUT))
    while [ -z "$(pid_of "$pidfile")" ]; do
        if ! alive "$pid"; then
            wait "$pid" 2>/dev/null || true
            echo "--- $log (last lines)" >&2
            tail -n 20 "$log" >&2 || true
            die "$name exited during start-up (log: $log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            kill -TERM "$pid" 2>/dev/null || true
            tail -n 20 "$log" >&2 || true
            die "$name did not become ready within $START_TIMEOUT s (log: $log)"
        fi
        sleep 0.1
    done
    say "$name running (pid $(pid_of "$pidfile"), log $log)"
}

# For a script that keeps one program running from its WORKDIR, with the pid file
# WORKDIR/PIDNAME: stop_if_down, then (for `up`) use_workdir.
stop_if_down() {  # stop_if_down PIDNAME NAME: needs root; `down` stops NAME and exits 0
    need_root
    PIDFILE="$WORKDIR/$1"
    if [ "$ACTION" = down ]; then
        stop_pidfile "$PIDFILE" "$2"
        exit 0
    fi
}

use_workdir() {  # use_workdir PIDNAME [SUBDIR]: creates WORKDIR[/SUBDIR]; WORKDIR absolute, PIDFILE
    mkdir -p "$WORKDIR/${2:-}"
    WORKDIR="$(cd "$WORKDIR" && pwd)"
    PIDFILE="$WORKDIR/$1"
}
