"""A Debian system booted with a real systemd as PID 1 in a container, for the service tests.

    rootfs = ensure_rootfs()                 # cached between runs
    wheels = ensure_wheelhouse(REPO)         # cached between runs
    with Container(rootfs, binds=[(REPO, "/src"), (wheels, "/wheels")]) as box:
        box.run(["/src/scripts/install-service.sh", "--wheelhouse", "/wheels"])
        box.run(["systemctl", "start", "tcpguard"])

Why it is built this way:

* The root file system is made once by mmdebstrap (or debootstrap, same arguments, slower) from Debian's
  package registry, for the host's own release, and cached in CACHE_DIR under a key that hashes the
  release, the mirror and the package list: a changed list builds a new tree, an unchanged one is reused.
  It is built in a temporary directory and renamed into place under an exclusive lock, so parallel runs
  never see half a tree nor build the same one twice; a run killed mid-build leaves only a temporary
  directory, which the next build under the lock removes.
* The container gets no network to the outside (`--private-network`: its own namespace with only `lo`),
  so nothing in it can touch the host's iptables or reach a registry. The Python packages therefore come
  from a wheelhouse that the host builds with its own pip (same Python minor version as the container's,
  checked), also cached; the install inside the container runs pip offline from it. That is how an
  air-gapped gateway would be installed too.
* `--volatile=overlay` puts a tmpfs over the cached tree, so a run changes nothing on disk and the
  cache is never dirtied; the repository is bind-mounted read-only.
* The host may not run systemd (no D-Bus, no machined: this CI runs under another PID 1), so the
  container is not registered (`--register=no --keep-unit`), and nspawn would then create its `payload`
  and `supervisor` cgroups next to itself, where two runs would collide. So nspawn starts inside cgroups
  of its own, named after the machine, which are removed at the end.
* Commands run inside through `nsenter` into all namespaces of the container's PID 1, with a clean
  environment. Files are written through `/proc/PID/root`, the container's root as the host sees it.
* Closing (also on an exception, also when booting failed half-way) kills the container's PID 1, which
  ends every process in its PID namespace and with it the overlay; then nspawn is reaped and the cgroups
  removed. Only processes this object started are signalled, by pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "CACHE_DIR",
    "PACKAGES",
    "BootError",
    "Container",
    "ensure_rootfs",
    "ensure_wheelhouse",
]

CACHE_DIR = Path(os.environ.get("TCPGUARD_TEST_CACHE", "/var/cache/tcpguard-tests"))
MIRROR = os.environ.get("TCPGUARD_TEST_MIRROR", "http://deb.debian.org/debian")

# What a gateway running tcpguard has: systemd, iptables, Python with venv, the NFQUEUE library; no
# compiler (the wheelhouse brings the built extensions). iproute2 and procps for diagnostics.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-systemd",
    "iptables",
    "python3",
    "python3-venv",
    "libnetfilter-queue1",
    "iproute2",
    "procps",
)
# Bumped when the way the tree is made changes (not only the package list).
RECIPE = 1

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BootError(RuntimeError):
    """The container did not come up; the message carries its console output."""


# ---------------------------------------------------------------------------------------------- cache
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (flock: released by the kernel if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _key(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def host_release() -> str:
    """The host's Debian codename: the container runs the same release (and so the same Python)."""
    fields = dict(
        line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
    )
    codename = fields.get("VERSION_CODENAME", "").strip('"')
    if fields.get("ID", "").strip('"') != "debian" or not codename:
        raise RuntimeError(f"the systemd container tests need a Debian host, not {fields.get('ID')!r}")
    return codename


def _remove_stale(cache: Path, prefix: str, keep: str) -> None:
    """Remove other cache entries of this kind that no run is using (their lock is free)."""
    for entry in cache.glob(f"{prefix}-*"):
        if entry.suffix == ".lock" or entry.name == keep:
            continue
        lock = cache / f"{entry.name.split('.tmp-')[0]}.lock"
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another run uses or builds it
            try:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def ensure_rootfs(cache: Path = CACHE_DIR, log: TextIO | None = None) -> Path:
    """The cached Debian tree for the container, built on first use (about a minute with mmdebstrap)."""
    release = host_release()
    name = "rootfs-" + _key({"release": release, "mirror": MIRROR, "packages": PACKAGES, "recipe": RECIPE})
    final = cache / name
    with _locked(cache / f"{name}.lock"):
        if (final / "usr/lib/systemd/systemd").exists() or (final / "lib/systemd/systemd").exists():
            return final
        for leftover in cache.glob(f"{name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = cache / f"{name}.tmp-{secrets.token_hex(4)}"
        tool = shutil.which("mmdebstrap") or shutil.which("debootstrap")
        if tool is None:
            raise RuntimeError("neither mmdebstrap nor debootstrap found (scripts/install.sh adds both)")
        argv = [tool, "--variant=minbase", "--include=" + ",".join(PACKAGES), release, str(tmp), MIRROR]
        started = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(
                f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
            )
        _customise(tmp)
        tmp.rename(final)
        if log is not None:
            print(f"built {final} with {Path(tool).name} in {time.monotonic() - started:.0f} s", file=log)
    _remove_stale(cache, "rootfs", name)
    return final


def _customise(root: Path) -> None:
    """Small changes to the fresh tree, made once before it is cached."""
    (root / "etc/hostname").write_text("tcpguard-test\n")
    # Each boot gets a fresh machine id (an empty file tells systemd to make a transient one).
    (root / "etc/machine-id").write_text("")
    # Nothing to log in to, and nothing may wait for a network that the container does not have.
    for unit in ("console-getty.service", "getty@.service", "systemd-networkd-wait-online.service"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()


def _requirements(repo: Path) -> list[str]:
    """What installing tcpguard[daemon] offline needs: its dependencies and its build requirements."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    reqs: list[str] = list(meta["project"]["dependencies"])
    reqs += meta["project"]["optional-dependencies"]["daemon"]
    reqs += meta["build-system"]["requires"]
    return sorted(set(reqs))


def ensure_wheelhouse(repo: Path, cache: Path = CACHE_DIR) -> Path:
    """Wheels of every package the install needs, built by the host's pip (network, compilers, headers
    are on the host). Keyed by the requirements and the Python minor version they are built for."""
    reqs = _requirements(repo)
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    name = "wheels-" + _key({"requirements": reqs, "python": py, "machine": platform.machine()})
    final = cache / name
    with _locked(cache / f"{name}.lock"):
        if (final / ".complete").exists():
            return final
        for leftover in cache.glob(f"{name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = cache / f"{name}.tmp-{secrets.token_hex(4)}"
        argv = [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(tmp), *reqs]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        (tmp / ".complete").write_text(json.dumps({"requirements": reqs, "python": py}) + "\n")
        tmp.rename(final)
    _remove_stale(cache, "wheels", name)
    return final


# ------------------------------------------------------------------------------------------ container
def _cgroup_roots() -> list[Path]:
    """The cgroup hierarchies nspawn uses: the unified one, plus name=systemd on a hybrid host."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    return [p for p in (base / "systemd", base / "unified") if (p / "cgroup.procs").exists()]


class Container:
    """One booted container; use as a context manager. See the module docstring for the design."""

    def __init__(
        self,
        rootfs: Path,
        binds: Sequence[tuple[Path, str]] = (),
        workdir: Path | None = None,
        boot_timeout: float = 90.0,
    ) -> None:
        self.rootfs = rootfs
        self.binds = list(binds)
        self.name = f"tg-{secrets.token_hex(4)}"
        self.boot_timeout = boot_timeout
        self.workdir = workdir or Path("/tmp")
        self.console_log = self.workdir / f"{self.name}-console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.cgroups: list[Path] = []

    # ---------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.cgroups = [root / f"tcpguard-test-{self.name}" for root in _cgroup_roots()]
        for cg in self.cgroups:
            cg.mkdir()
        argv = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.rootfs}",
            f"--machine={self.name}",
            "--volatile=overlay",
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            "--console=pipe",
            *[f"--bind-ro={host}:{guest}" for host, guest in self.binds],
            "--boot",
        ]
        # nspawn must start inside our cgroups (it creates its own next to itself): a shell moves itself
        # into them, then execs nspawn, so no process of this run ever sits in the shared root cgroup.
        enter = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
        procs = [str(cg / "cgroup.procs") for cg in self.cgroups]
        with open(self.console_log, "wb") as out:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", enter, "sh", *procs, "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.leader = self._find_leader()
        # `is-system-running --wait` answers "offline" until systemd listens on its private socket.
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            res = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise BootError(f"container {self.name} did not boot (state {state!r}): {self.console()}")

    def _find_leader(self) -> int:
        """The container's PID 1, as a pid of the host: nspawn's child that is pid 1 in its namespace."""
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootError(f"systemd-nspawn exited with {self.proc.returncode}: {self.console()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                for tok in children.read_text().split():
                    status = Path(f"/proc/{tok}/status").read_text()
                    nspid = next((ln.split()[1:] for ln in status.splitlines() if ln[:6] == "NSpid:"), [])
                    exe = os.readlink(f"/proc/{tok}/exe")
                    if nspid[-1:] == ["1"] and len(nspid) > 1 and exe.endswith("/systemd"):
                        return int(tok)
            time.sleep(0.05)
        raise BootError(f"no container init under systemd-nspawn after 30 s: {self.console()}")

    def console(self) -> str:
        """The container's console output so far (boot messages, nspawn's own errors)."""
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "console output:\n" + text[-6000:]

    def close(self) -> None:
        """Kill the container (its PID 1, which ends its PID namespace), reap nspawn, remove cgroups."""
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
            self.leader = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        for cg in self.cgroups:
            _remove_cgroup_tree(cg)
        self.cgroups = []
        # nspawn's per-machine directory for mount propagation; it cannot remove it itself here.
        with contextlib.suppress(OSError):
            shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}")
        with contextlib.suppress(OSError):
            self.console_log.unlink()

    # ---------------------------------------------------------------------------- inside
    def argv(self, argv: Sequence[str]) -> list[str]:
        assert self.leader is not None, "container not running"
        return [
            "nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
            "--root", "--wd",
            "env", "-i", f"PATH={CLEAN_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
            *argv,
        ]  # fmt: skip

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion inside; on failure (with check) the error says what ran and what it said."""
        try:
            res = subprocess.run(
                self.argv(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"in the container, {' '.join(argv)} did not finish in {timeout} s") from e
        if check and res.returncode != 0:
            raise AssertionError(
                f"in the container, {' '.join(argv)} exited {res.returncode}\n"
                f"stdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
            )
        return res

    def path(self, inside: str) -> Path:
        """A path inside the container as the host sees it (through the container's root)."""
        assert self.leader is not None
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chown(p, 0, 0)
        p.chmod(mode)

    def journal(self, *args: str) -> str:
        """journalctl inside, e.g. journal("-u", "tcpguard"); never raises (used in failure reports)."""
        try:
            res = self.run(["journalctl", "--no-pager", "-o", "short-monotonic", *args], check=False)
        except AssertionError as e:
            return f"(journalctl failed: {e})"
        return res.stdout + res.stderr

    def unit_state(self, unit: str, *props: str) -> dict[str, str]:
        res = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)])
        return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def _remove_cgroup_tree(top: Path, timeout: float = 10.0) -> None:
    """rmdir a cgroup and its children, bottom-up, waiting for exiting processes to leave them."""
    deadline = time.monotonic() + timeout
    while top.exists():
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        if not top.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.1)


def describe(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
