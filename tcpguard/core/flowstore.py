"""Packing a flow's one-entry `flow.store` dict into a (key, value) tuple while nobody holds the dict.

An idle connection often keeps one value there (the sample Host-header reader's `host`), and a dict costs
184 bytes (64 for the object, 120 for its smallest key table) where the pair costs 64: on a table of
idle connections that is an eighth of the memory. `Connection.store` turns the pair back into a dict the
next time a rule asks for it, so rules only ever see a dict with the same contents.

The dict is packed only when the connection's slot is its only reference (`sys.getrefcount`): a rule
that kept the dict (a suspended streamed listener's local, a module-level registry of flows) keeps it
alive, and then it must stay the very object the flow hands out, so it is left alone. That check is why
this module is not compiled with mypyc: the reference count of a local is only predictable in the
interpreter (here: the slot, the local `st`, and `getrefcount`'s own argument).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tcpguard.core.conntrack import Connection

_ONLY_THE_SLOT = 3


def pack_store(conn: Connection) -> None:
    """Replace `conn`'s store by a (key, value) tuple if it is a one-entry dict nobody else holds."""
    st = conn._store
    if type(st) is dict and len(st) == 1 and sys.getrefcount(st) == _ONLY_THE_SLOT:
        conn._store = next(iter(st.items()))
