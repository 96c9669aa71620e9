#!/usr/bin/env bash
# Installs tcpguard as a systemd service on this machine, as root. Run it from a checkout (it installs
# that checkout):
#
#   scripts/install-service.sh                      # install or upgrade
#   scripts/install-service.sh --wheelhouse DIR     # offline: Python packages only from DIR (pip wheels)
#   scripts/install-service.sh --uninstall          # remove the program and the unit, keep /etc/tcpguard
#
# What goes where (docs/service.md explains each choice):
#   /opt/tcpguard/                 a virtual environment with tcpguard and its Python dependencies
#   /usr/local/bin/tcpguard        symlink to /opt/tcpguard/bin/tcpguard (the unit runs this path)
#   /etc/tcpguard/tcpguard.yaml    the config, only if there is none yet (else tcpguard.yaml.dist beside it)
#   /etc/tcpguard/rules/           the sample rules, only when the directory is created
#   /etc/systemd/system/tcpguard.service, then `systemctl daemon-reload` when systemd runs
#   /usr/local/share/doc/tcpguard/ the documentation and the sample rules for reference
#
# It never enables or starts the service: a packet filter goes live when the operator has read the rules.
# Everything it writes is owned by root and not writable by anyone else, because the daemon executes
# the rule modules and the rule loader refuses world-writable files. Running it again upgrades the
# program and the unit and leaves the operator's config and rules alone.
set -euo pipefail
umask 022

src="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/tcpguard
etc=/etc/tcpguard
bindir=/usr/local/bin
unitdir=/etc/systemd/system
docdir=/usr/local/share/doc/tcpguard
python=/usr/bin/python3
wheelhouse=""
action=install

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) wheelhouse="$(cd "${2:?--wheelhouse needs a directory}" && pwd)"; shift 2 ;;
        --uninstall) action=uninstall; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install-service.sh: unknown argument: $1" >&2; usage 2 ;;
    esac
done

say() { echo "install-service.sh: $*"; }
die() { echo "install-service.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it writes to /opt, /etc and /usr/local)"
systemd_running() { [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
    if systemd_running; then
        systemctl disable --now tcpguard.service 2>/dev/null || true
    fi
    rm -f "$unitdir/tcpguard.service" "$unitdir/tcpguard.service.d/50-iptables-legacy.conf"
    rmdir "$unitdir/tcpguard.service.d" 2>/dev/null || true
    if [ "$(readlink "$bindir/tcpguard" 2>/dev/null)" = "$prefix/bin/tcpguard" ]; then
        rm -f "$bindir/tcpguard"
    fi
    rm -rf "$prefix" "$docdir"
    if systemd_running; then
        systemctl daemon-reload
    fi
    say "removed tcpguard; kept $etc (config and rules) and /var/log/tcpguard (alerts)"
    exit 0
fi

# ------------------------------------------------------------------------------------- system packages
# Runtime: the interpreter, venv, iptables and the NFQUEUE library. Building NetfilterQueue from source
# needs a compiler and headers too, unless a wheelhouse brings it built.
pkgs=(python3 python3-venv iptables libnetfilter-queue1)
if [ -z "$wheelhouse" ]; then
    pkgs+=(python3-dev build-essential pkg-config libnetfilter-queue-dev libnfnetlink-dev)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x "$python" ] || die "$python not found"

# ------------------------------------------------------------------------------------- the program
# The package is built from a copy of the sources it needs: the checkout may be read-only (a bind
# mount, a CI clone) and a build writes into its source directory.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cp -r "$src/pyproject.toml" "$src/setup.py" "$src/README.md" "$src/tcpguard" "$build/"
find "$build" -name __pycache__ -prune -exec rm -rf {} +
# A development checkout may hold an in-place mypyc build of the core: the install makes its own (with a
# compiler and Python headers; else the core installs as pure Python, see setup.py).
find "$build/tcpguard/core" \( -name '*.so' -o -name _compiled_sources.json \) -delete

if ! "$prefix/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating the virtual environment $prefix"
    rm -rf "$prefix"
    "$python" -m venv "$prefix"
fi
pip=("$prefix/bin/python" -m pip --disable-pip-version-check --no-input -q install)
if [ -n "$wheelhouse" ]; then
    pip+=(--no-index --find-links "$wheelhouse")
fi
say "installing tcpguard from $src into $prefix"
"${pip[@]}" "$build[daemon]"
chown -R root:root "$prefix"
chmod -R go-w "$prefix"
ln -sfn "$prefix/bin/tcpguard" "$bindir/tcpguard"

# ------------------------------------------------------------------------------------- config and rules
install -d -m 0755 -o root -g root "$etc"
# The shipped config with the two paths a service needs: the rules in /etc and the alerts in the
# service's LogsDirectory. Every other key keeps its documented default.
sed -e 's|^rules_dir: .*|rules_dir: /etc/tcpguard/rules|' \
    -e '/^alerts:/,/^[^ #]/ s|^  file: null$|  file: /var/log/tcpguard/alerts.jsonl|' \
    "$src/etc/tcpguard.yaml" > "$build/tcpguard.yaml"
grep -q '^rules_dir: /etc/tcpguard/rules$' "$build/tcpguard.yaml" || die "could not set rules_dir in the config"
grep -q '^  file: /var/log/tcpguard/alerts.jsonl$' "$build/tcpguard.yaml" || die "could not set alerts.file"
if [ ! -e "$etc/tcpguard.yaml" ]; then
    install -m 0644 -o root -g root "$build/tcpguard.yaml" "$etc/tcpguard.yaml"
    say "installed $etc/tcpguard.yaml"
elif ! cmp -s "$build/tcpguard.yaml" "$etc/tcpguard.yaml"; then
    install -m 0644 -o root -g root "$build/tcpguard.yaml" "$etc/tcpguard.yaml.dist"
    say "kept your $etc/tcpguard.yaml; this version's default is $etc/tcpguard.yaml.dist"
fi
# Sample rules only into a new directory: re-adding a module the operator deleted on purpose would turn
# a rule back on at the next upgrade.
if [ ! -e "$etc/rules" ]; then
    install -d -m 0755 -o root -g root "$etc/rules"
    install -m 0644 -o root -g root "$src"/rules/*.py "$etc/rules/"
    say "installed the sample rules into $etc/rules: review them before starting the service"
fi
for f in "$etc" "$etc/rules" "$etc/tcpguard.yaml" "$etc"/rules/*.py; do
    if [ -e "$f" ] && [ -n "$(find "$f" -maxdepth 0 -perm -o+w)" ]; then
        say "warning: $f is writable by every user; tcpguard refuses to load rules from such files (chmod o-w)"
    fi
done

install -d -m 0755 "$docdir" "$docdir/examples/rules"
install -m 0644 "$src/README.md" "$src/docs/service.md" "$docdir/"
install -m 0644 "$src"/rules/*.py "$docdir/examples/rules/"

# ------------------------------------------------------------------------------------- the unit
install -m 0644 -o root -g root "$src/systemd/tcpguard.service" "$unitdir/tcpguard.service"
# Legacy iptables needs its lock file, which the unit's transient user cannot use: a drop-in, kept in
# step with the iptables variant selected now (systemd/iptables-legacy.conf explains).
dropin="$unitdir/tcpguard.service.d/50-iptables-legacy.conf"
if iptables -V 2>/dev/null | grep -q legacy; then
    install -d -m 0755 "$unitdir/tcpguard.service.d"
    install -m 0644 -o root -g root "$src/systemd/iptables-legacy.conf" "$dropin"
    say "iptables is the legacy variant: installed $dropin (the daemon runs as root, see there)"
elif [ -e "$dropin" ]; then
    rm -f "$dropin"
    rmdir "$unitdir/tcpguard.service.d" 2>/dev/null || true
    say "iptables is no longer the legacy variant: removed $dropin"
fi
if systemd_running; then
    systemctl daemon-reload
    if systemctl -q is-active tcpguard.service; then
        say "tcpguard.service is running the previous version: systemctl restart tcpguard to switch"
    fi
else
    say "systemd is not running here: the unit takes effect at the next boot"
fi

if ! "$bindir/tcpguard" check --config "$etc/tcpguard.yaml" >/dev/null; then
    say "warning: tcpguard check --config $etc/tcpguard.yaml fails (see above); fix it before starting"
fi
say "done. Next: review $etc/tcpguard.yaml and $etc/rules, then: systemctl enable --now tcpguard"
