#!/usr/bin/env bash
# Installs everything, then runs the whole test suite: lint, types, unit, property, golden and the
# root integration tests (network namespaces, iptables, NFQUEUE). Run as root.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
./scripts/install.sh
echo "== ruff"; .venv/bin/ruff check tcpguard tests rules
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
