"""Loading rule modules from a directory, all or nothing, and bounded in time.

Every `*.py` file in the directory (not starting with `_`) is compiled and executed as its own module, in
file-name order, while `tcpguard.core.rules.collecting()` gathers the rules it registers; every `*.lua`
file is a Haka rule file, run in its own sandboxed Lua state by `tcpguard.lua`. Any failure
raises `RuleLoadError` naming the file and line, and nothing is returned, so a caller that already runs a
rule set keeps it: a reload swaps in a complete new set or none.

The files run with the daemon's privileges, so a file or directory that other users can write is
refused: whoever can edit a rule can run code as root.

Bounded in time. A module's top level is arbitrary code: `while True: pass`, a blocking read, a DNS lookup
that never answers. Run inside the daemon it would stop the packet loop, the control socket and SIGTERM
handling with it. So every load the application does (`check`, start, reload, `replay`, `cost`) goes
through `load_rules_bounded`, in two steps:

1. A trial in a child interpreter (`RuleTrial`). The child imports the modules exactly as below, under an
   interval timer that interrupts a module still running after the budget (so the error names its file and
   line), and the parent kills it outright when even that fails (a module stuck in C code that ignores
   signals). Why a separate interpreter and not a thread or a fork: a thread cannot be stopped, and a fork
   of the daemon copies a process with running threads (control, metrics, budget watchdog) whose locks the
   child may inherit taken. A fresh interpreter shares nothing and can always be killed by its pid. It costs
   the interpreter's start (about 0.1-0.3 s) on each load, which is rare.
2. Only a set that loaded in the trial is imported in the running process, under the same timer (main
   thread only: Python delivers signals there), for the module that behaves differently the second time.
   Its top-level code therefore runs twice; a module with side effects at import must tolerate that.

`RuleTrial` can also be started and polled without waiting, which is how the daemon's packet loop reloads
on SIGHUP while it goes on forwarding (see `tcpguard.app.daemon.worker.Worker`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import EventName, Rule, RuleSet, collecting

MODULE_PREFIX = "tcpguard_rules"

# Seconds a whole rule set may take to load (config key `rules_load_budget`).
DEFAULT_LOAD_BUDGET = 5.0
# What the trial child may take beyond the budget to start its interpreter and report: past budget plus
# this, it is killed without a word from it.
TRIAL_GRACE = 5.0
# Bytes of report the parent reads from a trial child: the rule list of a large set is far below it.
MAX_REPORT = 4 * 1024 * 1024

# The arguments each event's listeners are called with (`tcpguard.core.engine`).
EVENT_ARGS: dict[EventName, tuple[str, ...]] = {
    EventName.NEW_CONNECTION: ("flow", "tcp"),
    EventName.RECEIVE_DATA: ("flow", "stream", "current", "direction"),
    EventName.END_CONNECTION: ("flow",),
}


class LoadTimeout(BaseException):
    """Raised inside a module's top level that ran past the load budget. A BaseException, so that the
    module's own `except Exception:` does not swallow it."""


def rule_files(directory: Path) -> list[Path]:
    """The rule files of `directory`, in name order: Python modules and Haka rule files in Lua
    (`tcpguard.lua`). Names starting with `_` are left out: a Lua helper `_name.lua` is read only by
    the `require('_name')` of a rule file."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in (".py", ".lua") and not p.name.startswith("_") and p.is_file()
    )


def _check_permissions(path: Path) -> None:
    st = path.stat()
    if st.st_mode & stat.S_IWOTH:
        raise RuleLoadError(str(path), None, "writable by other users: refusing to load it (chmod o-w)")
    if os.geteuid() == 0 and st.st_uid != 0:
        # Its owner may chmod it writable at any time, so read-only is no protection: whoever owns a rule
        # file can run code as root.
        raise RuleLoadError(
            str(path),
            None,
            f"owned by uid {st.st_uid} while tcpguard runs as root: refusing to load it (chown root)",
        )


def _error_line(exc: BaseException, path: Path) -> int | None:
    """The line in `path` where `exc` happened (innermost frame in that file)."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(path):
            line = frame.lineno
    return line


def _check_signature(r: Rule, path: Path) -> None:
    """A listener that cannot take its event's arguments would fail on every call (`TypeError` at run
    time, once per packet): refuse it at load, where the operator sees it once, with the line."""
    want = EVENT_ARGS[r.event]
    try:
        sig = inspect.signature(r.func)
    except (TypeError, ValueError):
        return  # a builtin or C callable without a signature: nothing to check
    try:
        sig.bind(*want)
    except TypeError as e:
        code = getattr(r.func, "__code__", None)
        line = code.co_firstlineno if code is not None and code.co_filename == str(path) else None
        raise RuleLoadError(
            str(path),
            line,
            f"listener {r.name}{sig} cannot be called as {r.event}({', '.join(want)}): {e}",
        ) from None


def load_module(path: Path, budget: float | None = None, left: float | None = None) -> list[Rule]:
    """Execute one rule module and return the rules it registered. With `budget` (seconds, main thread
    only), a top level still running after `left` seconds (default: the budget, the rest of it when
    several modules share one) is interrupted and reported as not loaded within the budget."""
    _check_permissions(path)
    if path.suffix == ".lua":
        # A Lua file's top level runs under its own instruction budget (tcpguard.lua.LOAD_BUDGET),
        # which also stops a loop that never calls back into Python, where no signal would be seen.
        from tcpguard.lua import load_lua_file

        with _deadline(left if left is not None else budget):
            return load_lua_file(path, _check_permissions)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleLoadError(str(path), None, f"cannot read: {e}") from e
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise RuleLoadError(str(path), e.lineno, f"syntax error: {e.msg}") from e
    name = f"{MODULE_PREFIX}.{path.stem}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    with collecting() as found:
        # Registered in sys.modules while it runs so that dataclasses, pickling and tracebacks that look
        # the module up work; removed afterwards so a reload really reloads.
        sys.modules[name] = module
        try:
            with _deadline(left if left is not None else budget):
                exec(code, module.__dict__)
        except LoadTimeout as e:
            raise RuleLoadError(
                str(path), _error_line(e, path), f"did not finish loading within {budget:g} s"
            ) from e
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            # SystemExit/KeyboardInterrupt raised by a module (sys.exit() at import) must not stop a
            # running daemon on reload: they are load errors like any other.
            raise RuleLoadError(str(path), _error_line(e, path), f"{type(e).__name__}: {e}") from e
        finally:
            sys.modules.pop(name, None)
    for r in found:
        _check_signature(r, path)
    return list(found)


@contextlib.contextmanager
def _deadline(budget: float | None) -> Iterator[None]:
    """Raise `LoadTimeout` in the block once `budget` seconds have passed, and again every tenth of a
    second after that (a module that catches it once is interrupted again). A no-op off the main thread,
    where Python delivers no signals; there the trial child is the only bound."""
    if not budget or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise LoadTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, budget, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_rules(
    directory: str | Path, budget: float | None = None, announce: Callable[[Path], None] | None = None
) -> RuleSet:
    """All rules of all modules in `directory`, or `RuleLoadError` and nothing. Runs the modules in this
    process; `budget` bounds the whole load only where signals can interrupt it (the main thread), which
    is why the application calls `load_rules_bounded` instead. `announce` hears each file before it runs."""
    d = Path(directory)
    if not d.is_dir():
        raise RuleLoadError(str(d), None, "rules directory does not exist")
    _check_permissions(d)
    rules: list[Rule] = []
    seen: dict[str, Path] = {}
    deadline = None if not budget else time.monotonic() + budget
    for path in rule_files(d):
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        if announce is not None:
            announce(path)
        for r in load_module(path, budget, left):
            if r.name in seen:
                raise RuleLoadError(str(path), None, f"rule name {r.name!r} already used in {seen[r.name]}")
            seen[r.name] = path
            rules.append(r)
    return RuleSet(rules)


# ------------------------------------------------------------------------------------ the trial child


@dataclass(frozen=True, slots=True)
class TrialResult:
    """What a trial load found: `error` is None when the set loaded, with `rules` rules."""

    error: RuleLoadError | None
    rules: int = 0
    seconds: float = 0.0


class RuleTrial:
    """A trial load of `directory` in a child interpreter, bounded by `budget` seconds of loading.

    `poll()` never blocks, for the packet loop; `wait()` blocks until the result, for everyone else. The
    child is always reaped, and killed by its pid when it outlives the budget or the caller gives up.
    """

    def __init__(self, directory: str | Path, budget: float) -> None:
        self.directory = Path(directory)
        self.budget = budget
        self.started = time.monotonic()
        self.result: TrialResult | None = None
        self._report = bytearray()
        r, w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tcpguard.app.daemon.ruleload",
                    str(w),
                    str(self.directory),
                    repr(budget),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(w,),
                close_fds=True,
            )
        except OSError as e:
            os.close(r)
            error = RuleLoadError(str(self.directory), None, f"cannot start the trial load: {e}")
            self.result = TrialResult(error)
            return
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self._fd: int | None = r

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> TrialResult | None:
        """The result once the child is done (or was killed for running too long), else None."""
        if self.result is not None:
            return self.result
        self._read()
        code = self._proc.poll()
        if code is None:
            if time.monotonic() - self.started < self.budget + TRIAL_GRACE:
                return None
            self._kill()
            self._read()
            self.result = self._killed()
        else:
            self._read()
            self.result = self._parse(code)
        self._close()
        return self.result

    def wait(self, give_up: Callable[[], bool] | None = None) -> TrialResult:
        """Block until the result; `give_up` returning true cancels the trial (a stop was asked)."""
        while True:
            result = self.poll()
            if result is not None:
                return result
            if give_up is not None and give_up():
                self.cancel()
                assert self.result is not None
                return self.result
            time.sleep(0.01)

    def cancel(self) -> None:
        """Stop the child (the caller no longer wants the result)."""
        if self.result is None:
            self._kill()
            self.result = TrialResult(RuleLoadError(str(self.directory), None, "trial load cancelled"))
            self._close()

    def _read(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while len(self._report) < MAX_REPORT:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    break
                self._report += chunk

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _messages(self) -> list[dict[str, Any]]:
        out = []
        for line in bytes(self._report).splitlines():
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict):
                    out.append(msg)
        return out

    def _killed(self) -> TrialResult:
        loading = [m["loading"] for m in self._messages() if "loading" in m]
        where = loading[-1] if loading else str(self.directory)
        return TrialResult(
            RuleLoadError(
                where, None, f"did not finish loading within {self.budget:g} s (stopped by the parent)"
            ),
            seconds=time.monotonic() - self.started,
        )

    def _parse(self, code: int) -> TrialResult:
        seconds = time.monotonic() - self.started
        for m in reversed(self._messages()):
            if "error" in m:
                err = m["error"]
                error = RuleLoadError(str(err["path"]), err["line"], str(err["message"]))
                return TrialResult(error, 0, seconds)
            if "ok" in m:
                return TrialResult(None, int(m["ok"]), seconds)
        loading = [m["loading"] for m in self._messages() if "loading" in m]
        where = loading[-1] if loading else str(self.directory)
        return TrialResult(
            RuleLoadError(where, None, f"the trial load ended without a result (exit status {code})"),
            seconds=seconds,
        )


def load_rules_bounded(directory: str | Path, budget: float = DEFAULT_LOAD_BUDGET) -> RuleSet:
    """Load `directory` the safe way: a trial in a child interpreter first, bounded by `budget` seconds,
    then the real load here under the same budget. Raises `RuleLoadError` (a module that did not finish
    in time is `file:line: did not finish loading within N s`)."""
    result = RuleTrial(directory, budget).wait()
    if result.error is not None:
        raise result.error
    return load_rules(directory, budget)


def _trial_main(argv: list[str]) -> int:
    """The child's side: load, report progress and the result as JSON lines on the given descriptor."""
    fd, directory, budget = int(argv[0]), Path(argv[1]), float(argv[2])
    out = os.fdopen(fd, "w", buffering=1)
    # The modules' own output must not mix with the report, and nothing should wait on a terminal.
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115

    def announce(path: Path) -> None:
        out.write(json.dumps({"loading": str(path)}) + "\n")

    try:
        rs = load_rules(directory, budget, announce)
    except RuleLoadError as e:
        out.write(json.dumps({"error": {"path": e.path, "line": e.line, "message": e.message}}) + "\n")
        return 1
    out.write(json.dumps({"ok": len(rs)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))
