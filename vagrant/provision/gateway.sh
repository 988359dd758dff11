#!/usr/bin/env bash
# vagrant/provision/gateway.sh: make this machine a transparent scanning SMTP gateway.
#
#   gateway.sh [up] --lan-if IFACE [options] [-- NETSETUP-OPTIONS...]
#   gateway.sh down [--proxy-port PORT] [--workdir DIR]   netsetup disable, stop the daemon
#   gateway.sh status --lan-if IFACE [--proxy-port PORT]  clamsmtp-netsetup status
#
# `up`, in this order:
#  1. routing on: net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1 (not persisted);
#  2. writes DIR/clamsmtpd.conf: TransparentProxy on, Listen on the bare proxy port (the daemon
#     then binds [::] dual-stack and takes IPv4 and IPv6), ClamAddress, TempDirectory
#     DIR/spool, Action (default bounce: the sender's MTA is told, the mail is refused);
#  3. starts clamsmtpd in the foreground mode (-d 3) in the background, log DIR/clamsmtpd.log,
#     pid file DIR/run/clamsmtpd.pid; kept running when the config did not change;
#  4. clamsmtp-netsetup enable -i IFACE --proxy-port PORT (itself idempotent): TCP port 25
#     arriving on IFACE is REDIRECTed to the daemon, which forwards it to the address the
#     client dialled (SO_ORIGINAL_DST).
# Running it again gives the same state. It needs root.
#
# Options (environment variable in brackets):
#   --lan-if IFACE        interface the clients' mail arrives on; repeatable [LAN_IF]
#   --proxy-port PORT     the daemon's port (default 10025) [PROXY_PORT]
#   --clam-address ADDR   clamd's socket or host:port (default /var/run/clamav/clamd.ctl)
#                         [CLAM_ADDRESS]
#   --action ACTION       bounce | drop | pass (default bounce) [CLAMSMTPD_ACTION]
#   --user USER           User: the daemon switches to after binding (default: none, it stays
#                         root); it must reach ClamAddress [CLAMSMTPD_USER]
#   --max-connections N   MaxConnections (default 64) [MAX_CONNECTIONS]
#   --workers N           Workers (default 1: one process) [CLAMSMTPD_WORKERS]
#   --transparent MODE    on (default: netfilter REDIRECT, the server sees the gateway) or
#                         full (TPROXY + policy routing: the server sees the client's own
#                         address; netsetup --mode tproxy) [TRANSPARENT]
#   --workdir DIR         config, spool, log, pid file (default /var/lib/clamsmtp-lab/gateway)
#                         [GATEWAY_WORKDIR]
#   --tls-cert FILE       ClientTLS: on with this PEM certificate (and --tls-key FILE): the
#                         daemon offers clients STARTTLS (towards servers OutTLS: may anyway)
#   -- OPTIONS            passed on to `clamsmtp-netsetup enable` and `status`
#                         (e.g. -- --local --user clamsmtp: the gateway's own mail too; then
#                         the daemon must run as that user, --user clamsmtp, or it would
#                         redirect its own connections back to itself: refused)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=up
LAN_IFS=()
[ -n "${LAN_IF:-}" ] && read -r -a LAN_IFS <<< "${LAN_IF//,/ }"
PROXY_PORT="${PROXY_PORT:-10025}"
CLAM_ADDRESS="${CLAM_ADDRESS:-/var/run/clamav/clamd.ctl}"
VIRUS_ACTION="${CLAMSMTPD_ACTION:-bounce}"
DAEMON_USER="${CLAMSMTPD_USER:-}"
MAX_CONNECTIONS="${MAX_CONNECTIONS:-64}"
WORKERS="${CLAMSMTPD_WORKERS:-1}"
TRANSPARENT="${TRANSPARENT:-on}"
WORKDIR="${GATEWAY_WORKDIR:-/var/lib/clamsmtp-lab/gateway}"
NETSETUP_EXTRA=()
TLS_CERT=""
TLS_KEY=""
while [ $# -gt 0 ]; do
    case "$1" in
        up|down|status) ACTION="$1" ;;
        --lan-if|-i) LAN_IFS+=("${2:?--lan-if needs an interface}"); shift ;;
        --proxy-port) PROXY_PORT="${2:?--proxy-port needs a port}"; shift ;;
        --clam-address) CLAM_ADDRESS="${2:?--clam-address needs an address}"; shift ;;
        --action) VIRUS_ACTION="${2:?--action needs bounce, drop or pass}"; shift ;;
        --user) DAEMON_USER="${2?--user needs a user name}"; shift ;;
        --max-connections) MAX_CONNECTIONS="${2:?--max-connections needs a number}"; shift ;;
        --workers) WORKERS="${2:?--workers needs a number}"; shift ;;
        --transparent) TRANSPARENT="${2:?--transparent needs on or full}"; shift ;;
        --workdir) WORKDIR="${2:?--workdir needs a directory}"; shift ;;
        --tls-cert) TLS_CERT="${2:?--tls-cert needs a file}"; shift ;;
        --tls-key) TLS_KEY="${2:?--tls-key needs a file}"; shift ;;
        --) shift; NETSETUP_EXTRA=("$@"); break ;;
        *) other_arg "$1" ;;
    esac
    shift
done

[[ "$PROXY_PORT" =~ ^[0-9]+$ ]] && [ "$PROXY_PORT" -ge 1 ] && [ "$PROXY_PORT" -le 65535 ] \
    || die "--proxy-port: invalid port '$PROXY_PORT'"
case "$VIRUS_ACTION" in bounce|drop|pass) ;; *) die "--action: bounce, drop or pass" ;; esac
case "$TRANSPARENT" in
    on) MODE=redirect ;;
    full) MODE=tproxy ;;
    *) die "--transparent: on or full" ;;
esac
need_root
NETSETUP="$(tool clamsmtp-netsetup)"

# --local also redirects the gateway's own outgoing port-25 connections, except those of the
# --user that netsetup exempts. The daemon's connections to the real servers must be that
# user's, or each one is redirected back to the daemon: a loop that only ends when
# MaxConnections is reached (the client then gets "421 Server busy").
LOCAL=no
EXEMPT_USER=clamsmtp
for ((i = 0; i < ${#NETSETUP_EXTRA[@]}; i++)); do
    case "${NETSETUP_EXTRA[$i]}" in
        --local) LOCAL=yes ;;
        --user) EXEMPT_USER="${NETSETUP_EXTRA[$((i + 1))]:-}" ;;
        --user=*) EXEMPT_USER="${NETSETUP_EXTRA[$i]#--user=}" ;;
    esac
done
if [ "$ACTION" = up ] && [ "$LOCAL" = yes ]; then
    exempt_uid="$(id -u "$EXEMPT_USER" 2>/dev/null || echo "$EXEMPT_USER")"
    daemon_uid="$(id -u "${DAEMON_USER:-root}" 2>/dev/null || echo "?")"
    [ "$exempt_uid" = "$daemon_uid" ] || die "netsetup --local exempts user '$EXEMPT_USER'" \
        "but the daemon runs as '${DAEMON_USER:-root}': its own connections would be" \
        "redirected back to it (a loop); give --user $EXEMPT_USER to gateway.sh as well"
fi
IFACE_ARGS=()
for iface in "${LAN_IFS[@]}"; do
    IFACE_ARGS+=(-i "$iface")
done

if [ "$ACTION" = down ]; then
    "$NETSETUP" disable --proxy-port "$PROXY_PORT"
    stop_pidfile "$WORKDIR/run/clamsmtpd.pid" clamsmtpd
    exit 0
fi
[ "${#LAN_IFS[@]}" -gt 0 ] || die "--lan-if IFACE is required (the interface clients' mail comes in on)"
if [ "$ACTION" = status ]; then
    exec "$NETSETUP" status "${IFACE_ARGS[@]}" --proxy-port "$PROXY_PORT" --mode "$MODE" \
        "${NETSETUP_EXTRA[@]}"
fi

# 1. routing
set_sysctl net.ipv4.ip_forward 1
if [ -e /proc/sys/net/ipv6/conf/all/forwarding ]; then
    set_sysctl net.ipv6.conf.all.forwarding 1
else
    say "IPv6 is disabled in this kernel: IPv4 only"
fi

# 2. the daemon's configuration
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
CONF="$WORKDIR/clamsmtpd.conf"
PIDFILE="$WORKDIR/run/clamsmtpd.pid"
SPOOL="$WORKDIR/spool"
mkdir -p "$SPOOL" "$WORKDIR/run"
chmod 700 "$SPOOL"
if [ -n "$DAEMON_USER" ]; then
    id "$DAEMON_USER" >/dev/null 2>&1 || die "--user: no such user '$DAEMON_USER'"
    # the spool is the daemon's; run/ lets it remove its pid file at exit
    chown "$DAEMON_USER" "$SPOOL" "$WORKDIR/run"
else
    chown 0 "$SPOOL" "$WORKDIR/run"
fi
NEW_CONF="$(cat <<EOF
# clamsmtpd.conf written by vagrant/provision/gateway.sh (rewritten on every run)
# Transparent mode: the firewall REDIRECTs (on) or TPROXYs (full) port 25 here; the next hop
# is where the client was going, so there is no OutAddress. With full the mail server sees
# the client's own address (clamsmtpd keeps CAP_NET_ADMIN for that).
TransparentProxy: $TRANSPARENT
# A bare port: every address, IPv4 and IPv6 ([::] dual-stack). Not 127.0.0.1: REDIRECT
# delivers forwarded mail to the address of the interface it came in on.
Listen: $PROXY_PORT
ClamAddress: $CLAM_ADDRESS
TempDirectory: $SPOOL
# bounce: an infected message is refused (550) so the sending client knows.
Action: $VIRUS_ACTION
MaxConnections: $MAX_CONNECTIONS
$([ "$WORKERS" = 1 ] || echo "Workers: $WORKERS")
TimeOut: 180
PidFile: $PIDFILE
${DAEMON_USER:+User: $DAEMON_USER}
${TLS_CERT:+# STARTTLS towards clients with this certificate; towards servers OutTLS: may}
${TLS_CERT:+ClientTLS: on}
${TLS_CERT:+TLSCertificate: $TLS_CERT}
${TLS_KEY:+TLSKey: $TLS_KEY}
EOF
)"
CHANGED=yes
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$NEW_CONF" ]; then
    CHANGED=no
fi
printf '%s\n' "$NEW_CONF" > "$CONF.tmp"
mv "$CONF.tmp" "$CONF"
say "wrote $CONF (changed: $CHANGED)"
"$(tool clamsmtpd)" --check-config -f "$CONF" > /dev/null

# 3. the daemon
if [ -n "$(pid_of "$PIDFILE")" ] && [ "$CHANGED" = no ]; then
    say "clamsmtpd already running with this config (pid $(pid_of "$PIDFILE"))"
else
    stop_pidfile "$PIDFILE" clamsmtpd
    start_background "$WORKDIR/clamsmtpd.log" "$PIDFILE" clamsmtpd \
        "$(tool clamsmtpd)" -d 3 -f "$CONF"
fi

# 4. the redirect
"$NETSETUP" enable "${IFACE_ARGS[@]}" --proxy-port "$PROXY_PORT" --mode "$MODE" \
    "${NETSETUP_EXTRA[@]}"
say "gateway up: TCP 25 arriving on ${LAN_IFS[*]} goes through clamsmtpd on port $PROXY_PORT ($MODE)"
