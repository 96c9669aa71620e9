"""What the engine has to say besides its verdicts: typed events for the application to log, count and
alert on (mitmproxy's rule: even a log line is an output of the layer).

The core never logs. The daemon turns these into log lines with journald fields
(`tcpguard.app.eventlog`), the offline tools into their reports; a test reads them as data. They are
rare (an error, a bound hit, a block, an alert), so one callback per event costs nothing on the packet
path. The trace of every verdict and stream event for `tcpguard replay --events` is the engine's `sink`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tcpguard.core.conntrack import BypassedFlow, Connection


@dataclass(frozen=True, slots=True)
class RuleError:
    """A rule call raised (or ran past its time budget); the flow gets the `rule_error` policy."""

    flow: Connection
    rule: str
    where: str  # `file:line` of the innermost frame in the rule's own module, or "?"
    error: BaseException
    policy: str


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A buffer bound met a connection, which gets the `limit` policy."""

    flow: Connection
    buffered: int  # bytes the connection held
    policy: str
    why: str  # "buffer limit hit on", "total buffer bound reached, freeing the buffer of"


@dataclass(frozen=True, slots=True)
class Blocked:
    """A connection was dropped, reset or half-reset, and by whom (a rule, a limit, the operator)."""

    flow: Connection
    action: str
    by: str


@dataclass(frozen=True, slots=True)
class Evicted:
    """The table was full: this connection was forgotten to make room for a new one."""

    flow: Connection


@dataclass(frozen=True, slots=True)
class Evictions:
    """A summary at the timer tick: `count` evictions since the last one (a SYN flood must not flood the
    log with one line each)."""

    count: int
    max_connections: int


@dataclass(frozen=True, slots=True)
class AlertRaised:
    """A rule raised an alert; `record` is the alert as written to the alerts file (EVE shape)."""

    flow: Connection
    record: dict[str, Any]
    direction: str


@dataclass(frozen=True, slots=True)
class BypassLeak:
    """Packets of a bypassed connection still reach the engine `seconds` after its bypass verdict: the
    kernel rule that lets marked connections through is missing (an operator's chain with
    `iptables.manage: false`). The engine keeps accepting them without inspection; this says why they
    still cost a trip through the daemon. Emitted at most once a minute."""

    flow: BypassedFlow
    seconds: float


EngineEvent = RuleError | LimitHit | Blocked | Evicted | Evictions | AlertRaised | BypassLeak
EventListener = Callable[[EngineEvent], None]
