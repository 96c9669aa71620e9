#!/usr/bin/env bash
# Installs everything tcpguard needs on a fresh Debian/Ubuntu machine, as root:
# the system packages, then a virtual environment in .venv with tcpguard and its Python dependencies.
# Idempotent: running it again only brings things up to date.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs system packages)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
pkgs=(
    python3 python3-venv python3-dev build-essential pkg-config
    libnetfilter-queue-dev libnfnetlink-dev
    iptables iproute2 ethtool tshark tcpdump curl procps
    systemd systemd-container mmdebstrap
    docker-compose  # validates docker-compose.yml (`docker-compose config`); no Docker engine needed
)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: installing system packages: ${missing[*]}"
    apt-get update -qq
    # tshark asks whether non-root users may capture; answer no without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# setuptools too: pip builds tcpguard with its own, but `setup.py build_ext --inplace` (README) uses this one.
.venv/bin/python -m pip install -q --upgrade pip 'setuptools>=77' >/dev/null
.venv/bin/python -m pip install -q -e ".[daemon,test]"
echo "install.sh: ready ($(.venv/bin/python --version), tcpguard in .venv)"
