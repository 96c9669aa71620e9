#!/bin/sh
# Entrypoint of the tcpguard lab image: the first argument is the container's role.
#
#   gateway  tcpguard inline: the sample rules (plus the lab observer) on NFQUEUE, iptables FORWARD rules
#            installed at start and removed at stop. Needs NET_ADMIN and NET_RAW and ip_forward=1.
#   server   the lab's servers (HTTP on 80 and 8080, a TLS stand-in on 443), routed via the gateway.
#   client   routed via the gateway; runs the scripted mix once (`tcpguard lab drive`), then stays up so
#            that `docker compose exec client ...` can try more.
#   anything else is run as a command.
#
# The containers share the lab volume (TCPGUARD_LAB_DIR): the gateway writes alerts and the observer's
# end_connection records there, the server its connection records, and the client reads all three.
# The paths can be overridden by environment (the test suite runs this script in network namespaces).
set -eu

role="${1:-gateway}"
[ "$#" -gt 0 ] && shift
lab="${TCPGUARD_LAB_DIR:-/var/lib/tcpguard-lab}"
config="${TCPGUARD_CONFIG:-/etc/tcpguard/tcpguard.yaml}"
rules="${TCPGUARD_RULES:-/etc/tcpguard/rules}"
mkdir -p "$lab"

route_via_gateway() {
    # The compose networks are separate bridges; the gateway container is the only way between them.
    if [ -n "${TCPGUARD_LAB_ROUTE:-}" ]; then
        ip route replace "$TCPGUARD_LAB_ROUTE" via "$TCPGUARD_LAB_GATEWAY"
        echo "route: $TCPGUARD_LAB_ROUTE via $TCPGUARD_LAB_GATEWAY"
    fi
}

case "$role" in
gateway)
    # First line of `docker compose logs gateway`: the version and which core runs (compiled or pure);
    # the daemon's `running:` line says it again once the queue is bound.
    echo "gateway: $(tcpguard --version)"
    rm -f "$lab/events.jsonl" "$lab/alerts.jsonl"
    tcpguard lab rules "$rules" --samples "${TCPGUARD_SAMPLES:-/opt/tcpguard/rules}" \
        --events "$lab/events.jsonl"
    tcpguard check --config "$config"
    # exec: tcpguard is PID 1 and gets docker's SIGTERM, so it removes its iptables rules on stop.
    exec tcpguard run --config "$config"
    ;;
server)
    route_via_gateway
    rm -f "$lab/server.jsonl"
    exec tcpguard lab serve --record "$lab/server.jsonl" "$@"
    ;;
client)
    route_via_gateway
    tcpguard lab drive --server "${TCPGUARD_LAB_SERVER:?set TCPGUARD_LAB_SERVER}" --lab-dir "$lab" \
        --wait-for-server 30 "$@" || echo "client: some steps did not go as expected (see above)"
    echo "client: done; try more with: docker compose exec client tcpguard lab drive --server $TCPGUARD_LAB_SERVER"
    exec sleep infinity
    ;;
*)
    exec "$role" "$@"
    ;;
esac
