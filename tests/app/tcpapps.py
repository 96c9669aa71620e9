"""Real TCP applications for the integration tests, run as `python -c` programs inside the lab's namespaces.

SERVER: `SERVER PORT OUTDIR REPLY_BYTES` listens dual-stack on PORT; for each connection it reads until
EOF (or an error), then sends REPLY_BYTES of deterministic data and closes. It records, per connection
N, what it received (`N.bin`) and how the read ended (`N.status`: `eof`, `reset`, or `error:...`), so a
test can check exactly which bytes the server application got.

CLIENT: `CLIENT HOST PORT SPEC_JSON` connects (TCP_NODELAY), sends each chunk of SPEC["chunks"] (hex, or
[seed, size] for `random.Random(seed).randbytes(size)`)
with SPEC["gap"] seconds between them, optionally half-closes, reads the reply, and prints one JSON
object: {"connected", "sent", "received_sha256", "received_len", "error"}.

SINK: `SINK PORT OUT` takes one IPv4 connection on PORT and reads it to the end, counting the bytes
without keeping them (SERVER keeps and rewrites what it got, too slow for many megabytes); then writes
"BYTES HOW" to OUT (`eof`, or the exception's name). OUT.ready appears once it listens.
"""

from __future__ import annotations

SERVER = r"""
import os, socket, sys, threading, hashlib
port, outdir, reply = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", port)); srv.listen(64)
open(os.path.join(outdir, "ready"), "w").close()
n = 0
def pattern(size):
    out = bytearray(); i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(8, "big")).digest(); i += 1
    return bytes(out[:size])
REPLY = pattern(reply)
def serve(conn, k):
    data = bytearray(); status = "eof"
    conn.settimeout(20)
    try:
        while True:
            b = conn.recv(65536)
            if not b: break
            data += b
            with open(os.path.join(outdir, f"{k}.bin"), "wb") as f: f.write(data)
    except ConnectionResetError: status = "reset"
    except Exception as e: status = "error:" + type(e).__name__
    with open(os.path.join(outdir, f"{k}.bin"), "wb") as f: f.write(data)
    if status == "eof" and reply:
        try: conn.sendall(REPLY)
        except Exception as e: status = "eof,send:" + type(e).__name__
    with open(os.path.join(outdir, f"{k}.status"), "w") as f: f.write(status)
    conn.close()
while True:
    c, _ = srv.accept(); n += 1
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
"""

CLIENT = r"""
import hashlib, json, random, socket, sys, time
host, port, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
res = {"connected": False, "sent": 0, "received_sha256": None, "received_len": 0, "error": None}
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(spec.get("timeout", 10))
try:
    s.connect((host, port)); res["connected"] = True
    for i, chunk in enumerate(spec["chunks"]):
        if i: time.sleep(spec.get("gap", 0))
        if isinstance(chunk, str):
            data = bytes.fromhex(chunk)
        else:  # [seed, size]: pseudo-random bytes, too many for a command line
            data = random.Random(chunk[0]).randbytes(chunk[1])
        s.sendall(data); res["sent"] += len(data)
    if spec.get("shutdown", True): s.shutdown(socket.SHUT_WR)
    h = hashlib.sha256(); n = 0
    while True:
        b = s.recv(65536)
        if not b: break
        h.update(b); n += len(b)
    res["received_sha256"] = h.hexdigest(); res["received_len"] = n
except Exception as e:
    res["error"] = type(e).__name__
    # After an RST the first call reports ECONNRESET, later ones EPIPE or ENOTCONN: if this call was not
    # the first, the reset is still pending in SO_ERROR.
    pending = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if res["error"] != "ConnectionResetError" and pending == 104:
        res["error"] = "ConnectionResetError"
print(json.dumps(res))
"""


SINK = r"""
import socket, sys
port, out = int(sys.argv[1]), sys.argv[2]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(4)
open(out + ".ready", "w").close()
c, _ = srv.accept(); c.settimeout(60); n = 0; status = "eof"
try:
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
except Exception as e: status = type(e).__name__
open(out, "w").write(f"{n} {status}")
"""


def reply_pattern(size: int) -> bytes:
    """The bytes SERVER sends back (same construction, computed independently of the server process)."""
    import hashlib

    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:size])
