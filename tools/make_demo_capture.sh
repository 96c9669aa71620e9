#!/usr/bin/env bash
# Records samples/demo.pcap from real connections: a client and a server network namespace joined by a
# veth pair (offloads off, so checksums in the capture are real), Python's HTTP server, curl as client.
# Run as root from the repository root. Everything it creates is removed on exit, also on failure.
set -euo pipefail
out="${1:-samples/demo.pcap}"
sfx="$$"
cns="tgcap-c-$sfx"; sns="tgcap-s-$sfx"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$cns" 2>/dev/null || true
    ip netns del "$sns" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$cns"; ip netns add "$sns"
ip link add tgc0 netns "$cns" type veth peer name tgs0 netns "$sns"
for ns in "$cns" "$sns"; do ip -n "$ns" link set lo up; done
ip -n "$cns" addr add 10.99.0.1/24 dev tgc0; ip -n "$sns" addr add 10.99.0.2/24 dev tgs0
ip -n "$cns" addr add fd00:99::1/64 dev tgc0 nodad; ip -n "$sns" addr add fd00:99::2/64 dev tgs0 nodad
ip -n "$cns" link set tgc0 up; ip -n "$sns" link set tgs0 up
for pair in "$cns tgc0" "$sns tgs0"; do
    set -- $pair
    ip netns exec "$1" ethtool -K "$2" tx off rx off tso off gso off gro off >/dev/null 2>&1 || true
done
www=$(mktemp -d); trap 'cleanup; rm -rf "$www"' EXIT
printf 'hello from the server\n' > "$www/index.html"
head -c 200000 /dev/urandom | base64 > "$www/big.txt"
ip netns exec "$sns" python3 -m http.server 80 --bind :: --directory "$www" >/dev/null 2>&1 & pids+=($!)
ip netns exec "$sns" python3 -m http.server 9999 --bind 10.99.0.2 --directory "$www" >/dev/null 2>&1 & pids+=($!)
ip netns exec "$cns" tcpdump -i tgc0 -s 0 -U -w "$out" tcp >/dev/null 2>&1 & pids+=($!)
sleep 1.5
c() { ip netns exec "$cns" curl -s -o /dev/null --max-time 3 "$@" || true; }
c http://10.99.0.2/                                    # allowed
c http://10.99.0.2/big.txt                             # allowed, bulk
c -H 'Host: blocked.example' http://10.99.0.2/         # blocked host: half-reset
c 'http://10.99.0.2/cgi-bin/run?cmd=/bin/sh'           # shell-code pattern: reset
c http://10.99.0.2:9999/                               # port not on the allow-list: reset at SYN
c 'http://[fd00:99::2]/'                               # IPv6, allowed
sleep 1
kill "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
echo "wrote $out"
