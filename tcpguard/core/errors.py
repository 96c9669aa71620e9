"""Error types of the core.

The split follows h11: `DecodeError` is the peer's fault (bytes on the wire that are not a packet we can
read) and is the only exception the decoder ever raises; `RuleLoadError` is the operator's fault (a rule
module that cannot be loaded); anything else escaping the core is our bug.
"""

from __future__ import annotations


class DecodeError(ValueError):
    """A packet is malformed: truncated, inconsistent lengths, bad header fields or options.

    Raised by `tcpguard.core.packet.decode` and the lazy option parser, never anything else, so an adapter
    can count and drop (or pass, by policy) whatever does not decode without crashing the packet loop.
    """


class RuleLoadError(Exception):
    """A rule module could not be loaded. `path` and `line` say where, `message` what."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


class RuleTimeout(BaseException):
    """Raised inside a rule call that ran past its time budget (see `tcpguard.app.daemon.budget`).

    A BaseException, not an Exception, so that a rule's own `except Exception:` cannot swallow it; the
    engine catches it around every rule call and applies the rule-error policy.
    """
