"""Who may use the control socket.

Root, the daemon's own user, and members of `control.group`; nobody else. The file system enforces it
first (the socket is 0600, or 0660 with the group; a directory tcpguard creates, or the one systemd made
for it in $RUNTIME_DIRECTORY, is 0700/0750 with the same group), and the server checks the peer's
credentials again with SO_PEERCRED on every connection, so a socket file that an operator loosened by
hand, or a descriptor passed on to another process, still cannot be used by others.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field

from tcpguard.app.control.protocol import ControlError

# ================================================================================== who may connect


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def supplementary_groups(pid: int) -> set[int]:
    """The peer's supplementary groups, from /proc (SO_PEERCRED only gives the primary gid)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


def resolve_group(group: str | None) -> int | None:
    """The gid of `control.group` (a name or a number); ControlError if the group does not exist."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlError(f"control.group: no group named {group!r}") from None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Root, the daemon's own user, and (when set) members of one group."""

    gid: int | None = None
    owner: int = field(default_factory=os.geteuid)

    def allows(self, pid: int, uid: int, gid: int) -> bool:
        if uid in (0, self.owner):
            return True
        if self.gid is None:
            return False
        if gid == self.gid or self.gid in supplementary_groups(pid):
            return True
        # /proc may be hidden from the daemon (systemd's ProtectProc): fall back to the group database.
        try:
            name = pwd.getpwuid(uid).pw_name
            return name in grp.getgrgid(self.gid).gr_mem
        except KeyError:
            return False
