"""Where the daemon's config is when nobody says: `tcpguard run` and `tcpguard iptables` read it, and the
control client looks there for the socket's path.

A module of its own because the CLI needs the path to build its help text for every command, and the
config module that could hold it imports the YAML parser (30 ms more for every `tcpguard` command)."""

from __future__ import annotations

DEFAULT_CONFIG = "/etc/tcpguard/tcpguard.yaml"
