"""Haka rule files in Lua, run unchanged in a sandbox: a rule-language front end for the engine.

`load_lua_file(path)` runs one `*.lua` file and returns its rules as `tcpguard.core.rules.Rule`
objects, whose functions the dispatch calls exactly as it calls Python listeners. Nothing of the engine
changes: a Lua rule is a Python listener that calls into Lua.

Why Lua 5.4 (lupa's `lupa.lua54`) and not LuaJIT, which Haka ran: the sandbox's instruction budget is a
count hook (`debug.sethook(f, "", n)`), and LuaJIT calls count hooks only from its interpreter, never
from compiled traces. Checked with lupa 2.8's `luajit21`: a loop of 10^8 additions called a hook set for
every 1,000 instructions 0 times; with `jit.off()` it did 20,000 times for 10^7, as Lua 5.4 does (20,080),
but an interpreter-only LuaJIT gives up the reason to choose it. The memory cap does not decide: lupa
2.8 honours `max_memory` with both. Haka's rules use nothing of LuaJIT itself (its FFI served Haka's own
C bindings), so the files run unchanged on 5.4.

The sandbox (see `prelude.py`, the Lua half): each file gets its own Lua state, capped at
`MEMORY_CAP` bytes, and sees only a fresh environment: Haka's API, `string` (with `dump` removed and
the pattern functions bounded), `table`, `math`, `utf8`, `coroutine`, `os.time/clock/date/difftime`,
and `require` of the protocol modules and of `_name.lua` helper files beside it. No `io`, `os`,
`load`, `dofile`, `debug`, `package`, `collectgarbage`, and no way to a Python object: a flow or a
packet is a Lua table of plain values whose actions Python applies to the connection of the call
running now, and lupa's attribute filter refuses every Python attribute but the few the prelude reads
(`_ALLOWED`). Each call (each resume of a streamed rule) runs under an instruction budget
(`CALL_BUDGET`) that raises in the rule, also in coroutines it makes and after it catches the error, so
the dispatch's rule-error policy applies, as for a Python rule that raises; a file's top level has
`LOAD_BUDGET`. Work in C that no hook sees is bounded up front: `string.rep` counts, and pattern calls
whose subject length raised to their number of quantifiers is too large (a plain find is always
allowed). `__gc` metamethods are refused (Lua runs them with hooks off).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import greenlet
import lupa.lua54 as lua

from tcpguard.core.conntrack import Connection
from tcpguard.core.cursor import Cursor
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import EventName, Rule

__all__ = [
    "CALL_BUDGET",
    "LOAD_BUDGET",
    "MEMORY_CAP",
    "LuaRuleError",
    "load_lua_file",
]

#: Lua instructions one rule call may run (one resume of a streamed rule): about 5-20 ms of Lua.
CALL_BUDGET = 2_000_000
#: Lua instructions a file's top level may run at load.
LOAD_BUDGET = 50_000_000
#: The hook counts in steps of this many instructions: the budget is exact to within one step.
STEP = 1000
#: Bytes of memory each rule file's Lua state may hold (code, tables, per-flow fields, strings).
MEMORY_CAP = 64 * 1024 * 1024
#: `string.rep` counts above this are refused: an empty string repeated 10^15 times loops in C.
MAX_REP = 1 << 24
#: Characters of one log line from a rule.
MAX_LOG = 2000

#: Python attributes the prelude reads on the objects it holds; lupa refuses every other (and every
#: write), so that no path leads from a Lua value to Python's object graph.
_ALLOWED = frozenset(
    {
        # Cursor (the iterator of a streamed rule holds one)
        "stream", "pos", "eof", "mark", "unmark",
    }
)  # fmt: skip

# Stream modification has no equivalent in tcpguard (the inline invariant: the bytes the rules see are
# the bytes the receiver reads). A call to one is refused at load, with its line, rather than when the
# first connection reaches it.
_MODIFY = re.compile(r":\s*(insert|erase|replace|setstring|setfixedstring|setnumber|setbits|restore)\s*\(")
_ERROR = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<msg>.*)$", re.S)

log = logging.getLogger("tcpguard.rules.lua")


class LuaRuleError(Exception):
    """A Lua rule failed (raised, ran out of instructions or of memory). The message is Lua's, which
    starts with `file:line:` of the rule."""


def _attribute_filter(obj: Any, name: Any, setting: bool) -> Any:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    if setting or text not in _ALLOWED:
        raise AttributeError(f"{text!r} is not available to Lua rules")
    return text


# ------------------------------------------------------------------ what the prelude calls (PY.*)
# Reads on the cursor are never blocking here: a greenlet switch inside a Lua call would leave the Lua
# stack of one connection under another's. The prelude waits by yielding its coroutine instead, and the
# Python side of the streamed listener (below) suspends between resumes.


def _avail(cur: Cursor) -> int:
    return max(cur.stream.next - cur.pos, 0)


def _ended(cur: Cursor) -> bool:
    return cur.stream.eof


def _read(cur: Cursor, n: int) -> bytes:
    end = min(cur.pos + max(int(n), 0), cur.stream.next)
    out = cur.stream.data(cur.pos, end)
    cur.pos += len(out)
    return out


def _skip(cur: Cursor, n: int) -> int:
    k = min(max(int(n), 0), max(cur.stream.next - cur.pos, 0))
    cur.pos += k
    return k


def _addr_text(packed: bytes) -> bytes:
    return str(ipaddress.ip_address(packed)).encode()


def _net6(text: bytes) -> tuple[bytes, int] | None:
    try:
        net = ipaddress.IPv6Network(text.decode("ascii", "replace"), strict=False)
    except ValueError:
        return None
    return net.network_address.packed, net.prefixlen


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _log(level: bytes, text: Any) -> None:
    msg = _text(text)
    if len(msg) > MAX_LOG:
        msg = msg[:MAX_LOG] + "..."
    log.log(logging.getLevelNamesMapping().get(_text(level).upper(), logging.INFO), "%s", msg)


def _plain(value: Any) -> Any:
    """A Lua table of the alert's fields (already bounded by the prelude) as Python values."""
    if lua.lua_type(value) == "table":
        items = list(value.items())
        keys = [k for k, _ in items]
        if keys and all(isinstance(k, int) for k in keys) and sorted(keys) == list(range(1, len(keys) + 1)):
            return [_plain(v) for _, v in sorted(items)]
        return {_text(k): _plain(v) for k, v in items}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class _LuaFile:
    """One rule file's Lua state and the Python side of its rules."""

    def __init__(self, path: Path, check: Callable[[Path], None] | None) -> None:
        self.path = path
        self.check = check
        self.runtime = lua.LuaRuntime(
            max_memory=MEMORY_CAP,
            # Lua strings reach Python as bytes and stay bytes (payloads are binary); what Python hands
            # to Lua as a string is bytes too.
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_attribute_filter,
        )
        self.store_key = f"lua:{path}"
        # The connection and packet of the rule call running now: what PY.act, PY.pkt and PY.alert
        # act on (Lua only ever holds a connection's id).
        self.conn: Connection | None = None
        self.pkt: Any = None
        py = self.runtime.table_from(
            {
                k.encode(): v
                for k, v in {
                    "load_budget": LOAD_BUDGET,
                    "call_budget": CALL_BUDGET,
                    "step": STEP,
                    "max_rep": MAX_REP,
                    "avail": _avail,
                    "ended": _ended,
                    "eof": lambda cur: cur.eof,
                    "pos": lambda cur: cur.pos,
                    "read": _read,
                    "skip": _skip,
                    "mark": lambda cur: cur.mark(),
                    "unmark": lambda cur: cur.unmark(),
                    "addr_text": _addr_text,
                    "net6": _net6,
                    "log": _log,
                    "read_helper": self._read_helper,
                    "flow_store": self._flow_store,
                    "act": self._act,
                    "blocked": self._blocked,
                    "pkt": self._pkt,
                    "alert": self._alert,
                }.items()
            }
        )
        from tcpguard.lua.prelude import PRELUDE

        self.api = self.runtime.execute(PRELUDE, py, path.name.encode(), str(path.parent).encode())

    def _read_helper(self, directory: bytes, name: bytes) -> bytes | None:
        """The text of `_name.lua` beside the rule file, for `require('_name')` (name checked by Lua)."""
        p = Path(directory.decode()) / f"{name.decode()}.lua"
        if not p.is_file():
            return None
        if self.check is not None:
            self.check(p)
        return p.read_bytes()

    def _current(self, cid: int) -> Connection:
        conn = self.conn
        if conn is None or conn.id != cid:
            raise LuaRuleError("this flow is not the connection of the rule call running now")
        return conn

    def _act(self, cid: int, what: bytes, direction: bytes | None = None) -> None:
        conn = self._current(cid)
        if what == b"drop":
            conn.drop()
        elif what == b"reset":
            conn.reset()
        elif what == b"halfreset":
            conn.halfreset()
        elif what == b"send":
            conn.send(None if direction is None else _text(direction))

    def _blocked(self, cid: int) -> bool:
        return self._current(cid).blocked

    def _pkt(self, cid: int, field: bytes) -> Any:
        self._current(cid)
        return getattr(self.pkt, _PKT_FIELDS[field])

    def _alert(self, description: Any, severity: bytes, fields: Any) -> None:
        conn = self.conn
        if conn is None:
            raise LuaRuleError("haka.alert outside a rule call")
        sink = conn._alert
        if sink is not None:
            sink(conn, _text(description), _text(severity), None, _plain(fields) or {})

    def _flow_store(self, cid: int) -> Any:
        """A new Lua table for the fields this file's rules set on a flow, kept in the connection's
        store so that it lives exactly as long as the connection."""
        t = self.runtime.table()
        self._current(cid).store[self.store_key] = t
        return t

    def fields_of(self, conn: Connection) -> Any:
        """The connection's table of fields, None before a rule set one. Read from the store's packed
        forms (`tcpguard.core.flowstore`: None, a (key, value) pair, or a dict) without making a dict
        of it, which `Connection.store` would do on every connection."""
        st = conn._store
        if st is None:
            return None
        if isinstance(st, dict):
            return st.get(self.store_key)
        return st[1] if st[0] == self.store_key else None


def _load_error(text: str, path: Path) -> RuleLoadError:
    """Lua's `name.lua:12: message` as the error of that file of the rules directory (the rule file or
    a helper it required)."""
    m = _ERROR.match(text)
    if m and "/" not in m["path"] and m["path"].endswith(".lua"):
        return RuleLoadError(str(path.parent / m["path"]), int(m["line"]), m["msg"])
    return RuleLoadError(str(path), None, text)


def load_lua_file(path: Path, check: Callable[[Path], None] | None = None) -> list[Rule]:
    """The rules a Lua rule file registers, or `RuleLoadError` naming the file and line. `check(path)`
    vets each helper file `require` reads (the loader passes its ownership and permission check)."""
    try:
        source = path.read_bytes()
    except OSError as e:
        raise RuleLoadError(str(path), None, f"cannot read: {e}") from e
    for n, line in enumerate(source.decode("utf-8", "replace").splitlines(), 1):
        code = line.split("--", 1)[0]
        m = _MODIFY.search(code)
        if m:
            raise RuleLoadError(
                str(path),
                n,
                f"stream modification (:{m[1]}) is not supported by tcpguard: rules inspect "
                "and block, they do not rewrite the stream",
            )
    try:
        f = _LuaFile(path, check)
        err = f.api.load(source)
    except lua.LuaError as e:
        raise RuleLoadError(str(path), None, f"Lua: {e}") from e
    if err is not None:
        raise _load_error(_text(err), path)
    stem = path.stem
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, row in sorted(f.api.rules().items()):
        event, streamed, name, line = _text(row[1]), row[2], row[3] and _text(row[3]), row[4]
        direction = _text(row[5]) if row[5] else None
        lookback = int(row[6])
        ports = frozenset(int(p) for p in row[7].values()) if row[7] else None
        base = f"{stem}.{name}" if name else f"{stem}.{event}@{line}"
        rname, k = base, 2
        while rname in seen:
            rname, k = f"{base}#{k}", k + 1
        seen.add(rname)
        ev = EventName(event)
        func = _listener(f, int(i), ev, bool(streamed), rname, lookback)
        rules.append(
            Rule(
                name=rname,
                event=ev,
                func=func,
                streamed=bool(streamed),
                module=str(path),
                direction=direction,
                lookback=lookback,
                ports=ports,
            )
        )
    return rules


_DIRECTIONS = {"up": b"up", "down": b"down"}
_PKT_FIELDS = {
    k.encode(): k
    for k in ("sport", "dport", "seq", "ack", "window", "urgptr", "tcp_hlen", "flags", "payload")
} | {b"src": "src", b"dst": "dst", b"version": "version"}


def _raise(err: Any) -> None:
    if err is not None:
        raise LuaRuleError(_text(err))


def _listener(f: _LuaFile, i: int, event: EventName, streamed: bool, name: str, lookback: int) -> Any:
    """The Python listener the dispatch calls for Lua rule `i`: it hands Lua the connection's id,
    addresses and ports (plain values, cheap to pass), and keeps the connection itself on `f` for the
    actions the rule takes."""
    call, fields = f.api.call, f.fields_of
    if event == EventName.NEW_CONNECTION:

        def new_connection(flow: Connection, tcp: Any) -> None:
            f.conn, f.pkt = flow, tcp
            try:
                err = call(i, flow.id, flow.client, flow.server, flow.cport, flow.sport, fields(flow))
            finally:
                f.conn = f.pkt = None
            _raise(err)

        return new_connection
    if event == EventName.END_CONNECTION:

        def end_connection(flow: Connection) -> None:
            f.conn = flow
            try:
                err = call(i, flow.id, flow.client, flow.server, flow.cport, flow.sport, fields(flow))
            finally:
                f.conn = None
            _raise(err)

        return end_connection
    if not streamed:

        def receive_data(flow: Connection, stream: Any, current: Cursor, direction: str) -> None:
            # With a look-back, the retained bytes before the new ones come too; Lua's `current` still
            # starts at the new bytes (k of them before it), as Haka's does.
            pos = current.pos
            data = stream.data(pos - lookback, stream.next)
            f.conn = flow
            try:
                err = call(
                    i, flow.id, flow.client, flow.server, flow.cport, flow.sport,
                    None if flow._store is None else fields(flow),
                    data, _DIRECTIONS[direction], len(data) - (stream.next - pos),
                )  # fmt: skip
            finally:
                f.conn = None
            _raise(err)

        return receive_data
    start, resume = f.api.start, f.api.resume

    def receive_streamed(flow: Connection, stream: Any, current: Cursor, direction: str) -> None:
        # Runs in the dispatch's greenlet for this flow and direction. The Lua coroutine yields when it
        # needs bytes that have not arrived; only then, with no Lua frame of it on any stack, does this
        # greenlet give way until the next segment.
        co = start(
            i,
            flow.id,
            flow.client,
            flow.server,
            flow.cport,
            flow.sport,
            fields(flow),
            current,
            _DIRECTIONS[direction],
        )
        while True:
            f.conn = flow
            try:
                res = resume(co)
            finally:
                f.conn = None
            status, err = (res, None) if isinstance(res, bytes) else (res[0], res[1])
            if status == b"done":
                return
            if status == b"error":
                _raise(err)
            if not current.stream.eof:
                parent = greenlet.getcurrent().parent
                if parent is None:
                    raise LuaRuleError(f"{name}: a streamed Lua rule called outside a streamed listener")
                parent.switch()

    return receive_streamed
