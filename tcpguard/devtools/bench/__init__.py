"""`tcpguard bench`: tcpguard side by side with the alternatives, on the network-namespace test network.

    tcpguard bench [--short] [--duration S] [--doc docs/BENCHMARKS.md] [--profile DIR]

One run builds a throwaway client <-> gw <-> server network of namespaces (the topology of
`tcpguard.devtools.labnet`, which `tests/netns.py` re-exports: veth pairs created inside their
namespaces, addresses only there, removed at the end, also on failure or SIGTERM) and sends the same
traffic through the gateway configured as each of:

* `none`: plain forwarding, no filter: the link's own figure;
* `kernel`: one iptables rule, `-m string --algo bm --string /bin/sh -j REJECT --reject-with tcp-reset`
  (what operators use without user space; no reassembly, so a split pattern passes);
* `nfq-bare`: a tiny separate process that binds the NFQUEUE with NetfilterQueue and accepts every
  packet (the floor cost of any Python NFQUEUE filter);
* `nfq-scapy`: the tutorial filter: every packet parsed with scapy, its payload searched for `/bin/sh`;
* `tcpguard-1`, `tcpguard-N`: `tcpguard run` with the shipped sample rules (`rules/`), one worker, and
  one worker per core (N = the number of cores; `--queue-balance`).

Every NFQUEUE path fails closed (no `--queue-bypass`, no fail-open flag): a packet the filter is too slow
for is dropped, never waved through uninspected, so every packet counted went through the filter.
Offloads (TSO, GSO, GRO, checksums) are off on every veth, so each packet is a wire-sized segment, as a
gateway on a real link sees it, and packet counts mean the same thing on every path.

Traffic, per path (a Python load generator, `_role_*` below, bounded in count and time):

* `latency`: one connection doing sequential small HTTP-like request/responses on an idle path
  (p50/p99 of the round trip; "added" is the difference to the `none` path);
* `rr`: many concurrent connections (64 by default), each doing 10 small request/response exchanges
  (HTTP/1.1 keep-alive), then closing and reconnecting, to port 8080 (so every sample rule runs: the
  allow-list, the rate limit, the Host-header reader and the shell-code scanner). The client closes
  first, so TIME_WAIT stays on the client side, where the load generator's port allocation skips it: when
  the server closed first, a whole benchmark run (~200,000 connections) filled the server's TIME_WAIT
  table (131,072 entries), after which reused ports met old connections and every path stalled on SYN
  retransmissions, more or less depending on what ran before it;
* `bulk`: two uploads and two downloads running at once, to port 443 (the shell-code scanner reads every
  uploaded byte).

Figures: packets and bytes per second forwarded by the gateway (the gw's veth `tx` counters, both
directions, over a steady-state window that excludes ramp-up and ramp-down); CPU per packet (CPU time
of every process in the gw namespace, from /proc/PID/task/*/schedstat, divided by those packets; the
kernel's forwarding work is charged to them when it runs in their system calls) and the whole machine's
busy share (/proc/stat, load generator included); the kernel's NFQUEUE drop counters. Then, without the
network: resident memory per idle tracked connection (100,000 connections fabricated through the engine in
a fresh process, RSS delta / count; and, on the network, real connections held open through the daemon),
and offline `tcpguard replay` and `tcpguard trace` throughput on a generated capture of >= 200,000 packets.

The machine has few cores and the load generator shares them with the gateway, so each row also says how
busy the machine was: a path that leaves the machine idle was limited by the filter, one that saturates
it may be limited by the load generator. `--short` is the CI mode: everything runs, with small counts.

The package: `network` (the namespaces, links and gateway paths), `load` (the traffic generators and
fabricated captures), `measurement` (samples, runs, memory, offline figures), `report` (tables and
docs/BENCHMARKS.md), `command` (the command line and the order of a run).
"""
