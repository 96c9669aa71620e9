"""The daemon's YAML configuration, read into typed dataclasses.

The schema is the dataclasses themselves: the loader walks their fields and type hints (scalars, `Literal`
choices, `X | None`, lists, nested sections), so a field added to `EngineSettings` or to a section below is
configurable, validated and listed by `schema_keys()` without a second table to keep in step. Bounds a
type cannot say are field metadata (`min`, `max`, `pattern`, `what`, `nonempty`, `unique`, read by
`_Rule`); a number without them must be positive, which is what every count, size and timeout needs.

The file is read with `yaml.compose`, not `yaml.safe_load`: the node tree keeps the line of every key and
value, so each error names the file, the dotted key and the line, and duplicate keys (which `safe_load`
silently resolves to the last one) can be refused. Every problem is collected in one pass and reported in
one `ConfigError`, so an operator fixes a broken file in one round trip rather than one error per restart.

Relative paths resolve against the directory of the config file, not the working directory: the daemon
runs from `/` under systemd but from a checkout in tests and demos, and the same file must mean the same
files in both.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import stat
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    TypeGuard,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from tcpguard.core.settings import EngineSettings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "AlertsConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ControlConfig",
    "DumpsConfig",
    "Hook",
    "IptablesConfig",
    "LogLevel",
    "LogTarget",
    "LoggingConfig",
    "MetricsConfig",
    "QueueConfig",
    "load_config",
    "parse_address",
    "parse_config",
    "schema_keys",
    "unsafe_permissions",
]

Hook = Literal["FORWARD", "INPUT", "OUTPUT"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogTarget = Literal["auto", "stderr", "journal"]

_MAX_QUEUE = 65535
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, NUL included

# iptables refuses user chain names longer than 28 characters or equal to a built-in chain or target; a
# leading '-' or '!' would be read as an option or a negation on the command line.
_CHAIN_NAME = {
    "pattern": r"(?!(?:INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING|ACCEPT|DROP|QUEUE|RETURN)$)"
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,27}",
    "what": "an iptables chain name (up to 28 letters, digits, '_', '.', '-'; "
    "not a built-in chain or target)",
}
# Linux caps interface names at 15 bytes and forbids '/', ':' and whitespace; iptables reads a trailing '+'
# as a wildcard and a leading '!' as a negation, so '!' is refused too.
_INTERFACE_NAME = {
    "pattern": r"(?!\.\.?$)[^\s/:!]{1,15}",
    "what": "an interface name (up to 15 characters, no '/', ':', '!' or spaces; 'eth+' matches eth*)",
}


@dataclass(slots=True)
class QueueConfig:
    """Where the daemon reads packets. One worker process per queue is how tcpguard uses several cores."""

    num: int = field(default=0, metadata={"min": 0, "max": _MAX_QUEUE})
    workers: int = 1
    maxlen: int = 4096
    copy_range: int = field(default=65535, metadata={"min": 1, "max": 65535})
    bypass: bool = True
    repeat: bool = True


@dataclass(slots=True)
class IptablesConfig:
    """The netfilter rules that send traffic to the queues, owned by the daemon when `manage` is set."""

    manage: bool = True
    chain: str = field(default="TCPGUARD", metadata=_CHAIN_NAME)
    hooks: list[Hook] = field(default_factory=lambda: ["FORWARD"], metadata={"unique": True})
    ipv6: bool = True
    in_interface: str | None = field(default=None, metadata=_INTERFACE_NAME)
    out_interface: str | None = field(default=None, metadata=_INTERFACE_NAME)
    ports: list[int] | None = field(
        default=None, metadata={"min": 1, "max": 65535, "nonempty": True, "unique": True}
    )
    # Zero would exclude every unmarked packet from the queue, so the mark must be set.
    mark: int = field(default=0x7467, metadata={"min": 1, "max": 0xFFFFFFFF})
    # The one bit of connection bypass (engine.inspection.bypass): tcpguard's chain saves it on a bypassed
    # connection's conntrack entry and lets such connections past the queue. 0: no bypass rules.
    bypass_mark: int = field(default=0x40000000, metadata={"min": 0, "max": 0xFFFFFFFF})


@dataclass(slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    target: LogTarget = "auto"
    log_payload: bool = False


@dataclass(slots=True)
class AlertsConfig:
    file: Path | None = None


@dataclass(slots=True)
class ControlConfig:
    socket: Path = Path("/run/tcpguard/control.sock")
    group: str | None = None


@dataclass(slots=True)
class MetricsConfig:
    """The Prometheus endpoint. Off unless an address is given: it tells whoever reaches it how much
    traffic the gateway carries and blocks, so the operator chooses where it listens."""

    address: str | None = None


@dataclass(slots=True)
class DumpsConfig:
    """Packet captures written by the daemon, each rotated by size so a busy gateway cannot fill its disk:
    at most `max_files` files of at most `max_file_size` bytes per dump and queue."""

    directory: Path = Path("/var/log/tcpguard/dumps")
    dropped: bool = False
    resets: bool = False
    input: bool = False
    # A file must hold the 24-byte pcap header and a record of a useful size.
    max_file_size: int = field(default=64 * 1024 * 1024, metadata={"min": 1024, "max": 2**40})
    max_files: int = field(default=8, metadata={"min": 1, "max": 100000})


@dataclass(slots=True)
class Config:
    """The whole file. Every path in it is absolute once loaded."""

    rules_dir: Path = Path("rules")
    # Seconds a whole rule set may take to load (check, start, reload, replay, cost): a module whose top
    # level runs longer fails to load (tcpguard.app.daemon.ruleload), and a running daemon keeps its rules.
    rules_load_budget: float = field(default=5.0, metadata={"min": 0.1, "max": 600})
    queue: QueueConfig = field(default_factory=QueueConfig)
    iptables: IptablesConfig = field(default_factory=IptablesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dumps: DumpsConfig = field(default_factory=DumpsConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem, located so an editor can jump to it (`file:line:` is what editors and CI parse)."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(ValueError):
    """The configuration cannot be used. `issues` holds every problem found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(sorted(issues, key=lambda issue: issue.line or 0))
        super().__init__("\n".join(str(issue) for issue in self.issues))


def load_config(path: str | Path) -> Config:
    """Read and parse `path`; an unreadable file is a `ConfigError` too, so callers handle one failure.

    A file that other users could have written is refused before it is read (`unsafe_permissions`)."""
    file = Path(path)
    try:
        problem = unsafe_permissions(file)
        text = "" if problem is not None else file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read: {exc}")]) from exc
    if problem is not None:
        raise ConfigError([ConfigIssue(str(path), None, "", problem)])
    return parse_config(text, str(path))


def unsafe_permissions(path: Path) -> str | None:
    """Why the config file at `path` must not be trusted, or None.

    The config names the rules directory, whose modules run with the daemon's privileges (root), so
    whoever can change the file can run code as root: the same rule as for rule files
    (`tcpguard.app.daemon.ruleload`). Refused: a file writable by other users; a file in a directory that
    other users can write without the sticky bit (they could replace the file); and a file owned by anyone but
    root or the user tcpguard runs as, whatever its mode (an owner can always chmod it writable again).
    Group write is the operator's choice and is allowed.
    """
    st = path.stat()
    if st.st_mode & stat.S_IWOTH:
        return "writable by other users: refusing to load it (chmod o-w)"
    if st.st_uid not in (0, os.geteuid()):
        return (
            f"owned by uid {st.st_uid}, neither root nor the user tcpguard runs as, who could change it: "
            "refusing to load it (chown root)"
        )
    parent = path.absolute().parent
    pst = parent.stat()
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        return f"its directory {parent} is writable by other users, who could replace it: refusing to load it"
    return None


def parse_config(text: str, path: str) -> Config:
    """Parse `text` as if read from `path`, which names the file in errors and anchors relative paths."""
    parser = _Parser(path, Path(path).absolute().parent)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError([ConfigIssue(path, line, "", f"invalid YAML: {problem}")]) from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError([ConfigIssue(path, line, "", f"invalid YAML: {exc.reason}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(path, None, "", f"invalid YAML: {exc}")]) from exc
    except RecursionError as exc:
        raise ConfigError([ConfigIssue(path, None, "", "invalid YAML: nested too deeply")]) from exc
    try:
        config = parser.section(root, Config, "")
    except RecursionError as exc:
        raise ConfigError([ConfigIssue(path, None, "", "nested too deeply")]) from exc
    if not parser.issues and config.engine.limits.max_held_packets > config.queue.maxlen // 2:
        # Held packets stay in the kernel queue: if they could fill it, everything behind them would be
        # dropped, or with bypass passed uninspected. Reported without a line: it involves two keys.
        parser.issues.append(
            ConfigIssue(
                path,
                None,
                "engine.limits.max_held_packets",
                f"{config.engine.limits.max_held_packets} is more than half of queue.maxlen "
                f"({config.queue.maxlen}); held packets could fill the kernel queue",
            )
        )
    if parser.issues:
        raise ConfigError(parser.issues)
    return config


def config_warnings(config: Config) -> list[str]:
    """What is valid but will not do what the operator wants, each with the fix. `tcpguard check` prints
    these and `tcpguard run` logs them; neither refuses the file, since each can be what an expert means
    (and the kernel rules they depend on are not in this file)."""
    out = []
    ipt = config.iptables
    if config.queue.repeat and not ipt.manage:
        out.append(
            f"queue.repeat: true with iptables.manage: false: tcpguard re-queues every packet it accepts "
            f"marked {ipt.mark:#x} (iptables.mark), so the NFQUEUE rule you installed must not match that "
            f"mark: add `-m mark ! --mark {ipt.mark:#x}` to it, or a "
            f"`-m mark --mark {ipt.mark:#x} -j RETURN` rule before it. Otherwise every accepted packet comes "
            "back to the queue (tcpguard then lets it through without a second look, skipping the rules "
            "after yours, and logs it once)"
        )
    if config.engine.inspection.bypass:
        out += _bypass_warnings(config)
    hooks = set(ipt.hooks)
    if ipt.manage and ("INPUT" in hooks) != ("OUTPUT" in hooks):
        have, missing = ("INPUT", "OUTPUT") if "INPUT" in hooks else ("OUTPUT", "INPUT")
        out.append(
            f"iptables.hooks: {have} without {missing}: tcpguard would see only one direction of this "
            f"host's own connections, so none of them gets past the handshake in its tracker and their data "
            f"is dropped; hook both INPUT and OUTPUT (FORWARD alone covers traffic routed through the host)"
        )
    return out


def kernel_bypass_mark(config: Config) -> int:
    """The bypass bit tcpguard's chain and adapter use: `iptables.bypass_mark` with
    `engine.inspection.bypass` on, 0 (no bypass rules) with it off.

    Why not always install them: the connmark match makes the kernel track connections (nf_conntrack) in
    the namespace, which it may not do otherwise. Conntrack then reassembles IP fragments before the
    queue, costs every forwarded packet a lookup, and its table (nf_conntrack_max) can fill and drop new
    connections: a gateway that never asked for bypass must not get that. The price: after a restart with
    bypass turned off, connections an earlier run bypassed are queued again and picked up mid-stream
    (engine.policies.midstream), which is what turning bypass off asks for."""
    return config.iptables.bypass_mark if config.engine.inspection.bypass else 0


def bypass_chain_rules(config: Config) -> list[str]:
    """The rules connection bypass needs in the chain that feeds the queues, as `iptables` command lines
    for an operator who writes that chain (`iptables.manage: false`): the same two rules tcpguard's own
    chain holds (`tcpguard.io.iptables`), placed before the NFQUEUE rule. Empty without a bypass bit."""
    ipt = config.iptables
    b = ipt.bypass_mark
    if not b:
        return []
    bits = f"{b:#x}/{b:#x}"
    target = "RETURN" if config.queue.repeat else "ACCEPT"
    return [
        f"-A <your chain> -m mark --mark {bits} -j CONNMARK --set-xmark {bits}",
        f"-A <your chain> -m connmark --mark {bits} -j {target}",
    ]


def bypass_leak_hint(config: Config) -> str:
    """The missing kernel side named in the log when packets of a bypassed connection keep reaching the
    daemon (the core's BypassLeak event, logged by `tcpguard.app.eventlog`)."""
    rules = bypass_chain_rules(config)
    if not rules:
        return "iptables.bypass_mark is 0, so no bypass rule is installed; set it to a bit (0x40000000)"
    ipt = config.iptables
    if ipt.manage:
        chain = ipt.chain
        rules = [r.replace("<your chain>", chain) for r in rules]
        where = f"tcpguard's chain {chain} (`tcpguard iptables show`; reinstalled at start)"
    else:
        where = "the chain that feeds the queue, before its NFQUEUE rule (iptables.manage is false)"
    return f"{where} needs `{rules[0]}` then `{rules[1]}`"


def _bypass_warnings(config: Config) -> list[str]:
    """engine.inspection.bypass without the kernel side it relies on: with no bypass bit, or with rules
    the operator writes, the kernel keeps queueing every packet of a bypassed connection (each costs a
    trip through the daemon, accepted uninspected, and the daemon logs a BypassLeak warning)."""
    ipt = config.iptables
    if not ipt.bypass_mark:
        return [
            "engine.inspection.bypass: true with iptables.bypass_mark: 0: no rule tells the kernel to stop "
            "queueing a bypassed connection, so each of its packets still crosses the daemon, accepted "
            "without inspection (the daemon logs it as a bypass leak); set iptables.bypass_mark to a bit "
            "(default 0x40000000) or turn bypass off"
        ]
    if ipt.manage:
        return []
    rules = "; ".join(f"`{r}`" for r in bypass_chain_rules(config))
    return [
        f"engine.inspection.bypass: true with iptables.manage: false: the chain that feeds the queue needs "
        f"these two rules, in this order, before its NFQUEUE rule (for ip6tables too): {rules}. The first "
        f"saves the bypass bit {ipt.bypass_mark:#x} (iptables.bypass_mark) of the packet tcpguard answers "
        "with a bypass verdict on its connection; the second lets that connection's later packets past the "
        "queue. Without them every packet of a bypassed connection still crosses the daemon, accepted "
        "without inspection, and the daemon logs a bypass leak naming the missing rule"
    ]


def schema_keys() -> list[str]:
    """Every dotted key the file may hold, sections included, so documentation can be checked against it."""
    keys: list[str] = []

    def walk(cls: type[Any], prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = _join(prefix, f.name)
            keys.append(key)
            if _is_section(hints[f.name]):
                walk(hints[f.name], key)

    walk(Config, "")
    return keys


# --- cross-field checks: what one field alone cannot tell ----------------------------------------------


def _check_queue(queue: QueueConfig) -> Iterator[tuple[str, str]]:
    last = queue.num + queue.workers - 1
    if last > _MAX_QUEUE:
        yield "workers", f"queues {queue.num} to {last} go past {_MAX_QUEUE}, the highest NFQUEUE number"


def _check_iptables(iptables: IptablesConfig) -> Iterator[tuple[str, str]]:
    # The kernel would accept these rules and they would silently never match: locally generated packets
    # have no input interface, locally delivered ones no output interface.
    if iptables.in_interface is not None and "OUTPUT" in iptables.hooks:
        yield "in_interface", "OUTPUT packets have no input interface; drop OUTPUT from hooks or this key"
    if iptables.out_interface is not None and "INPUT" in iptables.hooks:
        yield "out_interface", "INPUT packets have no output interface; drop INPUT from hooks or this key"
    b = iptables.bypass_mark
    if b & (b - 1):
        yield "bypass_mark", f"{b:#x} is not a single bit (e.g. 0x40000000), or 0 for no bypass rules"
    elif b & iptables.mark:
        # A forged RST carries `mark`: with a shared bit, the CONNMARK rule would bypass its connection.
        yield "bypass_mark", f"{b:#x} is a bit of iptables.mark ({iptables.mark:#x}); choose a bit it lacks"


def _check_control(control: ControlConfig) -> Iterator[tuple[str, str]]:
    # bind() fails on a longer Unix socket path, and only at start; say so while the file is checked.
    if len(bytes(control.socket)) > _MAX_SOCKET_PATH:
        yield "socket", f"longer than {_MAX_SOCKET_PATH} bytes, too long for a Unix socket path"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets, `[::]:9464`) into (host, port). Raises ValueError.

    One string rather than two keys, because that is how operators write listen addresses everywhere
    else (Prometheus targets, systemd sockets), and the brackets keep IPv6 unambiguous.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError("expected HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9464 or [::1]:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError("brackets are for IPv6 addresses only")
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:9464")
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError("expected HOST:PORT with a host name or address, e.g. 127.0.0.1:9464")
    return host, int(port_text)


def _check_metrics(metrics: MetricsConfig) -> Iterator[tuple[str, str]]:
    if metrics.address is not None:
        try:
            parse_address(metrics.address)
        except ValueError as exc:
            yield "address", str(exc)


_CROSS_CHECKS: dict[type[Any], Callable[[Any], Iterator[tuple[str, str]]]] = {
    QueueConfig: _check_queue,
    IptablesConfig: _check_iptables,
    ControlConfig: _check_control,
    MetricsConfig: _check_metrics,
}


# --- the schema walker ---------------------------------------------------------------------------------

_T = TypeVar("_T", bound="DataclassInstance")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"


@dataclass(frozen=True, slots=True)
class _Rule:
    """Bounds on a field beyond its type, from the field's metadata (so the core can declare them too).

    `min`/`max` bound numbers (list items included), `pattern` (full match) and `what` constrain and
    describe strings, `nonempty`/`unique` constrain lists.
    """

    min: int | float | None = None
    max: int | float | None = None
    pattern: str | None = None
    what: str | None = None
    nonempty: bool = False
    unique: bool = False

    @property
    def int_min(self) -> int | float:
        """Counts and sizes are positive unless a field says otherwise."""
        return 1 if self.min is None else self.min


class _MismatchError(Exception):
    """A value does not fit its type; the caller words the message from the whole expected type."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)
        self.message = message


class _Invalid:
    """Marks a value already reported as an error, so the section falls back to the default and goes on."""


_INVALID = _Invalid()


class _Parser:
    def __init__(self, path: str, base: Path) -> None:
        self.path = path
        self.base = base
        self.issues: list[ConfigIssue] = []
        self._loader = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.issues.append(ConfigIssue(self.path, line, key, message))

    def section(self, node: yaml.Node | None, cls: type[_T], key: str) -> _T:
        """Build `cls` from a mapping node; absent keys, and a missing or empty section, take defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        given: dict[str, yaml.Node] = {}
        first_line: dict[str, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR):
                    self.error(key_node, key, f"expected a key name, got {_shown(key_node)}")
                    continue
                name = key_node.value
                sub = _join(key, name)
                if name in first_line:
                    self.error(key_node, sub, f"duplicate key (first given on line {first_line[name]})")
                    continue
                first_line[name] = key_node.start_mark.line + 1
                if name not in fields:
                    self.error(key_node, sub, _unknown_key(name, list(fields)))
                    continue
                given[name] = value_node
        elif node is not None and not _is_null(node):
            self.error(node, key, f"expected a mapping, got {_shown(node)}")

        values: dict[str, object] = {}
        valid = True
        for name, f in fields.items():
            hint = hints[name]
            sub = _join(key, name)
            if name in given:
                value = self.value(given[name], hint, _Rule(**f.metadata), sub)
                if isinstance(value, _Invalid):
                    valid = False
                else:
                    values[name] = value
            elif _is_section(hint):
                values[name] = self.section(None, hint, sub)
            elif isinstance(f.default, Path):
                values[name] = self.base / f.default
        result = cls(**values)
        check = _CROSS_CHECKS.get(cls)
        if valid and check is not None:
            for name, message in check(result):
                self.error(given.get(name, node), _join(key, name), message)
        return result

    def value(self, node: yaml.Node, hint: Any, rule: _Rule, key: str) -> object:
        try:
            return self._convert(node, hint, rule, key)
        except _MismatchError as exc:
            self.error(node, key, exc.message or f"expected {_describe(hint, rule)}, got {_shown(node)}")
            return _INVALID

    def _convert(self, node: yaml.Node, hint: Any, rule: _Rule, key: str) -> object:
        origin = get_origin(hint)
        if origin in (Union, types.UnionType):
            if _is_null(node):
                return None
            (inner,) = (arg for arg in get_args(hint) if arg is not type(None))
            return self._convert(node, inner, rule, key)
        if _is_section(hint):
            if not (isinstance(node, yaml.MappingNode) or _is_null(node)):
                raise _MismatchError
            return self.section(node, hint, key)
        if origin is list:
            return self._list(node, get_args(hint)[0], rule, key)
        if origin is Literal:
            choices = get_args(hint)
            if isinstance(node, yaml.ScalarNode) and all(isinstance(choice, str) for choice in choices):
                if node.tag == _STR and node.value in choices:
                    return node.value
                raise _MismatchError
            value = self._scalar(node)
            if any(type(value) is type(choice) and value == choice for choice in choices):
                return value
            raise _MismatchError
        if hint is bool:
            if _tag(node) != _BOOL:
                raise _MismatchError
            return self._scalar(node)
        if hint is int:
            if _tag(node) != _INT:
                raise _MismatchError
            number = self._scalar(node)
            assert isinstance(number, int)
            if number < rule.int_min or (rule.max is not None and number > rule.max):
                raise _MismatchError
            return number
        if hint is float:
            if _tag(node) not in (_INT, _FLOAT):
                raise _MismatchError
            number = self._scalar(node)
            assert isinstance(number, int | float)
            try:
                real = float(number)
            except OverflowError:
                raise _MismatchError from None
            too_low = real <= 0 if rule.min is None else real < rule.min
            if not math.isfinite(real) or too_low or (rule.max is not None and real > rule.max):
                raise _MismatchError
            return real
        if hint is str or hint is Path:
            if _tag(node) != _STR or not node.value:
                raise _MismatchError
            text: str = node.value
            if rule.pattern is not None and not re.fullmatch(rule.pattern, text):
                raise _MismatchError
            return self.base / text if hint is Path else text
        raise TypeError(f"config schema: {key} has a type the loader does not handle: {hint!r}")

    def _list(self, node: yaml.Node, item_hint: Any, rule: _Rule, key: str) -> object:
        if not isinstance(node, yaml.SequenceNode):
            raise _MismatchError
        if rule.nonempty and not node.value:
            raise _MismatchError("must not be empty (leave it out or set it to null for the default)")
        items: list[object] = []
        seen: dict[object, int] = {}
        valid = True
        for index, item_node in enumerate(node.value):
            item_key = f"{key}[{index}]"
            item = self.value(item_node, item_hint, rule, item_key)
            if isinstance(item, _Invalid):
                valid = False
                continue
            if rule.unique and item in seen:
                self.error(item_node, item_key, f"duplicate of {key}[{seen[item]}]")
                valid = False
                continue
            seen[item] = index
            items.append(item)
        return items if valid else _INVALID

    def _scalar(self, node: yaml.Node) -> object:
        if not isinstance(node, yaml.ScalarNode):
            raise _MismatchError
        try:
            return self._loader.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:
            raise _MismatchError(f"cannot read {_shown(node)}: {exc}") from exc


def _is_section(hint: object) -> TypeGuard[type[Any]]:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _tag(node: yaml.Node) -> str | None:
    return node.tag if isinstance(node, yaml.ScalarNode) else None


def _is_null(node: yaml.Node) -> bool:
    return _tag(node) == _NULL


def _shown(node: yaml.Node) -> str:
    """The offending value as the operator wrote it: quoted when YAML read it as a string."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _STR:
        return repr(node.value)
    if node.tag == _NULL:
        return "null"
    return str(node.value)


def _unknown_key(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return f"unknown key (known keys: {', '.join(known)})"


def _describe(hint: Any, rule: _Rule) -> str:
    """What a field accepts, in the words of an error message ("expected <this>, got ...")."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner,) = (arg for arg in get_args(hint) if arg is not type(None))
        return f"{_describe(inner, rule)}, or null"
    if _is_section(hint):
        return "a mapping"
    if origin is list:
        item = _describe(get_args(hint)[0], rule)
        return f"a {'non-empty ' if rule.nonempty else ''}list, each item {item}"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(hint))
    if hint is bool:
        return "true or false"
    if hint is int:
        if rule.max is not None:
            return f"an integer from {rule.int_min} to {rule.max}"
        return {0: "a non-negative integer", 1: "a positive integer"}.get(
            int(rule.int_min), f"an integer >= {rule.int_min}"
        )
    if hint is float:
        return "a positive number" if rule.min is None else f"a number >= {rule.min}"
    if hint is Path:
        return "a path"
    return rule.what or "a non-empty string"
