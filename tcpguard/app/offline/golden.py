"""A compact, reviewable record of what a replay did, for golden tests.

`record()` replays a capture and returns a JSON-able dict: one verdict letter per frame (A accepted, R
accepted rewritten, D dropped, H held then released, X held then dropped, - not IP), each flow's endpoints,
end reason, actions and alerts, and every forged packet with the frame after which it was sent. The golden
tests compare this with a checked-in file; `tools/golden.py` rewrites those files when a
change is intended, and the diff is what a reviewer reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tcpguard.app.daemon.ruleload import load_rules
from tcpguard.app.offline.replay import replay
from tcpguard.core.packet import decode, format_addr
from tcpguard.core.settings import EngineSettings


class _Collect:
    """A text sink that keeps the replay's JSON lines as parsed events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, line: str) -> int:
        self.events.append(json.loads(line))
        return len(line)


def record(
    capture: str | Path, rules_dir: str | Path, settings: EngineSettings | None = None
) -> dict[str, Any]:
    col = _Collect()
    forged_log: list[tuple[int, bytes]] = []
    summary = replay(capture, load_rules(rules_dir), settings, events=col, forged_log=forged_log)  # type: ignore[arg-type]
    verdict_of: dict[int, str] = {}
    flows: dict[int, dict[str, Any]] = {}
    for ev in col.events:
        kind = ev["event"]
        if kind == "verdict":
            v = ev["verdict"]
            verdict_of[ev["token"]] = {"accept": "R" if ev["rewritten"] else "A", "drop": "D", "hold": "H"}[v]
            for token, rv in ev["released"]:
                verdict_of[token] = "H" if rv == "accept" else "X"
        elif kind == "new_connection":
            flows[ev["flow"]] = {
                "client": f"{ev['client']}:{ev['cport']}",
                "server": f"{ev['server']}:{ev['sport']}",
                "midstream": ev["midstream"],
                "actions": [],
                "alerts": [],
            }
        elif kind == "action":
            flows[ev["flow"]]["actions"].append(ev["action"])
        elif kind == "alert":
            flows[ev["flow"]]["alerts"].append([ev["tcpguard"]["severity"], ev["alert"]["signature"]])
        elif kind == "end_connection":
            flows[ev["flow"]].update(end=ev["reason"], packets=ev["packets"], bytes=ev["bytes"])
    forged = []
    for frame, raw in forged_log:
        p = decode(raw)
        forged.append(
            {
                "frame": frame,
                "src": f"{format_addr(p.src)}:{p.sport}",
                "dst": f"{format_addr(p.dst)}:{p.dport}",
                "seq": p.seq,
                "ack": p.ack,
                "flags": p.flag_names(),
            }
        )
    return {
        "verdicts": "".join(verdict_of.get(i, "-") for i in range(1, summary.frames + 1)),
        "flows": [dict(id=k, **v) for k, v in sorted(flows.items())],
        "forged": forged,
        "stats": {k: v for k, v in summary.stats.items() if v},
    }
