"""The daemon's side of the control socket: the listening socket, the worker's inbox, the links to
the workers.

Where requests run. The engine belongs to the packet loop: no other thread may touch it while a packet is
being processed. So socket I/O happens in small server threads, and every request that needs the engine
is put in the worker's `Inbox` and executed in the adapter's timer tick (every 0.5 s at the latest), in
the packet-loop thread, between packets; the server thread waits for the answer. Forged RSTs from
`reset` are returned by that tick like any timer output, so the adapter sends them.

Several workers. The main process (the supervisor) serves the one public socket and fans requests out to
the workers over a private socket pair per worker (made at fork, so no file system path and no
permission question); it also serves the metrics endpoint from the same fan-out. One socket and one
endpoint per gateway keep operators' tools and Prometheus targets independent of the worker count.
What each command does and which workers it reaches is `tcpguard.app.control.dispatch`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from tcpguard.app.control.access import AccessPolicy, peer_credentials, resolve_group
from tcpguard.app.control.protocol import (
    MAX_REQUEST,
    WORKER_TIMEOUT,
    ControlError,
    Request,
    Response,
    encode,
    error,
)

log = logging.getLogger("tcpguard.control")

# ================================================================================== the worker's inbox


class _Pending:
    __slots__ = ("done", "request", "response", "taken")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.response: Response | None = None
        self.done = threading.Event()
        self.taken = False


class Inbox:
    """Requests from control threads, executed in the packet loop's timer tick.

    `submit` (any thread) waits for the answer; `serve` (the packet-loop thread, in the tick) executes
    everything pending. A request not yet taken when `submit` times out is withdrawn and never runs; one
    already taken runs to its end (a reset that the caller stopped waiting for still happens).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._closed: str | None = None

    def submit(self, request: Request, timeout: float = WORKER_TIMEOUT) -> Response:
        p = _Pending(request)
        with self._lock:
            if self._closed is not None:
                return error(self._closed)
            self._pending.append(p)
        if p.done.wait(timeout):
            assert p.response is not None
            return p.response
        with self._lock:
            if not p.taken:
                self._pending.remove(p)
                return error(f"the packet loop did not answer within {timeout:g} s")
        p.done.wait()  # taken: it is running now, and the tick finishes what it started
        assert p.response is not None
        return p.response

    def serve(self, execute: Callable[[Request], Response]) -> int:
        """Execute every pending request (call only from the packet-loop thread). Returns how many."""
        with self._lock:
            batch, self._pending = self._pending, []
            for p in batch:
                p.taken = True
        try:
            for p in batch:
                try:
                    p.response = execute(p.request)
                except Exception as exc:
                    log.exception("control request %r failed", p.request.get("cmd"))
                    p.response = error(f"internal error: {type(exc).__name__}: {exc}")
                p.done.set()
        finally:
            # A BaseException (the loop is being stopped) must not leave a caller waiting forever.
            for p in batch:
                if not p.done.is_set():
                    p.response = error("interrupted")
                    p.done.set()
        return len(batch)

    def close(self, reason: str = "the worker is stopping") -> None:
        """Refuse new requests and answer the pending ones with `reason`."""
        with self._lock:
            self._closed = reason
            batch, self._pending = self._pending, []
        for p in batch:
            p.response = error(reason)
            p.done.set()


# ================================================================================== links to workers


class WorkerLinks(Protocol):
    """How the dispatcher reaches the workers: in process (one worker) or over socket pairs."""

    def queues(self) -> list[int]: ...

    def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]: ...


class InboxLinks:
    """The single-process daemon: the one worker's inbox, in this process."""

    def __init__(self, queue: int, inbox: Inbox) -> None:
        self.queue = queue
        self.inbox = inbox

    def queues(self) -> list[int]:
        return [self.queue]

    def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]:
        return {q: self.inbox.submit(request, timeout) for q in queues if q == self.queue}


class WorkerChannel:
    """The supervisor's end of one worker's socket pair. Requests carry an `rid` so that a late answer
    to a request that timed out is recognised and skipped instead of answering the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._buf = bytearray()
        self._rid = 0

    def send(self, request: Request) -> int:
        self._rid += 1
        self.sock.settimeout(5.0)
        self.sock.sendall(encode({**request, "rid": self._rid}))
        return self._rid

    def receive(self, rid: int, deadline: float) -> Response:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("rid") == rid:
                    msg.pop("rid", None)
                    return msg
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the worker did not answer in time")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the worker closed its control channel")
            self._buf += data

    def close(self) -> None:
        # shutdown first: it wakes a fan-out thread blocked in recv() on this socket.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class ChannelLinks:
    """The supervisor's view of its workers: queue -> channel, replaced when a worker is restarted.
    `queues()` is the configured set, so a worker that is restarting shows up as an error, not as gone."""

    def __init__(self, queues: Iterable[int] = ()) -> None:
        self._lock = threading.Lock()
        self._channels: dict[int, WorkerChannel] = {}
        self._queues = set(queues)

    def set(self, queue: int, sock: socket.socket) -> None:
        with self._lock:
            old = self._channels.get(queue)
            self._channels[queue] = WorkerChannel(sock)
            self._queues.add(queue)
        if old is not None:
            old.close()

    def remove(self, queue: int) -> None:
        with self._lock:
            old = self._channels.pop(queue, None)
        if old is not None:
            old.close()

    def filenos(self) -> list[int]:
        with self._lock:
            return [c.sock.fileno() for c in self._channels.values() if c.sock.fileno() >= 0]

    def queues(self) -> list[int]:
        with self._lock:
            return sorted(self._queues)

    def call(self, queues: list[int], request: Request, timeout: float) -> dict[int, Response]:
        """Send to every worker first, then collect, so N workers answer in one tick, not N ticks.
        Channels are locked in queue order (no deadlock between concurrent fan-outs)."""
        with self._lock:
            chans = [(q, self._channels[q]) for q in sorted(queues) if q in self._channels]
        out: dict[int, Response] = {q: error("the worker is not running (restarting?)") for q in queues}
        with contextlib.ExitStack() as stack:
            for _, ch in chans:
                stack.enter_context(ch.lock)
            sent: list[tuple[int, WorkerChannel, int]] = []
            for q, ch in chans:
                try:
                    sent.append((q, ch, ch.send(request)))
                except OSError as exc:
                    out[q] = error(f"worker unreachable: {exc}")
            deadline = time.monotonic() + timeout
            for q, ch, rid in sent:
                try:
                    out[q] = ch.receive(rid, deadline)
                except (OSError, TimeoutError) as exc:
                    out[q] = error(f"worker for queue {q}: {exc}")
        return out


class ChannelServer:
    """The worker's end of its socket pair: requests from the supervisor, executed through the inbox."""

    def __init__(self, sock: socket.socket, inbox: Inbox) -> None:
        self.sock = sock
        self.inbox = inbox
        self._thread = threading.Thread(target=self._run, name="control-channel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _run(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    try:
                        req = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(req, dict):
                        continue
                    rid = req.pop("rid", None)
                    resp = self.inbox.submit(req, WORKER_TIMEOUT)
                    self.sock.sendall(encode({**resp, "rid": rid}))
        except OSError:
            return


# ================================================================================== the server


class ControlServer:
    """The listening Unix socket: access control, one thread per client, requests to `handler`.

    `start()` raises ControlError when the socket cannot be served (another daemon answers on the path,
    the path is not a socket, the group does not exist, bind fails).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Callable[[Request], Response],
        group: str | None = None,
        max_clients: int = 32,
        idle_timeout: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.policy = AccessPolicy()
        self.refused = 0
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        gid = resolve_group(self.group)
        self.policy = AccessPolicy(gid)
        self._prepare_directory(gid)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket file must never exist with looser permissions, not even between bind and chmod.
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind the control socket {self.path}: {exc}") from exc
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(self.path, -1, gid)
                os.chmod(self.path, 0o660)
            else:
                os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise ControlError(f"cannot set up the control socket {self.path}: {exc}") from exc
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._thread.start()
        log.info("control socket %s (%s)", self.path, f"root and group {self.group}" if gid else "root only")

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def close(self) -> None:
        """Stop accepting, cut the clients off, remove the socket file (if it is still ours)."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes accept() in the server thread
            sock.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            self._inode = None

    def filenos(self) -> list[int]:
        """The listening socket and the connected clients (a forked worker closes its copies)."""
        with self._lock:
            clients = [c.fileno() for c in self._clients]
        return [self.fileno(), *clients]

    # ------------------------------------------------------------------ helpers
    def _prepare_directory(self, gid: int | None) -> None:
        """Create the socket's directory if missing. Its mode and group are set only when it is ours:
        created here, or the runtime directory systemd made for this service; a shared directory such
        as /run or /tmp is never touched (the socket's own mode still protects it)."""
        directory = self.path.parent
        mode = 0o750 if gid is not None else 0o700
        ours = os.environ.get("RUNTIME_DIRECTORY", "").split(":")
        if not directory.exists():
            try:
                directory.mkdir(mode=mode, parents=True)
            except OSError as exc:
                raise ControlError(f"cannot create {directory}: {exc}") from exc
        elif str(directory) not in ours:
            return
        try:
            if gid is not None:
                os.chown(directory, -1, gid)
            os.chmod(directory, mode)
        except OSError as exc:
            raise ControlError(f"cannot set the mode of {directory}: {exc}") from exc

    def _remove_stale(self) -> None:
        """A socket file left by a daemon that was killed is removed; a live one is an error."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            log.warning("removed the control socket %s, left by a run that did not stop cleanly", self.path)
            return
        except OSError as exc:
            raise ControlError(f"cannot check the existing socket {self.path}: {exc}") from exc
        finally:
            probe.close()
        raise ControlError(f"another process answers on {self.path}: is tcpguard already running?")

    def _accept_loop(self) -> None:
        while not self._closed:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            try:
                creds = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if not self.policy.allows(*creds):
                self.refused += 1
                log.warning("control: refused a client (pid %d, uid %d, gid %d)", *creds)
                with contextlib.suppress(OSError):
                    conn.sendall(encode(error("permission denied")))
                conn.close()
                continue
            with self._lock:
                busy = len(self._clients) >= self.max_clients
                if not busy:
                    self._clients.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    conn.sendall(encode(error("too many control clients, try again")))
                conn.close()
                continue
            threading.Thread(
                target=self._session, args=(conn, creds), name="control-client", daemon=True
            ).start()

    def _session(self, conn: socket.socket, creds: tuple[int, int, int]) -> None:
        buf = bytearray()
        try:
            conn.settimeout(self.idle_timeout)
            while not self._closed:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.strip():
                        conn.sendall(encode(self._answer(line, creds)))
                if len(buf) > MAX_REQUEST:
                    conn.sendall(encode(error(f"request longer than {MAX_REQUEST} bytes")))
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def _answer(self, line: bytes, creds: tuple[int, int, int]) -> Response:
        try:
            req = json.loads(line)
        except ValueError:
            return error("a request is one JSON object per line")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return error('a request is a JSON object with a "cmd" string')
        if req["cmd"] in ("drop", "reset", "reload"):
            log.info("control: %s %s by uid %d (pid %d)", req["cmd"], req.get("id", ""), creds[1], creds[0])
        try:
            return self.handler(req)
        except Exception as exc:
            log.exception("control request %r failed", req.get("cmd"))
            return error(f"internal error: {type(exc).__name__}: {exc}")
