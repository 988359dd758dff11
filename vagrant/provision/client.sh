#!/usr/bin/env bash
# vagrant/provision/client.sh: a mail client behind the gateway.
#
#   client.sh [up] [--via GW4] [--via6 GW6] [--net CIDR]... [--net6 CIDR]...
#       routes to the mail servers' networks through the gateway (`ip route replace`,
#       idempotent); nothing to do when the default route already points at the gateway.
#   client.sh send --server ADDR [--port 25] [--eicar] [--tls] [--subject TEXT] [--from A]
#           [--to B]
#       sends one message with swaks (`--eicar`: with the EICAR test file attached; `--tls`:
#       STARTTLS required, the certificate not checked) and exits
#       with swaks' status: 0 accepted, 26 refused after DATA (a virus bounced), 2 no
#       connection, ... (swaks(1), EXIT CODES).
#
# Environment: CLIENT_VIA, CLIENT_VIA6, CLIENT_NETS, CLIENT_NETS6 (space-separated) for `up`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=up
VIA="${CLIENT_VIA:-}"
VIA6="${CLIENT_VIA6:-}"
read -r -a NETS <<< "${CLIENT_NETS:-}"
read -r -a NETS6 <<< "${CLIENT_NETS6:-}"
SERVER=""
PORT=25
EICAR=no
TLS=no
SUBJECT=""
FROM="alice@example.com"
TO="bob@example.com"
while [ $# -gt 0 ]; do
    case "$1" in
        up|send) ACTION="$1" ;;
        --via) VIA="${2:?--via needs the gateway IPv4 address}"; shift ;;
        --via6) VIA6="${2:?--via6 needs the gateway IPv6 address}"; shift ;;
        --net) NETS+=("${2:?--net needs a CIDR}"); shift ;;
        --net6) NETS6+=("${2:?--net6 needs a CIDR}"); shift ;;
        --server) SERVER="${2:?--server needs an address}"; shift ;;
        --port) PORT="${2:?--port needs a port}"; shift ;;
        --eicar) EICAR=yes ;;
        --tls) TLS=yes ;;
        --subject) SUBJECT="${2?--subject needs a text}"; shift ;;
        --from) FROM="${2:?--from needs an address}"; shift ;;
        --to) TO="${2:?--to needs an address}"; shift ;;
        *) other_arg "$1" ;;
    esac
    shift
done

add_routes() {  # add_routes 4|6 GATEWAY NET...: `ip route replace NET via GATEWAY` for each
    local family="$1" via="$2" six="" net
    shift 2
    [ "$family" = 4 ] || six=6
    for net in "$@"; do
        [ -n "$via" ] || die "--net$six $net needs --via$six"
        need_root
        ip -"$family" route replace "$net" via "$via"
        say "route $net via $via"
    done
}

if [ "$ACTION" = up ]; then
    add_routes 4 "$VIA" "${NETS[@]}"
    add_routes 6 "$VIA6" "${NETS6[@]}"
    [ "${#NETS[@]}" -gt 0 ] || [ "${#NETS6[@]}" -gt 0 ] || say "no routes to add"
    exit 0
fi

need swaks swaks
[ -n "$SERVER" ] || die "send: --server ADDR is required"
ARGS=(--server "$SERVER" --port "$PORT" --helo client.test --from "$FROM" --to "$TO"
      --timeout 60)
if [ "$EICAR" = yes ]; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    # The EICAR test string in two halves, so that this file is not itself "infected".
    printf '%s%s' 'X5O!P%@AP[4\PZX54(P^)7CC)7}$' 'EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*' \
        > "$TMP/eicar.com"
    ARGS+=(--header "Subject: ${SUBJECT:-netlab: EICAR}" --body "See the attachment."
           --attach-type application/octet-stream --attach "@$TMP/eicar.com")
else
    ARGS+=(--header "Subject: ${SUBJECT:-netlab: clean}" --body "Hello through the gateway.")
fi
[ "$TLS" = yes ] && ARGS+=(--tls)  # STARTTLS, required (the certificate is not checked)
status=0
swaks "${ARGS[@]}" || status=$?
exit "$status"
