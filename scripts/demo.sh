#!/usr/bin/env bash
# Installs everything, then runs the main job: `tcpguard lab`. It builds a client, a gateway running
# tcpguard with the sample rules of rules/ and a server from network namespaces, drives a scripted mix of
# allowed, dropped and reset connections, shows what happens to each, and removes everything at the end
# (also on Ctrl-C). Runs by itself in well under a minute; exit status 0 when every connection went as the
# sample rules say. Run as root. Arguments go to `tcpguard lab` (e.g. --stay to keep the network up and
# try things by hand, --out DIR to keep the logs).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
./scripts/install.sh
exec .venv/bin/tcpguard lab "$@"
