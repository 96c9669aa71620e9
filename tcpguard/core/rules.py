"""Rule registration: the `@rule` decorator, the event names, and the immutable `RuleSet`.

Rule modules call `@rule(on=tcp_connection.events.X)`. The decorator only records metadata on the
function and, while a loader is collecting (`collecting()`), appends it to that loader's list; it never
touches engine state, so loading a broken module cannot leave half a rule set behind: the loader builds a
new `RuleSet` and the engine swaps it in whole.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from tcpguard.core.stream import LOOKBACK


class EventName(enum.StrEnum):
    NEW_CONNECTION = "new_connection"
    RECEIVE_DATA = "receive_data"
    END_CONNECTION = "end_connection"


class _Events:
    """`tcp_connection.events.*`, spelled as in Haka's tcp-connection dissector."""

    new_connection = EventName.NEW_CONNECTION
    receive_data = EventName.RECEIVE_DATA
    end_connection = EventName.END_CONNECTION


class _TcpConnection:
    events = _Events


tcp_connection = _TcpConnection()

RuleFunc = Callable[..., Any]
F = TypeVar("F", bound=RuleFunc)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    event: EventName
    func: RuleFunc
    streamed: bool = False
    module: str = ""
    # receive_data only: 'up' or 'down' to be called for one direction only (None: both). The engine
    # skips the others without a call, which for streamed listeners saves a coroutine per connection.
    direction: str | None = None
    # Plain receive_data only: how many bytes before `current` the listener may need (`current.find`'s
    # look-back). Each direction's stream retains the largest of its plain listeners' (engine._lookbacks),
    # so one that needs none (it keeps its own state) no longer makes every idle connection hold a tail.
    lookback: int = LOOKBACK
    # The server ports of the connections the listener is called on (None: every connection). Checked
    # before the call, so a listener for other ports costs nothing, and a streamed one no coroutine.
    ports: frozenset[int] | None = None


_collector: list[Rule] | None = None


@contextmanager
def collecting() -> Iterator[list[Rule]]:
    """Collect every rule registered by `@rule` inside the block, in definition order."""
    global _collector
    previous = _collector
    _collector = []
    try:
        yield _collector
    finally:
        _collector = previous


def rule(
    on: EventName | str,
    streamed: bool = False,
    name: str | None = None,
    direction: str | None = None,
    lookback: int | None = None,
    ports: Iterable[int] | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as a listener of event `on`.

    `streamed=True` (receive_data only) runs the listener as a coroutine per flow and direction whose
    reads on `current` block until the bytes arrive. `direction='up'` or `'down'` (receive_data only)
    calls it for that direction's bytes only. `lookback=N` (plain receive_data only, default 256) is how
    many bytes before the new ones the listener may need: `current.find(pattern)` finds a pattern that
    started in an earlier segment if `N >= len(pattern) - 1`. Each stream keeps the largest look-back of
    the listeners of its direction after the receiver acknowledged the bytes, so declare the least you
    need (0 if the listener keeps its own state): an idle connection then holds fewer bytes.
    `ports={80, 8080}` (any event) calls the listener only on connections whose server port (`flow.dstport`)
    is one of these; the others never see it, and cost nothing for it (no call, no coroutine).
    """
    try:
        event = EventName(on)
    except ValueError:
        raise ValueError(f"unknown event {on!r}; use tcp_connection.events.*") from None
    if streamed and event != EventName.RECEIVE_DATA:
        raise ValueError("streamed=True is only meaningful for receive_data")
    if direction is not None and (direction not in ("up", "down") or event != EventName.RECEIVE_DATA):
        raise ValueError("direction= is 'up' or 'down', and only for receive_data")
    if lookback is not None and (
        streamed or event != EventName.RECEIVE_DATA or not isinstance(lookback, int) or lookback < 0
    ):
        raise ValueError("lookback= is a byte count >= 0, and only for plain receive_data listeners")
    port_set = _port_set(ports)

    def deco(func: F) -> F:
        r = Rule(
            name=name or f"{func.__module__.rsplit('.', 1)[-1]}.{func.__qualname__}",
            event=event,
            func=func,
            streamed=streamed,
            module=func.__module__,
            direction=direction,
            lookback=LOOKBACK if lookback is None else lookback,
            ports=port_set,
        )
        func.__tcpguard_rule__ = r  # type: ignore[attr-defined]
        if _collector is not None:
            _collector.append(r)
        return func

    return deco


def _port_set(ports: Iterable[int] | None) -> frozenset[int] | None:
    if ports is None:
        return None
    if isinstance(ports, (str, bytes, int)):
        raise ValueError(f"ports= is a collection of port numbers, like {{80, 8080}}, not {ports!r}")
    out = frozenset(ports)
    if not out:
        raise ValueError("ports= is empty: the listener would never run (None means every port)")
    bad = [p for p in out if type(p) is not int or not 0 <= p <= 65535]
    if bad:
        raise ValueError(f"ports= holds {bad[0]!r}: ports are integers 0-65535")
    return out


class RuleSet:
    """The listeners per event, in load order. Immutable once built; swapped whole on reload."""

    __slots__ = ("end_connection", "new_connection", "receive_data", "rules", "streamed")

    def __init__(self, rules: list[Rule] | tuple[Rule, ...] = ()) -> None:
        self.rules = tuple(rules)
        self.new_connection = tuple(r for r in self.rules if r.event == EventName.NEW_CONNECTION)
        self.receive_data = tuple(
            r for r in self.rules if r.event == EventName.RECEIVE_DATA and not r.streamed
        )
        self.streamed = tuple(r for r in self.rules if r.event == EventName.RECEIVE_DATA and r.streamed)
        self.end_connection = tuple(r for r in self.rules if r.event == EventName.END_CONNECTION)

    @classmethod
    def of(cls, *funcs: RuleFunc) -> RuleSet:
        """A rule set from functions decorated with `@rule` (handy in tests and embedding)."""
        return cls([f.__tcpguard_rule__ for f in funcs])  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def __len__(self) -> int:
        return len(self.rules)
