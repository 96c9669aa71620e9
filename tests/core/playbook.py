"""A playbook for engine tests: a client and a server exchanging fabricated segments through an Engine.

Each call sends one segment and returns the engine's Decision, so a test reads like the packet exchange
it checks::

    pb = Playbook()
    assert pb.client("S").verdict == ACCEPT
    assert pb.server("SA").verdict == ACCEPT
    pb.client("A")
    pb.client("PA", b"GET / HTTP/1.1\\r\\n")

Sequence and acknowledgement numbers follow the data each side sent unless given explicitly.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from tcpguard.core import forge
from tcpguard.core.decision import Decision
from tcpguard.core.engine import Engine
from tcpguard.core.packet import decode
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings

FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}


def flags_of(text: str) -> int:
    out = 0
    for ch in text:
        out |= FLAG_BITS[ch]
    return out


def syn_options(mss: int = 1460, wscale: int | None = 7, sack: bool = True) -> bytes:
    opts = struct.pack("!BBH", 2, 4, mss)
    if sack:
        opts += b"\x04\x02"
    if wscale is not None:
        opts += b"\x01" + struct.pack("!BBB", 3, 3, wscale)
    while len(opts) % 4:
        opts += b"\x01"
    return opts


class Playbook:
    def __init__(
        self,
        rules: RuleSet | None = None,
        settings: EngineSettings | None = None,
        client: str = "10.0.0.1",
        server: str = "10.0.0.2",
        cport: int = 40000,
        sport: int = 80,
        cisn: int = 1000,
        sisn: int = 5000,
        engine: Engine | None = None,
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.engine = engine or Engine(settings, rules, sink=self.events.append)
        self.caddr = ipaddress.ip_address(client)
        self.saddr = ipaddress.ip_address(server)
        self.version = self.caddr.version
        self.cport, self.sport = cport, sport
        self.cisn, self.sisn = cisn, sisn
        self.cnext = cisn  # next seq the client will use
        self.snext = sisn
        self.now = 0.0
        self.sent: list[bytes] = []  # everything the engine forged

    def _seg(
        self,
        from_client: bool,
        flags: str,
        data: bytes,
        seq: int | None,
        ack: int | None,
        window: int,
        options: bytes,
        urgptr: int,
    ) -> bytes:
        f = flags_of(flags)
        if from_client:
            src, dst, sp, dp = self.caddr.packed, self.saddr.packed, self.cport, self.sport
            my, their = self.cnext, self.snext
        else:
            src, dst, sp, dp = self.saddr.packed, self.caddr.packed, self.sport, self.cport
            my, their = self.snext, self.cnext
        s = my if seq is None else seq
        a = their if ack is None else ack
        if f & 0x02 and options == b"" and not flags.endswith("!"):
            options = syn_options()
        raw = forge.build_tcp(
            self.version, src, dst, sp, dp, s & 0xFFFFFFFF, a & 0xFFFFFFFF, f, window, data, options, urgptr
        )
        if seq is None:
            adv = len(data) + (1 if f & 0x02 else 0) + (1 if f & 0x01 else 0)
            if from_client:
                self.cnext = (self.cnext + adv) & 0xFFFFFFFF
            else:
                self.snext = (self.snext + adv) & 0xFFFFFFFF
        return raw

    def send(
        self,
        from_client: bool,
        flags: str,
        data: bytes = b"",
        seq: int | None = None,
        ack: int | None = None,
        window: int = 65535,
        options: bytes = b"",
        urgptr: int = 0,
        token: object = None,
        dt: float = 0.001,
    ) -> Decision:
        return self.feed(self._seg(from_client, flags, data, seq, ack, window, options, urgptr), token, dt)

    def client(self, flags: str, data: bytes = b"", **kw: Any) -> Decision:
        return self.send(True, flags, data, **kw)

    def server(self, flags: str, data: bytes = b"", **kw: Any) -> Decision:
        return self.send(False, flags, data, **kw)

    def feed(self, raw: bytes, token: object = None, dt: float = 0.001) -> Decision:
        self.now += dt
        dec = self.engine.handle_packet(raw, self.now, token)
        self.sent.extend(dec.send)
        return dec

    def handshake(self) -> None:
        for d in (self.client("S"), self.server("SA"), self.client("A")):
            assert d.verdict == 0, d

    def names(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    @staticmethod
    def decoded(raw: bytes) -> Any:
        return decode(raw)
