#!/usr/bin/env bash
# Records samples/trace.pcapng, the capture that tests/app/offline/test_trace.py checks `tcpguard trace` against
# tshark with. Real connections between two network namespaces joined by a veth pair:
#
#   * offloads off on both ends (tx/rx checksums, TSO, GSO, GRO), so every frame in the capture is one
#     wire-sized segment with a real checksum, as a gateway would see it;
#   * loss and reordering on both ends, so the capture holds out-of-order segments and retransmissions:
#     an iptables `statistic` rule drops 4% of the data segments each side sends, and a small NFQUEUE
#     program (the project's NetfilterQueue binding, in .venv) holds one data segment in four until the
#     next one has left (or 30 ms passed). netem would be the usual tool, but this kernel has none (`tc qdisc
#     add ... netem` answers "Specified qdisc kind is unknown"), so it is done in OUTPUT instead. tcpdump
#     runs in the client namespace: it sees the client's own packets after OUTPUT (reordered, a dropped one
#     missing until it is retransmitted) and the server's as they arrive, holes and all;
#   * several connections at once over IPv4 and IPv6 (Python sockets, see the inline programs below):
#     request/response with a FIN exchange, bulk transfers, a half-close, a reset by the client and one by
#     the server (SO_LINGER 0), a refused connection, and the same client port used twice for the same
#     server port (SO_REUSEADDR + bind), once after an RST and once after a normal close.
#
# Run as root from the repository root:   tools/make_trace_capture.sh [OUT]   (default samples/trace.pcapng)
# Everything it creates (namespaces, veths, processes, temporary files) is removed on exit, also on failure;
# the traffic never leaves the two namespaces. The whole run is bounded by `timeout`.
set -euo pipefail
out="${1:-samples/trace.pcapng}"
sfx="$$"
cns="tgtr-c-$sfx"; sns="tgtr-s-$sfx"
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in "$cns" "$sns"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

ip netns add "$cns"; ip netns add "$sns"
ip link add trc0 netns "$cns" type veth peer name trs0 netns "$sns"
for ns in "$cns" "$sns"; do ip -n "$ns" link set lo up; done
ip -n "$cns" addr add 10.98.0.1/24 dev trc0; ip -n "$sns" addr add 10.98.0.2/24 dev trs0
ip -n "$cns" addr add fd00:98::1/64 dev trc0 nodad; ip -n "$sns" addr add fd00:98::2/64 dev trs0 nodad
ip -n "$cns" link set trc0 up; ip -n "$sns" link set trs0 up
for pair in "$cns trc0" "$sns trs0"; do
    set -- $pair
    ip netns exec "$1" ethtool -K "$2" tx off rx off tso off gso off gro off >/dev/null
done

py="$(pwd)/.venv/bin/python"
cat > "$tmp/reorder.py" <<'EOF'
# Holds about one queued segment in four and lets the next one overtake it; a held segment leaves after
# 30 ms at the latest. Bounded by the `timeout` it runs under.
import random, select, sys, time
from netfilterqueue import NetfilterQueue
random.seed(int(sys.argv[1]))
held = []
def on_packet(pkt):
    if not held and random.random() < 0.25:
        held.append((time.monotonic() + 0.03, pkt))
        return
    pkt.accept()
    while held:
        held.pop()[1].accept()
nfq = NetfilterQueue()
nfq.bind(int(sys.argv[1]), on_packet)
fd = nfq.get_fd()
while True:
    select.select([fd], [], [], 0.005)
    nfq.run(block=False)
    while held and held[0][0] <= time.monotonic():
        held.pop()[1].accept()
EOF
# Data segments only (IP length >= 200): a lost SYN or FIN would only add seconds of back-off.
for spec in "$cns --dport 7" "$sns --sport 8"; do
    set -- $spec
    for ipt in iptables ip6tables; do
        ip netns exec "$1" "$ipt" -A OUTPUT -p tcp "$2" 8080 -m length --length 200:65535 \
            -m statistic --mode random --probability 0.04 -j DROP
        ip netns exec "$1" "$ipt" -A OUTPUT -p tcp "$2" 8080 -m length --length 200:65535 \
            -j NFQUEUE --queue-num "$3" --queue-bypass
    done
    ip netns exec "$1" timeout 90 "$py" "$tmp/reorder.py" "$3" & pids+=($!)
done

cat > "$tmp/server.py" <<'EOF'
# One thread per connection. The request line says what to answer: "GET <n> <how>" sends n bytes of a
# repeating, position-dependent pattern, then closes: "fin" normally, "rst" with SO_LINGER 0 (an RST).
import socket, struct, sys, threading

def pattern(n, salt):
    chunk = bytes((i * 7 + salt) & 0xFF for i in range(251))
    return (chunk * (n // 251 + 1))[:n]

def handle(c):
    with c:
        c.settimeout(10)
        req = b""
        while not req.endswith(b"\n"):
            b = c.recv(4096)
            if not b:
                return
            req += b
        _, n, how = req.split()
        c.sendall(pattern(int(n), len(req)))
        if how == b"rst":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            try:
                c.shutdown(socket.SHUT_WR)
                c.recv(1)  # wait for the client's FIN (or its RST, when it resets)
            except OSError:
                pass

def serve(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 8080))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

threading.Thread(target=serve, args=(socket.AF_INET6, "fd00:98::2"), daemon=True).start()
serve(socket.AF_INET, "10.98.0.2")
EOF

cat > "$tmp/client.py" <<'EOF'
# Interleaved connections; each one says what it does. Bounded: every socket has a timeout.
import socket, struct, threading, time

V4, V6 = ("10.98.0.2", 8080), ("fd00:98::2", 8080)

def conn(dst, n, how="fin", port=None, client_rst_after=None, half_close=False, body=b""):
    fam = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    if port is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
    try:
        s.connect(dst)
    except OSError:
        s.close()
        return
    s.sendall(body + f"GET {n} {how}\n".encode())
    if half_close:
        s.shutdown(socket.SHUT_WR)
    got = 0
    try:
        while True:
            if client_rst_after is not None and got >= client_rst_after:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            b = s.recv(65536)
            if not b:
                break
            got += len(b)
    except OSError:
        pass
    s.close()

jobs = [
    lambda: conn(V4, 300),                                   # small request/response, FIN exchange
    lambda: conn(V4, 60000),                                 # bulk: reordering, loss, retransmission
    lambda: conn(V6, 40000),                                 # bulk over IPv6
    lambda: conn(V6, 500, half_close=True),                  # client half-closes first
    lambda: conn(V4, 30000, client_rst_after=1),             # client resets mid-transfer
    lambda: conn(V4, 2000, how="rst"),                       # server resets after replying
    lambda: conn(V4, 20000, body=b"x" * 6000),               # client sends a multi-segment request
    lambda: conn(("10.98.0.2", 9), 0),                       # refused: SYN, RST-ACK
]
threads = [threading.Thread(target=j) for j in jobs]
for t in threads:
    t.start()
    time.sleep(0.03)
for t in threads:
    t.join(20)
# Port reuse: the same four-tuple twice in a row, after an RST and after a normal close.
conn(V4, 800, port=40001, client_rst_after=1)
conn(V4, 800, port=40001)
conn(V6, 700, port=40002)
time.sleep(0.3)
conn(V6, 700, port=40002, how="rst")
EOF

ip netns exec "$sns" timeout 90 python3 "$tmp/server.py" & pids+=($!)
ip netns exec "$cns" timeout 90 tcpdump -i trc0 -s 0 -U -w "$tmp/cap.pcap" tcp >/dev/null 2>&1 & pids+=($!)
tcpdump_pid=$!
sleep 1.5
ip netns exec "$cns" timeout 60 python3 "$tmp/client.py"
sleep 1
kill -INT "$tcpdump_pid"; wait "$tcpdump_pid" 2>/dev/null || true
# tcpdump writes classic pcap; the sample is pcapng (what Wireshark and dumpcap write) so the tests also
# cover that reader path and the pcapng per-flow output. editcap rewrites the container, not the frames.
editcap -F pcapng "$tmp/cap.pcap" "$out"
echo "wrote $out ($(stat -c %s "$out") bytes)"
