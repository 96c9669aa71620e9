"""`tcpguard trace` and the tracing API, checked against tshark on a capture of real connections.

samples/trace.pcapng was recorded on this machine by tools/make_trace_capture.sh (real sockets in two
network namespaces, with loss and reordering; see docs/trace.md): interleaved connections over IPv4 and
IPv6, resets from either side, a refused connection, port reuse, retransmissions and out-of-order
segments. Nothing here needs root: the script is how the sample was made, the tests only read it.

What "matches tshark" means, exactly:

* flows: one per `tcp.stream`, with the same frames (`-T fields -e tcp.stream`);
* payload: each direction equals tshark's `follow,tcp,raw` output, except after an RST: Wireshark also
  shows bytes that arrived after the connection was reset (the receiver discarded them), the tracer
  stops where the receiving application stopped. There the tracer's stream must be a prefix of tshark's
  and the tracker must have counted the late frames ("data after the connection ended").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpguard.app.offline import trace as tr
from tcpguard.app.offline.replay import EXIT_DAMAGED
from tcpguard.core.packet import decode
from tcpguard.io.pcap import LINKTYPE_ETHERNET, Frame, PcapReader, PcapWriter, iter_frames

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "samples" / "trace.pcapng"

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark: scripts/install.sh")


# ------------------------------------------------------------------------------------------ helpers


def _tshark(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tshark", *args], capture_output=True, text=True, check=True)


def tshark_streams(capture: Path) -> dict[int, list[int]]:
    out = _tshark("-r", str(capture), "-T", "fields", "-e", "frame.number", "-e", "tcp.stream").stdout
    streams: dict[int, list[int]] = {}
    for line in out.splitlines():
        number, _, stream = line.partition("\t")
        if stream:
            streams.setdefault(int(stream), []).append(int(number))
    return streams


def tshark_follow(capture: Path, stream: int) -> dict[str, bytes]:
    """Each node's bytes from `follow,tcp,raw`, keyed by "addr:port" as tshark prints the node."""
    out = _tshark("-r", str(capture), "-q", "-z", f"follow,tcp,raw,{stream}").stdout
    nodes: list[str] = []
    data = [bytearray(), bytearray()]
    for line in out.splitlines():
        if line.startswith("Node "):
            # "Node 0: 10.98.0.1:41884", "Node 0: [fd00:98::1]:55496"
            nodes.append(line.split(": ", 1)[1].strip().replace("[", "").replace("]", ""))
        elif line and not line.startswith(("=", "Follow:", "Filter:")):
            data[1 if line.startswith("\t") else 0] += bytes.fromhex(line.strip())
    return {nodes[0]: bytes(data[0]), nodes[1]: bytes(data[1])}


def endpoint(addr: str, port: int) -> str:
    return f"{addr}:{port}"


def run_trace(capture: Path, out: Path, **kw: Any) -> dict[str, Any]:
    tr.trace_capture(capture, out, progress=False, **kw)
    index: dict[str, Any] = json.loads((out / "index.json").read_text())
    return index


def read_payload(out: Path, flow: dict[str, Any], direction: str) -> bytes:
    name = flow["payload"][direction]["fpout"]
    return (out / name).read_bytes() if name else b""


def rewrite(src: Path, dst: Path, frames: Iterator[Frame]) -> None:
    """A classic pcap holding `frames` (the tests' way of making a variant of the sample)."""
    with PcapWriter(dst, LINKTYPE_ETHERNET) as w:
        for f in frames:
            w.write(f.data, f.ts, f.orig_len)


@pytest.fixture(scope="module")
def sample_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("trace")
    return out, run_trace(SAMPLE, out, payload=True)


# ------------------------------------------------------------------------------------------ vs tshark


@needs_tshark
def test_flows_and_frames_match_tshark_streams(sample_trace: tuple[Path, dict[str, Any]]) -> None:
    _out, index = sample_trace
    flows = index["flows"]
    streams = tshark_streams(SAMPLE)
    assert len(flows) == len(streams) == 12
    # index.json lists flows in start order, which is tshark's stream order.
    assert [f["index"] for f in flows] == [streams[i] for i in sorted(streams)]
    assert index["frames"] == index["traced"] == sum(len(v) for v in streams.values())


@needs_tshark
def test_forward_and_reverse_frames_match_tshark(sample_trace: tuple[Path, dict[str, Any]]) -> None:
    _out, index = sample_trace
    out = _tshark(
        "-r",
        str(SAMPLE),
        "-T",
        "fields",
        "-E",
        "separator=,",
        "-e",
        "frame.number",
        "-e",
        "ip.src",
        "-e",
        "ipv6.src",
        "-e",
        "tcp.srcport",
    ).stdout
    sender = {}
    for line in out.splitlines():
        n, v4, v6, port = line.split(",")
        sender[int(n)] = endpoint(v4 or v6, int(port))
    for f in index["flows"]:
        client = endpoint(f["client"], f["client_port"])
        assert f["forward"] == [n for n in f["index"] if sender[n] == client]
        assert f["reverse"] == [n for n in f["index"] if sender[n] != client]
        assert f["packets"] == {"forward": len(f["forward"]), "reverse": len(f["reverse"])}
        assert f["syn_seen"]


@needs_tshark
def test_payload_matches_tshark_follow(sample_trace: tuple[Path, dict[str, Any]]) -> None:
    out, index = sample_trace
    streams = tshark_streams(SAMPLE)
    by_frames = {tuple(v): k for k, v in streams.items()}
    cut = 0
    for f in index["flows"]:
        follow = tshark_follow(SAMPLE, by_frames[tuple(f["index"])])
        for direction, sender in (
            ("forward", endpoint(f["client"], f["client_port"])),
            ("reverse", endpoint(f["server"], f["server_port"])),
        ):
            ours, theirs = read_payload(out, f, direction), follow[sender]
            assert f["payload"][direction]["bytes"] == len(ours)
            assert f["payload"][direction]["gaps"] == []
            if ours != theirs:
                # Only after an RST, and only bytes the receiver never accepted.
                assert f["reason"] == "rst", f["label"]
                assert theirs.startswith(ours), f["label"]
                assert f["tracker"].get("data after the connection ended", 0) > 0
                cut += 1
            if f["reason"] == "fin":
                assert f["payload"][direction]["complete"]
    assert cut <= 3  # the client reset mid-transfer; the server reset while its data was held back
    assert any(f["payload"]["reverse"]["bytes"] == 60000 for f in index["flows"])


def test_how_flows_end_and_port_reuse(sample_trace: tuple[Path, dict[str, Any]]) -> None:
    _out, index = sample_trace
    flows = index["flows"]
    assert index["reasons"] == {"fin": 7, "rst": 5}
    tuples = [(f["client"], f["client_port"], f["server"], f["server_port"]) for f in flows]
    reused = {t for t in tuples if tuples.count(t) > 1}
    assert {t[1] for t in reused} == {40001, 40002}  # same four-tuple twice: two flows each
    assert len({f["label"] for f in flows}) == len(flows)
    refused = [f for f in flows if f["server_port"] == 9]
    assert len(refused) == 1 and refused[0]["reason"] == "rst" and len(refused[0]["index"]) == 2
    assert {f["client"] for f in flows} == {"10.98.0.1", "fd00:98::1"}


def test_labels_are_file_system_safe(sample_trace: tuple[Path, dict[str, Any]]) -> None:
    _out, index = sample_trace
    for f in index["flows"]:
        assert re.fullmatch(r"[0-9]{6}_[0-9a-f.-]+\.[0-9]+_[0-9a-f.-]+\.[0-9]+", f["label"]), f["label"]
        assert f["label"].startswith(f"{f['index'][0]:06d}_")
    v6 = [f["label"] for f in index["flows"] if ":" in f["client"]]
    assert v6 and all(":" not in label for label in v6)


# ------------------------------------------------------------------------------------------ output files


@needs_tshark
@pytest.mark.parametrize("container", ["pcapng", "pcap"])
def test_flow_files_read_back_by_tshark(tmp_path: Path, container: str) -> None:
    capture = SAMPLE
    if container == "pcap":
        capture = tmp_path / "sample.pcap"
        rewrite(SAMPLE, capture, iter_frames(SAMPLE))
    out = tmp_path / "out"
    index = run_trace(capture, out)
    assert index["container"] == container
    frames = {f.number: f for f in iter_frames(capture)}
    for f in index["flows"]:
        path = out / f["fpout"]
        assert path.suffix == f".{container}"
        res = subprocess.run(
            [
                "tshark",
                "-r",
                str(path),
                "-T",
                "fields",
                "-e",
                "frame.len",
                "-e",
                "frame.time_epoch",
                "-e",
                "tcp.stream",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert "damaged" not in res.stderr and "corrupt" not in res.stderr.lower()
        rows = [line.split("\t") for line in res.stdout.splitlines()]
        assert len(rows) == len(f["index"])
        assert {r[2] for r in rows} == {"0"}  # one TCP stream per file
        written = list(iter_frames(path))
        for n, got, row in zip(f["index"], written, rows, strict=True):
            orig = frames[n]
            assert got.data == orig.data and got.orig_len == orig.orig_len == int(row[0])
            assert got.linktype == orig.linktype == LINKTYPE_ETHERNET
            assert abs(float(row[1]) - orig.ts) < 2e-6


def test_json_flow_files(tmp_path: Path) -> None:
    index = run_trace(SAMPLE, tmp_path, format="json")
    assert index["format"] == "json"
    for f in index["flows"]:
        doc = json.loads((tmp_path / f["fpout"]).read_text())
        assert doc["label"] == f["label"]
        assert [fr["frame"] for fr in doc["frames"]] == f["index"]
        assert [fr["frame"] for fr in doc["frames"] if fr["direction"] == "forward"] == f["forward"]
        assert doc["frames"][0]["flags"] == "S"


def test_small_bounds_change_nothing(tmp_path: Path, sample_trace: tuple[Path, dict[str, Any]]) -> None:
    """One open file and tiny spools: every file is reopened and appended to many times."""
    ref_out, ref = sample_trace
    settings = tr.TraceSettings(max_open_files=1, flush_bytes=100, max_pending_bytes=1000)
    index = run_trace(SAMPLE, tmp_path, payload=True, settings=settings)
    assert [f["index"] for f in index["flows"]] == [f["index"] for f in ref["flows"]]
    for f, g in zip(index["flows"], ref["flows"], strict=True):
        assert (tmp_path / f["fpout"]).read_bytes() == (ref_out / g["fpout"]).read_bytes()
        for d in ("forward", "reverse"):
            assert read_payload(tmp_path, f, d) == read_payload(ref_out, g, d)


def test_max_flows_evicts(tmp_path: Path) -> None:
    """One connection at a time: each new one evicts the last (ending it early if it was still live)."""
    index = run_trace(SAMPLE, tmp_path, settings=tr.TraceSettings(max_flows=1))
    assert index["reasons"].get("evicted", 0) > 0
    assert index["tracker"]["evicted"] > 0
    assert index["traced"] == index["frames"]  # every frame still lands in some flow


# ------------------------------------------------------------------------------------------ damaged captures


def _seg(f: Frame) -> tuple[str, int, int, int]:
    """(sender, sequence number, payload length, flags) of a sample frame."""
    assert f.ip is not None
    p = decode(f.ip)
    return f"{p.src.hex()}:{p.sport}", p.seq, len(p.payload), p.flags


def test_lost_segment_is_a_reported_gap(tmp_path: Path, sample_trace: tuple[Path, dict[str, Any]]) -> None:
    ref_out, ref = sample_trace
    bulk = next(f for f in ref["flows"] if f["payload"]["reverse"]["bytes"] == 60000)
    frames = list(iter_frames(SAMPLE))
    syn_ack = _seg(frames[bulk["reverse"][0] - 1])
    server, isn = syn_ack[0], syn_ack[1]
    # A server segment in the middle of the transfer, and every copy of it (retransmissions).
    data = [n for n in bulk["reverse"] if _seg(frames[n - 1])[2] > 0]
    _s, seq, length, _fl = _seg(frames[data[len(data) // 2] - 1])
    lost = {n for n in data if _seg(frames[n - 1])[1:3] == (seq, length)}
    assert all(
        not (s == server and ln and s_ < seq + length and s_ + ln > seq and (s_, ln) != (seq, length))
        for s, s_, ln, _ in (_seg(frames[n - 1]) for n in data)
    ), "another segment overlaps the chosen one: pick differently"
    cut = tmp_path / "lost.pcap"
    rewrite(SAMPLE, cut, (f for f in frames if f.number not in lost))
    out = tmp_path / "out"
    index = run_trace(cut, out, payload=True)
    flow = next(f for f in index["flows"] if f["label"] == bulk["label"])
    off = (seq - isn - 1) % 2**32
    full = read_payload(ref_out, bulk, "reverse")
    rev = flow["payload"]["reverse"]
    assert rev["gaps"] == [{"offset": off, "length": length, "file_offset": off}]
    assert read_payload(out, flow, "reverse") == full[:off] + full[off + length :]
    assert not rev["complete"]
    assert flow["payload"]["forward"]["complete"]


SampleTrace = tuple[Path, dict[str, Any]]


def test_truncated_frames_stay_in_their_flows(tmp_path: Path, sample_trace: SampleTrace) -> None:
    """Data frames cut to their headers (a small snap length): the engine rejects them as malformed, the
    tracer still puts them in their flows by the flow key, and reports the bytes it never saw as gaps."""
    _ref_out, ref = sample_trace

    def cut(f: Frame) -> Frame:
        if _seg(f)[2] == 0:
            return f
        return Frame(f.number, f.ts, f.linktype, f.data[:74], f.orig_len, None)

    capture = tmp_path / "snap.pcap"
    rewrite(SAMPLE, capture, (cut(f) for f in iter_frames(SAMPLE)))
    index = run_trace(capture, tmp_path / "out", payload=True)
    assert [f["index"] for f in index["flows"]] == [f["index"] for f in ref["flows"]]
    assert index["tracker"]["malformed"] > 0
    assert any(f["payload"]["reverse"]["gaps"] for f in index["flows"])


def test_missing_handshake_picks_client_by_port(tmp_path: Path, sample_trace: SampleTrace) -> None:
    _ref_out, ref = sample_trace
    first = ref["flows"][0]
    skip = set(first["index"][:3])  # SYN, SYN-ACK, ACK
    capture = tmp_path / "midstream.pcap"
    rewrite(SAMPLE, capture, (f for f in iter_frames(SAMPLE) if f.number not in skip))
    index = run_trace(capture, tmp_path / "out")
    flow = index["flows"][0]
    assert not flow["syn_seen"]
    assert (flow["client"], flow["client_port"]) == (first["client"], first["client_port"])
    assert len(flow["index"]) == len(first["index"]) - 3
    assert flow["reason"] == "fin"


# ------------------------------------------------------------------------------------------ Python API


def test_api_seed_records(tmp_path: Path) -> None:
    tracer = tr.TCP(tmp_path, "pcap", container="pcapng")
    assert tracer.protocol == "TCP" and tracer.name == "Transmission Control Protocol"
    labels = set()
    for frame in iter_frames(SAMPLE):
        pkt = tr.Packet.from_frame(frame)
        assert pkt is not None
        assert pkt.protocol == LINKTYPE_ETHERNET and pkt.index == frame.number
        assert pkt.timestamp == frame.ts and pkt.frame is frame
        label = tracer.dump(pkt) if frame.number % 2 else tracer.trace(pkt)
        assert label is not None
        labels.add(label)
        if frame.number == 5:
            live = tracer.buffer
            assert len(live) == 1
            ((bufid, buf),) = live.items()
            assert bufid == (pkt.src, pkt.srcport, pkt.dst, pkt.dstport) or bufid[0] == pkt.dst
            assert buf.index == [1, 2, 3, 4, 5] and buf.label == label
    index = tracer.submit()
    assert tracer.submit() == index
    assert len(index) == len(labels) == 12
    for rec in index:
        assert rec.label in labels
        assert list(rec.index) == sorted(rec.forward + rec.reverse)
        assert rec.fpout is not None and Path(rec.fpout).exists()
        # dump() wrote the odd frames only; trace() just tracked the even ones.
        assert len(list(iter_frames(rec.fpout))) == sum(1 for n in rec.index if n % 2)
    assert pkt is not None
    with pytest.raises(RuntimeError):
        tracer.trace(pkt)


def test_api_packets_from_the_daemon() -> None:
    """Raw IP packets, as NFQUEUE hands them to the daemon: no link layer, numbered by the caller."""
    tracer = tr.TCP()
    n = 0
    for frame in iter_frames(SAMPLE):
        assert frame.ip is not None
        pkt = tr.Packet.from_ip(frame.ip, frame.ts, frame.number)
        assert pkt is not None and pkt.protocol == 101
        tracer.trace(pkt)
        n += 1
    index = tracer.submit()
    assert len(index) == 12 and sum(len(r.index) for r in index) == n
    assert all(r.fpout is None for r in index)
    assert tr.Packet.from_ip(b"\x45" + bytes(19), 0.0, 1) is None  # not TCP


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tr.main([str(SAMPLE), "-o", str(tmp_path), "--payload", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "12 flows" in out and (tmp_path / "index.json").exists()
    assert not (tmp_path / ".index.spool").exists()
    assert tr.main([str(tmp_path / "missing.pcap"), "-o", str(tmp_path / "x")]) == 1


def test_jobs_split_connections_without_changing_the_result(
    tmp_path: Path, sample_trace: tuple[Path, dict[str, Any]]
) -> None:
    ref_out, ref = sample_trace
    index = run_trace(SAMPLE, tmp_path, payload=True, jobs=3)
    strip = ("capture",)
    assert {k: v for k, v in index.items() if k not in strip} == {
        k: v for k, v in ref.items() if k not in strip
    }
    for f in index["flows"]:
        for name in [f["fpout"], *(p["fpout"] for p in f["payload"].values() if p["fpout"])]:
            assert (tmp_path / name).read_bytes() == (ref_out / name).read_bytes()
    assert not list(tmp_path.glob(".index.spool*"))


# ------------------------------------------------------------------------------ damaged captures, re-runs


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def _listed(index: dict[str, Any]) -> set[str]:
    names = {"index.json"}
    for f in index["flows"]:
        names.add(f["fpout"])
        names |= {p["fpout"] for p in f.get("payload", {}).values() if p["fpout"]}
    return names


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_cut_capture_is_traced_up_to_the_damage_with_every_flow_and_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: int
) -> None:
    """Before: the trace stopped with an error, left some flow files and no index.json. Now every whole
    record is traced, every flow written and listed, the index says where the damage is, and the status
    is EXIT_DAMAGED. The result is the trace of the capture cut cleanly before the damaged record."""
    raw = SAMPLE.read_bytes()
    damaged = tmp_path / "damaged.pcapng"
    damaged.write_bytes(raw[: len(raw) * 2 // 3])
    with PcapReader(damaged, stop_at_damage=True) as reader:
        whole = len(list(reader))
        assert reader.damage is not None
        offset = reader.damage.offset
    clean = tmp_path / "clean.pcapng"
    clean.write_bytes(raw[:offset])  # the whole records only: a file without damage

    out = tmp_path / "out"
    args = [str(damaged), "-o", str(out), "--payload", "--no-progress", "-j", str(jobs)]
    assert tr.main(args) == EXIT_DAMAGED
    captured = capsys.readouterr()
    assert f"{damaged}: offset {offset}: file ends inside a block" in captured.err
    assert f"capture damaged at byte {offset}: " in captured.out
    index = json.loads((out / "index.json").read_text())
    assert index["damage"]["offset"] == offset and "cut short" in index["damage"]["error"]
    assert index["frames"] == whole and index["flow_count"] == len(index["flows"]) > 0
    assert _files(out) == _listed(index)  # every flow's files, no spool left

    ref_out = tmp_path / "ref"
    ref = run_trace(clean, ref_out, payload=True)
    assert ref["damage"] is None
    strip = ("capture", "damage")
    assert {k: v for k, v in index.items() if k not in strip} == {
        k: v for k, v in ref.items() if k not in strip
    }
    for name in _listed(index) - {"index.json"}:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_a_failed_trace_leaves_nothing(tmp_path: Path) -> None:
    """Not a capture: status 1, the output directory is not even made, and an earlier trace in an
    existing one is left whole."""
    bogus = tmp_path / "notes.pcap"
    bogus.write_text("not a capture\n")
    assert tr.main([str(bogus), "-o", str(tmp_path / "new"), "--no-progress"]) == 1
    assert not (tmp_path / "new").exists()
    out = tmp_path / "out"
    first = run_trace(SAMPLE, out)
    before = {n: (out / n).read_bytes() for n in _files(out)}
    assert tr.main([str(bogus), "-o", str(out), "--no-progress"]) == 1
    assert {n: (out / n).read_bytes() for n in _files(out)} == before
    assert _files(out) == _listed(first)


def test_a_second_trace_into_the_same_directory_leaves_no_stale_files(tmp_path: Path) -> None:
    """The earlier trace's files (listed in its index.json) are removed first; anything else stays."""
    out = tmp_path / "out"
    first = run_trace(SAMPLE, out, payload=True)
    (out / "notes.txt").write_text("mine\n")
    # A smaller capture, other options: fewer flows, JSON files, no payload.
    small = tmp_path / "small.pcapng"
    with PcapReader(SAMPLE) as reader:
        rewrite(SAMPLE, small, (f for f in reader if f.number <= 40))
    second = run_trace(small, out, format="json")
    assert len(second["flows"]) < len(first["flows"])
    assert _files(out) == _listed(second) | {"notes.txt"}
    assert not any(n.endswith((".bin", ".pcapng")) for n in _files(out))
    assert (out / "notes.txt").read_text() == "mine\n"


def test_a_directory_with_other_files_and_no_index_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "000001_10.0.0.1.1_10.0.0.2.2.pcap").write_bytes(b"left by a trace that was killed")
    assert tr.main([str(SAMPLE), "-o", str(out), "--no-progress"]) == 1
    assert _files(out) == {"000001_10.0.0.1.1_10.0.0.2.2.pcap"}


def test_an_index_naming_files_outside_the_directory_removes_none_of_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    keep = tmp_path / "precious.txt"
    keep.write_text("keep\n")
    flows = [
        {"fpout": "../precious.txt"},
        {"fpout": str(keep)},
        {"fpout": "x", "payload": {"a": {"fpout": ".."}}},
    ]
    (out / "index.json").write_text(json.dumps({"flows": flows}))
    (out / "x").write_text("stale\n")
    run_trace(SAMPLE, out)
    assert keep.read_text() == "keep\n" and not (out / "x").exists()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real full disk for a trace to fail on. Unmounted also when the test fails."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tcpguard-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)  # a descriptor left open


def test_a_trace_that_fails_midway_removes_the_files_it_wrote(tmp_path: Path, tiny_fs: Path) -> None:
    """The disk fills up mid-trace (ENOSPC, on a real tmpfs): status 1 and none of this run's files stay
    to look like a result."""
    out = tiny_fs / "out"
    assert tr.main([str(SAMPLE), "-o", str(out), "--payload", "--no-progress"]) == 1
    assert _files(out) == set()
