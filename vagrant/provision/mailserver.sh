#!/usr/bin/env bash
# vagrant/provision/mailserver.sh: the lab's mail server, an SMTP sink that keeps what it gets.
#
#   mailserver.sh [up] [--listen ADDR] [--workdir DIR] [--tls-cert FILE --tls-key FILE]
#                                                        start it unless it already runs
#   mailserver.sh down [--workdir DIR]                   stop it
#
# Runs `python -m lab.sinkrun` (the project's RecordingNextHop): it accepts every
# message on ADDR (default 25: every address, IPv4 and IPv6) and stores each one in
# DIR/received/ as NNNNNN.eml (the message as received) and NNNNNN.json (the envelope), so a
# test can check exactly what arrived. Its log, with one line per message: DIR/sink.log.
# With --tls-cert and --tls-key it offers STARTTLS with that certificate.
# Idempotent: a second `up` with the same ADDR leaves it running; another ADDR restarts it.
#
# Environment: SINK_LISTEN (= --listen), SINK_WORKDIR (= --workdir, default
# /var/lib/clamsmtp-lab/mailserver), and see lib.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=up
LISTEN="${SINK_LISTEN:-25}"
WORKDIR="${SINK_WORKDIR:-/var/lib/clamsmtp-lab/mailserver}"
TLS_CERT=""
TLS_KEY=""
while [ $# -gt 0 ]; do
    case "$1" in
        up|down) ACTION="$1" ;;
        --listen) LISTEN="${2:?--listen needs an address}"; shift ;;
        --workdir) WORKDIR="${2:?--workdir needs a directory}"; shift ;;
        --tls-cert) TLS_CERT="${2:?--tls-cert needs a file}"; shift ;;
        --tls-key) TLS_KEY="${2:?--tls-key needs a file}"; shift ;;
        *) other_arg "$1" ;;
    esac
    shift
done

stop_if_down sink.pid "mail server"
use_workdir sink.pid received
if [ -n "$(pid_of "$PIDFILE")" ]; then
    if [ "$(cat "$WORKDIR/sink.listen" 2>/dev/null)" = "$LISTEN $TLS_CERT" ]; then
        say "mail server already running on $LISTEN (pid $(pid_of "$PIDFILE"))"
        exit 0
    fi
    stop_pidfile "$PIDFILE" "mail server"
fi
echo "$LISTEN $TLS_CERT" > "$WORKDIR/sink.listen"
TLS_ARGS=()
[ -z "$TLS_CERT" ] || TLS_ARGS=(--tls-cert "$TLS_CERT" --tls-key "${TLS_KEY:-$TLS_CERT}")
start_background "$WORKDIR/sink.log" "$PIDFILE" "mail server" \
    env PYTHONPATH="$LAB_PYTHONPATH" "$(lab_python)" -m lab.sinkrun --listen "$LISTEN" \
    --record-dir "$WORKDIR/received" --pidfile "$PIDFILE" "${TLS_ARGS[@]}"
say "messages are stored in $WORKDIR/received"
