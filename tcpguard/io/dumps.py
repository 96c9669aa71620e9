"""Packet dumps of a running gateway: size-rotated pcap files that cannot fill the disk.

An operator who asks "what did tcpguard drop, and which RSTs did it forge?" wants the packets, not a
counter. The daemon writes them here as classic pcap with the raw IP link type (what NFQUEUE hands us:
no link-layer header), through `tcpguard.io.pcap.PcapWriter`, so tcpdump, tshark and `tcpguard replay`
read them as they are.

Choices made here:

* Rotation by size, with a hard bound. A file is closed and the next one started before a record would
  take it past `max_file_size`, and the oldest files beyond `max_files` are deleted, so one dump never
  holds more than `max_file_size * max_files` bytes. Packets longer than fit in an empty file are cut
  (the pcap record keeps the original length, as a capture tool would), so the bound holds for any
  traffic.
* Files are numbered (`dropped-q0-000042.pcap`) instead of renamed like logrotate's `.1`, `.2`: a reader
  following the current file (`tail -f`-style, or a copy in progress) never sees it move, and the order
  is the name order. A restart continues the numbering and counts the files of the previous run against
  `max_files`, so a crash loop cannot fill the disk either.
* Captures hold payload (passwords, personal data): directories are created 0750 and files 0640.
* A dump must never take the gateway down: an error opening or writing a file is logged once, counted,
  and that dump is switched off; the verdicts go on. Only the first open, at start, raises, so a daemon
  that was configured to dump and cannot says so at once.
* Writes are buffered; the daemon flushes every timer tick (0.5 s), which keeps the files current for
  a reader without a system call per packet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from tcpguard.io.pcap import LINKTYPE_RAW, PcapWriter

__all__ = ["DUMP_KINDS", "PacketDumps", "RotatingPcapWriter"]

log = logging.getLogger(__name__)

#: The dumps the daemon can write, in the order of its config keys.
DUMP_KINDS = ("dropped", "resets", "input")

_PCAP_HEADER = 24
_RECORD_HEADER = 16
_MIN_FILE_SIZE = 1024
_MAX_SNAPLEN = 262144


class RotatingPcapWriter:
    """Writes frames to `<directory>/<prefix>-<number>.pcap`, starting a new file before one would pass
    `max_file_size` bytes and deleting the oldest beyond `max_files`. See the module docstring.

    Opening the first file happens in the constructor, so a bad directory raises `OSError` there.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        prefix: str,
        max_file_size: int,
        max_files: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_file_size < _MIN_FILE_SIZE:
            raise ValueError(f"max_file_size must be at least {_MIN_FILE_SIZE} bytes")
        if max_files < 1:
            raise ValueError("max_files must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise ValueError(f"bad capture file prefix {prefix!r}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_file_size = max_file_size
        self.max_files = max_files
        self.clock = clock
        # Every record must fit in an empty file, which is what makes the size bound hard.
        self.snaplen = min(_MAX_SNAPLEN, max_file_size - _PCAP_HEADER - _RECORD_HEADER)
        self.packets = 0
        self.bytes = 0
        self.files_started = 0
        self._pattern = re.compile(re.escape(prefix) + r"-(\d{6,})\.pcap")
        self._file: BinaryIO | None = None
        self._writer: PcapWriter | None = None
        self._size = 0
        self._records = 0
        self._index = 0
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        existing = self.files()
        self._index = self._number(existing[-1]) if existing else 0
        self._open_next()

    # ------------------------------------------------------------------ public
    @property
    def current(self) -> Path | None:
        """The file being written, None once closed."""
        return self._path(self._index) if self._writer is not None else None

    def files(self) -> list[Path]:
        """This writer's capture files on disk, oldest first."""
        found = []
        for entry in os.scandir(self.directory):
            if self._pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found.append(Path(entry.path))
        return sorted(found, key=self._number)

    def write(self, data: bytes, ts: float | None = None) -> None:
        """Append one raw IP packet captured at `ts` (default: now). Raises OSError on I/O errors."""
        if self._writer is None:
            raise ValueError("write to a closed RotatingPcapWriter")
        record = _RECORD_HEADER + min(len(data), self.snaplen)
        if self._records and self._size + record > self.max_file_size:
            self._rotate()
        assert self._writer is not None
        self._writer.write(data, self.clock() if ts is None else ts)
        self._size += record
        self._records += 1
        self.packets += 1
        self.bytes += record

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        writer, file = self._writer, self._file
        self._writer = self._file = None
        if writer is not None:
            writer.close()
        if file is not None:
            file.close()

    # ------------------------------------------------------------------ helpers
    def _path(self, index: int) -> Path:
        return self.directory / f"{self.prefix}-{index:06d}.pcap"

    def _number(self, path: Path) -> int:
        m = self._pattern.fullmatch(path.name)
        return int(m.group(1)) if m else -1

    def _rotate(self) -> None:
        self.close()
        self._open_next()

    def _open_next(self) -> None:
        # O_EXCL: never append to (or truncate) a file someone else made with our name; take the next one.
        while True:
            self._index += 1
            path = self._path(self._index)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            except FileExistsError:
                continue
            break
        self._file = os.fdopen(fd, "wb")
        self._writer = PcapWriter(self._file, linktype=LINKTYPE_RAW, snaplen=self.snaplen)
        self._size = _PCAP_HEADER
        self._records = 0
        self.files_started += 1
        self._prune()

    def _prune(self) -> None:
        """Delete the oldest files so that at most `max_files` remain, the new current one included."""
        files = self.files()
        for old in files[: max(0, len(files) - self.max_files)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


class PacketDumps:
    """The daemon's dumps for one queue: dropped packets, resets (trigger plus forged RSTs), all input.

    Each enabled dump is a `RotatingPcapWriter` named `<kind>-q<queue>`. Every method is safe to call on
    the packet path: it never raises; an I/O error switches that dump off (logged once, counted).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        queue: int,
        kinds: Iterable[str],
        max_file_size: int,
        max_files: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.queue = queue
        self.clock = clock
        self.errors = 0
        self._writers: dict[str, RotatingPcapWriter] = {}
        try:
            for kind in kinds:
                if kind not in DUMP_KINDS:
                    raise ValueError(f"unknown dump {kind!r}")
                self._writers[kind] = RotatingPcapWriter(
                    directory, f"{kind}-q{queue}", max_file_size, max_files, clock
                )
        except BaseException:
            self.close()
            raise
        self.wants_dropped = "dropped" in self._writers
        self.wants_resets = "resets" in self._writers
        self.wants_input = "input" in self._writers

    @property
    def kinds(self) -> list[str]:
        return list(self._writers)

    def input(self, raw: bytes) -> None:
        if self.wants_input:
            self._write("input", (raw,))

    def dropped(self, raw: bytes) -> None:
        if self.wants_dropped:
            self._write("dropped", (raw,))

    def reset(self, trigger: bytes | None, forged: Sequence[bytes]) -> None:
        """One reset: the packet that caused it (None for an operator's or a timer's reset), then the
        forged packets, all with the same timestamp so they stay together in any sorted view."""
        if self.wants_resets and forged:
            self._write("resets", (trigger, *forged) if trigger is not None else forged)

    def flush(self) -> None:
        for kind, w in list(self._writers.items()):
            try:
                w.flush()
            except OSError as exc:
                self._fail(kind, exc)

    def close(self) -> None:
        for kind, w in list(self._writers.items()):
            try:
                w.close()
            except OSError as exc:
                self._fail(kind, exc)
        self._writers.clear()
        self.wants_dropped = self.wants_resets = self.wants_input = False

    def stats(self) -> dict[str, dict[str, int | str | None]]:
        """Per dump: packets and bytes written, files started, the current file."""
        return {
            kind: {
                "packets": w.packets,
                "bytes": w.bytes,
                "files_started": w.files_started,
                "current": str(w.current) if w.current is not None else None,
            }
            for kind, w in self._writers.items()
        }

    def _write(self, kind: str, packets: Iterable[bytes]) -> None:
        w = self._writers.get(kind)
        if w is None:
            return
        ts = self.clock()
        try:
            for p in packets:
                w.write(p, ts)
        except (OSError, ValueError) as exc:
            self._fail(kind, exc)

    def _fail(self, kind: str, exc: BaseException) -> None:
        self.errors += 1
        w = self._writers.pop(kind, None)
        setattr(self, f"wants_{kind}", False)
        log.error("packet dump %s (queue %d) switched off after an error: %s", kind, self.queue, exc)
        if w is not None:
            with contextlib.suppress(OSError):
                w.close()
