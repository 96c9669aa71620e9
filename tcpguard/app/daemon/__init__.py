"""The inline daemon: config, workers and their supervisor, rule loading, logging, metrics, systemd.

Importing the package imports none of its modules (the CLI and the control client import
`tcpguard.app.daemon.defaults` alone, without the config parser or the packet loop)."""
