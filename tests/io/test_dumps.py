"""Packet dumps: size rotation with a hard bound, numbering across restarts, error handling, and the real
daemon's dumps holding exactly the dropped packets and the forged RSTs."""

from __future__ import annotations

import signal
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tcpguard.core.packet import ACK, RST, decode
from tcpguard.io.dumps import PacketDumps, RotatingPcapWriter
from tcpguard.io.pcap import LINKTYPE_RAW, Frame, iter_frames
from tests.app.control.test_control import ObservedGateway, crafted_syns, normalised
from tests.app.daemon.test_daemon import DROP_PORT, OPEN_PORT, hexs, wait_for
from tests.netns import SERVER_V4, Lab


def frames(path: Path) -> list[Frame]:
    return list(iter_frames(path))


def packet(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


def test_rotation_keeps_every_file_under_the_size_and_the_newest_files(tmp_path: Path) -> None:
    w = RotatingPcapWriter(tmp_path, "input-q0", max_file_size=1024, max_files=3, clock=lambda: 1000.0)
    for i in range(41):
        w.write(packet(i))
    w.close()
    files = w.files()
    # 24-byte header + 8 records of 116 bytes = 952 <= 1024; a ninth would pass it: 8 per file.
    assert [f.name for f in files] == ["input-q0-000004.pcap", "input-q0-000005.pcap", "input-q0-000006.pcap"]
    assert [f.stat().st_size for f in files] == [952, 952, 24 + 116]
    assert [len(frames(f)) for f in files] == [8, 8, 1]
    assert [fr.data for f in files for fr in frames(f)] == [packet(i) for i in range(24, 41)]
    assert w.packets == 41 and w.files_started == 6 and w.current is None
    assert all(fr.linktype == LINKTYPE_RAW and fr.ts == 1000.0 for fr in frames(files[0]))
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o640 for f in files)


def test_a_packet_longer_than_a_file_is_cut_so_the_bound_holds(tmp_path: Path) -> None:
    w = RotatingPcapWriter(tmp_path, "d", max_file_size=1024, max_files=2)
    w.write(packet(1, 5000))
    w.write(packet(2, 10))
    w.close()
    first, second = w.files()
    (big,) = frames(first)
    assert len(big.data) == 1024 - 24 - 16 and big.orig_len == 5000
    assert first.stat().st_size == 1024
    assert [fr.data for fr in frames(second)] == [packet(2, 10)]


def test_numbering_continues_after_a_restart_and_old_files_count(tmp_path: Path) -> None:
    for _ in range(3):
        w = RotatingPcapWriter(tmp_path, "dropped-q1", max_file_size=4096, max_files=2)
        w.write(packet(0))
        w.close()
    assert [f.name for f in w.files()] == ["dropped-q1-000002.pcap", "dropped-q1-000003.pcap"]
    # Other dumps' and other queues' files are not touched.
    (tmp_path / "dropped-q10-000001.pcap").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("keep")
    w = RotatingPcapWriter(tmp_path, "dropped-q1", max_file_size=4096, max_files=1)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dropped-q1-000004.pcap",
        "dropped-q10-000001.pcap",
        "notes.txt",
    ]


def test_writer_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RotatingPcapWriter(tmp_path, "x", max_file_size=100, max_files=1)
    with pytest.raises(ValueError):
        RotatingPcapWriter(tmp_path, "x", max_file_size=4096, max_files=0)
    with pytest.raises(ValueError):
        RotatingPcapWriter(tmp_path, "../x", max_file_size=4096, max_files=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        RotatingPcapWriter(tmp_path / "file" / "sub", "x", 4096, 1)


def test_packet_dumps_write_each_kind_and_a_reset_as_one_group(tmp_path: Path) -> None:
    d = PacketDumps(tmp_path / "dumps", 0, ["dropped", "resets"], 1 << 20, 2, clock=lambda: 5.0)
    assert stat.S_IMODE((tmp_path / "dumps").stat().st_mode) == 0o750
    assert not d.wants_input and d.wants_dropped
    d.input(b"ignored")
    d.dropped(b"d1")
    d.reset(b"trigger", [b"rst1", b"rst2"])
    d.reset(None, [b"rst3"])
    d.reset(b"no rst", [])
    st = d.stats()
    d.close()
    assert sorted(st) == ["dropped", "resets"] and st["resets"]["packets"] == 4
    assert [f.data for f in frames(tmp_path / "dumps" / "dropped-q0-000001.pcap")] == [b"d1"]
    assert [f.data for f in frames(tmp_path / "dumps" / "resets-q0-000001.pcap")] == [
        b"trigger",
        b"rst1",
        b"rst2",
        b"rst3",
    ]
    assert not (tmp_path / "dumps" / "input-q0-000001.pcap").exists()


def test_a_write_error_switches_that_dump_off_and_nothing_raises(tmp_path: Path, caplog: Any) -> None:
    d = PacketDumps(tmp_path, 0, ["dropped", "input"], 1 << 20, 2)
    writer = d._writers["dropped"]

    def broken(data: bytes, ts: float | None = None) -> None:
        raise OSError(28, "No space left on device")

    writer.write = broken  # type: ignore[method-assign]
    d.dropped(b"x")
    d.dropped(b"y")
    d.input(b"z")
    assert d.errors == 1 and not d.wants_dropped and d.wants_input and d.kinds == ["input"]
    assert "No space left on device" in caplog.text
    d.close()


# ================================================================================== the real daemon


def dumped(g: ObservedGateway, kind: str) -> list[Frame]:
    files = sorted((g.tmp / "dumps").glob(f"{kind}-q0-*.pcap"))
    return [fr for f in files for fr in frames(f)]


@pytest.mark.root
def test_dumps_hold_exactly_the_dropped_packets_and_the_forged_rsts(lab: Lab, tmp_path: Path) -> None:
    g = ObservedGateway(
        lab, tmp_path, extra=("dumps:\n  directory: dumps\n  dropped: true\n  resets: true\n  input: true\n")
    )
    try:
        g.start_server(OPEN_PORT, reply=100)
        g.start_server(DROP_PORT)
        g.start_daemon()
        syns = crafted_syns(3)
        g.send_raw(syns)
        g.wait_received(3)
        assert g.client([hexs(b"a clean request")])["error"] is None
        res = g.client([hexs(b"GET /?cmd=/bin/sh")], shutdown=False)
        assert res["error"] == "ConnectionResetError"
        wait_for(lambda: g.status()["workers"][0]["resets_sent"] == 2, "reset counted")
        st = g.status()["workers"][0]
        assert g.stop_daemon() == 0  # closes the files
    finally:
        g.cleanup()
    dropped = [f.data for f in dumped(g, "dropped")]
    # The three SYNs as sent (forwarding only lowered the TTL), then the packet that triggered the reset.
    assert [normalised(p) for p in dropped[:3]] == [normalised(p) for p in syns]
    assert [p[8] for p in dropped[:3]] == [63, 63, 63]  # IPv4 TTL, one hop
    trigger = decode(dropped[3])
    assert trigger.payload == b"GET /?cmd=/bin/sh" and trigger.dport == OPEN_PORT
    assert len(dropped) == 4 == st["packets"]["dropped"]
    # The reset dump: the trigger, then one RST to each end with the sequence number each expects.
    resets = [decode(f.data) for f in dumped(g, "resets")]
    assert len(resets) == 3 and resets[0].payload == trigger.payload
    to_server, to_client = resets[1], resets[2]
    assert all(p.flags & RST for p in (to_server, to_client))
    assert (to_server.dst, to_server.dport, to_server.seq) == (
        socket.inet_aton(SERVER_V4),
        OPEN_PORT,
        trigger.seq,
    )
    assert (to_client.dport, to_client.seq) == (trigger.sport, trigger.ack)
    assert to_client.flags & ACK
    # All input: every packet the worker received, the dropped ones among them.
    inputs = [f.data for f in dumped(g, "input")]
    assert len(inputs) == st["packets"]["received"]
    assert all(p in inputs for p in dropped)


@pytest.mark.root
def test_dumps_rotate_on_a_busy_gateway(lab: Lab, tmp_path: Path) -> None:
    g = ObservedGateway(
        lab,
        tmp_path,
        extra=("dumps:\n  directory: dumps\n  input: true\n  max_file_size: 4096\n  max_files: 3\n"),
    )
    try:
        g.start_server(OPEN_PORT, reply=50_000)
        g.start_daemon()
        assert g.client([[1, 50_000]])["received_len"] == 50_000
        st = g.status()["workers"][0]
        assert st["dumps"]["files"]["input"]["files_started"] > 3
        assert g.stop_daemon(signal.SIGTERM) == 0
    finally:
        g.cleanup()
    files = sorted((g.tmp / "dumps").glob("input-q0-*.pcap"))
    assert len(files) == 3
    assert all(24 <= f.stat().st_size <= 4096 for f in files)
    numbers = [int(f.name[-11:-5]) for f in files]
    assert numbers == list(range(numbers[0], numbers[0] + 3)) and numbers[0] > 1
    kept = [fr for f in files for fr in frames(f)]
    assert 0 < len(kept) < st["packets"]["received"]
    # A packet longer than a file holds is cut to fit (its record keeps the original length): with GSO
    # aggregates taken whole (issue 21) the bulk reply's packets are larger than these 4 KB files. Cut or
    # not, each record is a TCP packet of the test's connection, and the uncut ones decode whole.
    whole = [decode(fr.data) for fr in kept if len(fr.data) == fr.orig_len]
    assert all(fr.orig_len >= len(fr.data) for fr in kept)
    assert all(p.is_tcp and OPEN_PORT in (p.sport, p.dport) for p in whole)
    assert all(fr.data[9] == 6 and OPEN_PORT in _ports(fr.data) for fr in kept if len(fr.data) < fr.orig_len)


def test_dump_settings_in_the_config_and_applied_by_a_reload(tmp_path: Path) -> None:
    from tcpguard.app.daemon.config import ConfigError, parse_config
    from tests.app.control.test_control import WorkerBook, make_worker

    cfg = parse_config("dumps:\n  directory: d\n  dropped: true\n", str(tmp_path / "t.yaml"))
    assert cfg.dumps.directory == tmp_path / "d" and cfg.dumps.dropped and not cfg.dumps.input
    assert (cfg.dumps.max_file_size, cfg.dumps.max_files) == (64 * 1024 * 1024, 8)
    with pytest.raises(ConfigError, match=r"dumps\.max_file_size: expected an integer from 1024"):
        parse_config("dumps:\n  max_file_size: 100\n", str(tmp_path / "t.yaml"))
    w = make_worker(tmp_path)
    assert w.dumps is None
    (tmp_path / "tcpguard.yaml").write_text("rules_dir: rules\ndumps:\n  directory: d\n  input: true\n")
    assert w.reload()
    assert w.dumps is not None and w.dumps.kinds == ["input"]
    WorkerBook(w).client("S")
    w.shutdown(1.0)
    assert len(frames(tmp_path / "d" / "input-q3-000001.pcap")) == 1


def _ports(ip4: bytes) -> tuple[int, int]:
    """The TCP ports of an IPv4 packet whose tail may be cut."""
    ihl = (ip4[0] & 15) * 4
    return int.from_bytes(ip4[ihl : ihl + 2], "big"), int.from_bytes(ip4[ihl + 2 : ihl + 4], "big")
