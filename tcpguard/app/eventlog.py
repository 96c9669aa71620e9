"""The engine's events as log lines: the one place that decides what the daemon and the offline tools
say about rule errors, limit hits, blocked connections, evictions and alerts, and which journald fields
carry the flow (`TCPGUARD_FLOW`, `TCPGUARD_RULE`, `TCPGUARD_VERDICT`, ...; docs/observability.md).

The core returns these as data (`tcpguard.core.events`) and never logs; the logger keeps the name
`tcpguard.engine`, so filters and `journalctl` queries written for it keep working.
"""

from __future__ import annotations

import logging

from tcpguard.core.conntrack import Connection
from tcpguard.core.events import (
    AlertRaised,
    Blocked,
    BypassLeak,
    EngineEvent,
    Evicted,
    Evictions,
    LimitHit,
    RuleError,
)

log = logging.getLogger("tcpguard.engine")


def log_fields(conn: Connection, **more: str) -> dict[str, str]:
    """Structured log fields (journald field names: upper case) naming the flow."""
    return {
        "TCPGUARD_FLOW": conn.describe(),
        "TCPGUARD_FLOW_ID": str(conn.id),
        **{f"TCPGUARD_{k}": v for k, v in more.items()},
    }


class EventLog:
    """An engine's `on_event` listener that logs each event. `log_payload`: whether a rule error's line
    may quote the exception's message and traceback, which often quote the data the rule choked on
    (`int(b'...')`, `KeyError(...)`); without it only the exception's type and where it happened."""

    def __init__(self, log_payload: bool = False, bypass_rules: str | None = None) -> None:
        self.log_payload = log_payload
        # The kernel side connection bypass relies on, for the config in use (the daemon passes
        # `tcpguard.app.daemon.config.bypass_leak_hint`), named when a BypassLeak says it is missing.
        # None: an offline tool (replay, trace), where no kernel takes a bypassed connection over, so
        # its later packets reaching the engine are expected and not worth a warning.
        self.bypass_rules = bypass_rules

    def __call__(self, ev: EngineEvent) -> None:
        if isinstance(ev, AlertRaised):
            mine = ev.record["tcpguard"]
            log.warning(
                "alert [%s] %s: %s (rule %s, action %s)",
                mine["severity"],
                ev.flow.describe(),
                ev.record["alert"]["signature"],
                mine["rule"],
                mine["action"],
                extra=log_fields(
                    ev.flow,
                    SEVERITY=mine["severity"],
                    DIRECTION=ev.direction,
                    RULE=mine["rule"] or "",
                    ACTION=mine["action"],
                ),
            )
        elif isinstance(ev, RuleError):
            self._rule_error(ev)
        elif isinstance(ev, LimitHit):
            log.warning(
                "%s %s (%d bytes buffered): policy %s",
                ev.why,
                ev.flow.describe(),
                ev.buffered,
                ev.policy,
                extra=log_fields(ev.flow, VERDICT=ev.policy),
            )
        elif isinstance(ev, Blocked):
            log.info(
                "%s: %s by %s",
                ev.flow.describe(),
                ev.action,
                ev.by,
                extra=log_fields(ev.flow, VERDICT=ev.action),
            )
        elif isinstance(ev, Evicted):
            log.debug(
                "connection table full: evicting %s",
                ev.flow.describe(),
                extra=log_fields(ev.flow, VERDICT="evict"),
            )
        elif isinstance(ev, BypassLeak):
            # The core says it at most once a minute: an operator's chain without the rule leaks every
            # bypassed connection, and one line per connection would flood the log.
            if self.bypass_rules is None:
                return
            f = ev.flow
            log.warning(
                "bypassed connection %s still reaches the daemon %.0f s after its bypass verdict: the "
                "kernel rule that lets bypassed connections past the queue is missing: %s. Its packets "
                "are accepted without inspection, each still costing a trip through the daemon",
                f.describe(),
                ev.seconds,
                self.bypass_rules,
                extra={
                    "TCPGUARD_FLOW": f.describe(),
                    "TCPGUARD_FLOW_ID": str(f.id),
                    "TCPGUARD_VERDICT": "bypass",
                },
            )
        elif isinstance(ev, Evictions):
            log.warning(
                "connection table full (%d connections): evicted %d since the last report",
                ev.max_connections,
                ev.count,
            )

    def _rule_error(self, ev: RuleError) -> None:
        e = ev.error
        fields = log_fields(ev.flow, RULE=ev.rule, VERDICT=ev.policy)
        if self.log_payload:
            log.error(
                "rule %s raised on %s at %s: %s: %s",
                ev.rule,
                ev.flow.describe(),
                ev.where,
                type(e).__name__,
                e,
                exc_info=(type(e), e, e.__traceback__),
                extra=fields,
            )
        else:
            log.error(
                "rule %s raised on %s at %s: %s",
                ev.rule,
                ev.flow.describe(),
                ev.where,
                type(e).__name__,
                extra=fields,
            )
