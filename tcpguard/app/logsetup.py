"""Logging of the daemon: to the journal with structured fields under systemd, to stderr otherwise.

Log records of the engine carry journald-style fields in `extra` (TCPGUARD_FLOW, TCPGUARD_RULE,
TCPGUARD_VERDICT, TCPGUARD_SEVERITY, ...); the journal handler stores them as fields, so an operator can
`journalctl -u tcpguard TCPGUARD_RULE=shellcode.no_shellcode`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from tcpguard.app.config import Config


def setup_logging(cfg: Config, verbose: int = 0) -> None:
    level = getattr(logging, cfg.logging.level.upper())
    if verbose:
        level = min(level, logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler | None = None
    target = cfg.logging.target
    if target == "journal" or (target == "auto" and os.environ.get("JOURNAL_STREAM")):
        with contextlib.suppress(ImportError):
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="tcpguard")
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
