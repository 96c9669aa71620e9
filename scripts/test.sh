#!/usr/bin/env bash
# Installs everything, then runs the whole test suite: lint, types, unit, property, golden and the
# root integration tests (network namespaces, iptables, NFQUEUE). Run as root.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
./scripts/install.sh
echo "== ruff"; .venv/bin/ruff check tcpguard tests rules
echo "== mypy"; .venv/bin/mypy
# The install compiles the hot core with mypyc (setup.py) and falls back to pure Python if it cannot:
# a silent fallback would test and ship the slow core, so the suite insists on the compiled one.
mode="$(.venv/bin/python -c 'import tcpguard.core as c; print(c.MODE)')"
echo "== core: $mode"
if [ "$mode" != compiled ] && [ -z "${TCPGUARD_PURE:-}" ]; then
    echo "the core is not compiled (see the pip output of scripts/install.sh)" >&2
    exit 1
fi
echo "== pytest (pure-Python core: sans-IO and golden tests)"
TCPGUARD_PURE=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/core tests/golden
echo "== pytest"; .venv/bin/python -m pytest -q "$@"
