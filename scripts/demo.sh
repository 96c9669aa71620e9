#!/usr/bin/env bash
# Installs everything, then runs the main job: the sample capture replayed through the sample rules.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
./scripts/install.sh
mkdir -p out
.venv/bin/tcpguard replay samples/demo.pcap --rules rules --out out/demo-forwarded.pcap --events out/demo-events.jsonl
echo "forwarded packets: out/demo-forwarded.pcap   events: out/demo-events.jsonl"
