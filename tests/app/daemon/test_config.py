"""The config loader: defaults, every error kind located by file, key and line, and the shipped file."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from tcpguard.app.daemon.config import (
    Config,
    ConfigError,
    ConfigIssue,
    IptablesConfig,
    QueueConfig,
    load_config,
    parse_config,
    schema_keys,
)
from tcpguard.core.settings import EngineSettings, Limits, Policies, Timeouts

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "etc" / "tcpguard.yaml"
CONF = "/etc/tcpguard/tcpguard.yaml"


def parse(text: str, path: str = CONF) -> Config:
    return parse_config(textwrap.dedent(text), path)


def issues(text: str, path: str = CONF) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse(text, path)
    return list(info.value.issues)


def only_issue(text: str) -> ConfigIssue:
    (issue,) = issues(text)
    return issue


# --- defaults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_means_defaults(text: str) -> None:
    config = parse(text)
    assert config == Config(rules_dir=Path("/etc/tcpguard/rules"))
    assert config.engine == EngineSettings()


def test_defaults() -> None:
    config = parse("")
    assert config.queue == QueueConfig(num=0, workers=1, maxlen=4096, copy_range=65535, bypass=True)
    assert config.iptables == IptablesConfig(
        manage=True,
        chain="TCPGUARD",
        hooks=["FORWARD"],
        ipv6=True,
        in_interface=None,
        out_interface=None,
        ports=None,
        mark=0x7467,
    )
    assert (config.logging.level, config.logging.target, config.logging.log_payload) == (
        "info",
        "auto",
        False,
    )
    assert config.alerts.file is None
    assert config.control.socket == Path("/run/tcpguard/control.sock")
    assert config.control.group is None


def test_missing_or_empty_section_means_defaults_and_other_keys_stay_default() -> None:
    config = parse(
        """
        queue:
        engine:
          limits:
            max_connections: 10
        """
    )
    assert config.queue == QueueConfig()
    assert config.engine == EngineSettings(limits=Limits(max_connections=10))


def test_default_lists_are_not_shared() -> None:
    first, second = parse(""), parse("")
    first.iptables.hooks.append("INPUT")
    assert second.iptables.hooks == ["FORWARD"]


# --- values -------------------------------------------------------------------------------------------


def test_every_kind_of_value() -> None:
    config = parse(
        """
        rules_dir: /srv/rules
        queue: {num: 4, workers: 3, maxlen: 100, copy_range: 1500, bypass: false, repeat: false}
        iptables:
          manage: false
          chain: GUARD_1
          hooks: [OUTPUT, FORWARD]
          ipv6: no
          out_interface: eth+
          ports: [80, 443]
          mark: 0xffffffff
          bypass_mark: 0
        logging: {level: debug, target: journal, log_payload: true}
        alerts: {file: alerts.jsonl}
        control: {socket: ctl.sock, group: tcpguard}
        engine:
          timeouts: {established: 600, closed: 2.5}
          limits: {max_held_packets: 50}
          policies: {rule_error: drop, midstream: accept, verify_checksums: false}
        """
    )
    assert config.rules_dir == Path("/srv/rules")
    assert config.queue == QueueConfig(
        num=4, workers=3, maxlen=100, copy_range=1500, bypass=False, repeat=False
    )
    assert config.iptables == IptablesConfig(
        manage=False,
        chain="GUARD_1",
        hooks=["OUTPUT", "FORWARD"],
        ipv6=False,
        out_interface="eth+",
        ports=[80, 443],
        mark=0xFFFFFFFF,
        bypass_mark=0,
    )
    assert config.logging.level == "debug"
    assert config.logging.target == "journal"
    assert config.logging.log_payload is True
    assert config.alerts.file == Path("/etc/tcpguard/alerts.jsonl")
    assert config.control.socket == Path("/etc/tcpguard/ctl.sock")
    assert config.control.group == "tcpguard"
    assert config.engine.timeouts == Timeouts(established=600.0, closed=2.5)
    assert isinstance(config.engine.timeouts.established, float)
    assert config.engine.policies == Policies(rule_error="drop", midstream="accept", verify_checksums=False)


def test_relative_rules_dir_resolves_against_the_config_directory() -> None:
    assert parse("rules_dir: my-rules\n", "/opt/gw/conf/tcpguard.yaml").rules_dir == Path(
        "/opt/gw/conf/my-rules"
    )
    assert parse("rules_dir: ../rules\n", "/opt/gw/conf/tcpguard.yaml").rules_dir == Path(
        "/opt/gw/conf/../rules"
    )
    assert parse("rules_dir: /abs/rules\n", "/opt/gw/conf/tcpguard.yaml").rules_dir == Path("/abs/rules")
    assert parse("", "/opt/gw/conf/tcpguard.yaml").rules_dir == Path("/opt/gw/conf/rules")


def test_relative_config_path_still_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse("rules_dir: r\nalerts: {file: a.jsonl}\n", "conf/tcpguard.yaml")
    assert config.rules_dir == tmp_path / "conf" / "r"
    assert config.alerts.file == tmp_path / "conf" / "a.jsonl"


def test_empty_hooks_install_the_chain_without_jumps() -> None:
    assert parse("iptables: {hooks: []}\n").iptables.hooks == []


@pytest.mark.parametrize(
    ("key", "section", "value", "choices"),
    [
        ("rule_error", "engine.policies", "pass", "'accept', 'drop', 'reset'"),
        ("midstream", "engine.policies", "reset", "'track', 'accept', 'drop'"),
        ("table_full", "engine.policies", "drop", "'evict', 'refuse'"),
        ("malformed", "engine.policies", "reset", "'drop', 'accept'"),
        ("level", "logging", "critical", "'debug', 'info', 'warning', 'error'"),
        ("target", "logging", "syslog", "'auto', 'stderr', 'journal'"),
    ],
)
def test_literal_choices_come_from_the_type_hints(key: str, section: str, value: str, choices: str) -> None:
    outer, _, inner = section.partition(".")
    text = f"{outer}:\n  {inner}:\n    {key}: {value}\n" if inner else f"{outer}:\n  {key}: {value}\n"
    issue = only_issue(text)
    assert issue.key == f"{section}.{key}"
    assert issue.line == text.count("\n")
    assert issue.message == f"expected one of {choices}, got '{value}'"


def test_literal_needs_the_exact_string() -> None:
    issue = only_issue("iptables:\n  hooks: [forward]\n")
    assert (issue.key, issue.line) == ("iptables.hooks[0]", 2)
    assert issue.message == "expected one of 'FORWARD', 'INPUT', 'OUTPUT', got 'forward'"
    # YAML 1.1 reads `off` as false, which is no policy.
    issue = only_issue("engine:\n  policies:\n    fragments: off\n")
    assert issue.message == "expected one of 'drop', 'accept', got off"


# --- errors: each names the file, the dotted key and the line ----------------------------------------


def test_message_format() -> None:
    text = "engine:\n  limits:\n    max_connections: lots\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "etc/tcpguard.yaml")
    assert str(info.value) == (
        "etc/tcpguard.yaml:3: engine.limits.max_connections: expected a positive integer, got 'lots'"
    )


def test_unknown_key() -> None:
    issue = only_issue("queue:\n  num: 1\n  wokers: 2\n")
    assert (issue.file, issue.line, issue.key) == (CONF, 3, "queue.wokers")
    assert issue.message == "unknown key (did you mean 'workers'?)"
    issue = only_issue("colour: blue\n")
    assert (issue.line, issue.key) == (1, "colour")
    assert issue.message.startswith("unknown key (known keys: rules_dir, rules_load_budget, queue, iptables,")


def test_unknown_key_in_engine_section() -> None:
    issue = only_issue("engine:\n  limits:\n    max_conections: 5\n")
    assert (issue.line, issue.key) == (3, "engine.limits.max_conections")
    assert "did you mean 'max_connections'" in issue.message


def test_duplicate_key() -> None:
    issue = only_issue("logging:\n  level: info\n  target: stderr\n  level: debug\n")
    assert (issue.line, issue.key) == (4, "logging.level")
    assert issue.message == "duplicate key (first given on line 2)"


def test_duplicate_section() -> None:
    issue = only_issue("queue: {num: 1}\nalerts: {}\nqueue: {num: 2}\n")
    assert (issue.line, issue.key) == (3, "queue")


def test_non_string_key() -> None:
    issue = only_issue("queue:\n  1: 2\n")
    assert (issue.line, issue.key, issue.message) == (2, "queue", "expected a key name, got 1")


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("queue:\n  workers: 0\n", "queue.workers", "expected a positive integer, got 0"),
        ("queue:\n  workers: -3\n", "queue.workers", "expected a positive integer, got -3"),
        ("queue:\n  workers: 2.0\n", "queue.workers", "expected a positive integer, got 2.0"),
        ("queue:\n  workers: '2'\n", "queue.workers", "expected a positive integer, got '2'"),
        ("queue:\n  maxlen: null\n", "queue.maxlen", "expected a positive integer, got null"),
        ("queue:\n  maxlen:\n", "queue.maxlen", "expected a positive integer, got null"),
        ("queue:\n  num: -1\n", "queue.num", "expected an integer from 0 to 65535, got -1"),
        ("queue:\n  num: 65536\n", "queue.num", "expected an integer from 0 to 65535, got 65536"),
        ("queue:\n  copy_range: 0\n", "queue.copy_range", "expected an integer from 1 to 65535, got 0"),
        ("queue:\n  bypass: 1\n", "queue.bypass", "expected true or false, got 1"),
        ("queue:\n  bypass: 'true'\n", "queue.bypass", "expected true or false, got 'true'"),
        ("iptables:\n  mark: 0\n", "iptables.mark", "expected an integer from 1 to 4294967295, got 0"),
        ("iptables:\n  chain: ''\n", "iptables.chain", None),
        ("iptables:\n  chain: FORWARD\n", "iptables.chain", None),
        ("iptables:\n  chain: -X\n", "iptables.chain", None),
        ("iptables:\n  chain: A_CHAIN_NAME_LONGER_THAN_28_CHARS\n", "iptables.chain", None),
        ("iptables:\n  in_interface: eth0/1\n", "iptables.in_interface", None),
        ("iptables:\n  in_interface: 5\n", "iptables.in_interface", None),
        ("iptables:\n  hooks: FORWARD\n", "iptables.hooks", None),
        ("iptables:\n  ports: 80\n", "iptables.ports", None),
        ("logging: [info]\n", "logging", "expected a mapping, got a list"),
        ("alerts: on\n", "alerts", "expected a mapping, got on"),
        ("alerts:\n  file: ''\n", "alerts.file", "expected a path, or null, got ''"),
        ("control:\n  socket: null\n", "control.socket", "expected a path, got null"),
        ("control:\n  socket: {a: 1}\n", "control.socket", "expected a path, got a mapping"),
        ("control:\n  group: 1000\n", "control.group", "expected a non-empty string, or null, got 1000"),
        ("engine:\n  timeouts:\n    established: 0\n", "engine.timeouts.established", None),
        ("engine:\n  timeouts:\n    established: -1.5\n", "engine.timeouts.established", None),
        ("engine:\n  timeouts:\n    established: .nan\n", "engine.timeouts.established", None),
        ("engine:\n  timeouts:\n    established: .inf\n", "engine.timeouts.established", None),
        ("engine:\n  timeouts:\n    established: true\n", "engine.timeouts.established", None),
        ("engine:\n  limits:\n    max_total_buffer: 0\n", "engine.limits.max_total_buffer", None),
        (
            "engine:\n  policies:\n    verify_checksums: yes please\n",
            "engine.policies.verify_checksums",
            None,
        ),
    ],
)
def test_bad_value(text: str, key: str, message: str | None) -> None:
    issue = only_issue(text)
    assert (issue.file, issue.key, issue.line) == (CONF, key, text.count("\n"))
    if message is not None:
        assert issue.message == message
    else:
        assert issue.message.startswith("expected ")


def test_control_socket_path_must_fit_a_unix_socket() -> None:
    issue = only_issue(f"control:\n  socket: /run/{'x' * 120}.sock\n")
    assert (issue.key, issue.line) == ("control.socket", 2)
    assert "too long for a Unix socket" in issue.message


def test_huge_numbers_are_refused_not_crashed_on() -> None:
    issue = only_issue(f"engine:\n  timeouts:\n    established: 1{'0' * 400}\n")
    assert (issue.key, issue.line) == ("engine.timeouts.established", 3)


def test_bool_is_not_an_int() -> None:
    issue = only_issue("engine:\n  limits:\n    max_connections: true\n")
    assert issue.message == "expected a positive integer, got true"


def test_float_fields_accept_integers() -> None:
    assert parse("engine:\n  timeouts:\n    syn_sent: 5\n").engine.timeouts.syn_sent == 5.0


def test_list_item_errors_name_the_item() -> None:
    found = issues("iptables:\n  ports:\n    - 80\n    - 0\n    - http\n    - 80\n")
    assert [(i.key, i.line) for i in found] == [
        ("iptables.ports[1]", 4),
        ("iptables.ports[2]", 5),
        ("iptables.ports[3]", 6),
    ]
    assert found[0].message == "expected an integer from 1 to 65535, got 0"
    assert found[2].message == "duplicate of iptables.ports[0]"


def test_empty_ports_list_is_refused() -> None:
    issue = only_issue("iptables:\n  ports: []\n")
    assert (issue.key, issue.line) == ("iptables.ports", 2)
    assert "must not be empty" in issue.message


def test_duplicate_hook() -> None:
    issue = only_issue("iptables:\n  hooks: [FORWARD, INPUT, FORWARD]\n")
    assert (issue.key, issue.message) == ("iptables.hooks[2]", "duplicate of iptables.hooks[0]")


def test_queue_numbers_must_fit() -> None:
    assert parse("queue: {num: 65534, workers: 2}\n").queue.workers == 2
    issue = only_issue("queue:\n  num: 65535\n  workers: 2\n")
    assert (issue.key, issue.line) == ("queue.workers", 3)
    assert "65535 to 65536" in issue.message


def test_interface_that_can_never_match_the_hook() -> None:
    issue = only_issue("iptables:\n  hooks: [FORWARD, OUTPUT]\n  in_interface: eth0\n")
    assert (issue.key, issue.line) == ("iptables.in_interface", 3)
    issue = only_issue("iptables:\n  out_interface: eth0\n  hooks: [INPUT]\n")
    assert (issue.key, issue.line) == ("iptables.out_interface", 2)
    # The default hooks (FORWARD) take both.
    assert parse("iptables: {in_interface: eth0, out_interface: eth1}\n").iptables.in_interface == "eth0"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("queue:\n  num: 1\n bad: 2\n", 3, "invalid YAML: "),
        ("queue: {num: 1\n", 2, "invalid YAML: "),
        ("queue:\n\tnum: 1\n", 2, "invalid YAML: "),
        ("a: 1\n---\nb: 2\n", 2, "invalid YAML: expected a single document in the stream"),
        ("queue:\n  num: \x01\n", 2, "invalid YAML: special characters are not allowed"),
    ],
)
def test_bad_yaml(text: str, line: int, message: str) -> None:
    issue = only_issue(text)
    assert (issue.file, issue.line, issue.key) == (CONF, line, "")
    assert issue.message.startswith(message)
    assert str(issue).startswith(f"{CONF}:{line}: invalid YAML: ")


def test_top_level_must_be_a_mapping() -> None:
    issue = only_issue("- queue\n")
    assert (issue.line, issue.key, issue.message) == (1, "", "expected a mapping, got a list")
    assert str(issue) == f"{CONF}:1: expected a mapping, got a list"


def test_all_errors_are_reported_at_once_in_file_order() -> None:
    text = """\
        engine:
          limits:
            max_connections: lots
          policies:
            limit: explode
        queue:
          workers: 0
          colour: red
        """
    found = issues(text)
    assert [(i.line, i.key) for i in found] == [
        (3, "engine.limits.max_connections"),
        (5, "engine.policies.limit"),
        (7, "queue.workers"),
        (8, "queue.colour"),
    ]
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value).splitlines() == [str(i) for i in found]


def test_anchors_and_aliases_are_followed() -> None:
    config = parse("queue: {maxlen: &n 4000}\nengine:\n  limits: {max_ooo_segments: *n}\n")
    assert config.queue.maxlen == config.engine.limits.max_ooo_segments == 4000


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("logging:\n  level: warning\n", encoding="utf-8")
    config = load_config(path)
    assert config.logging.level == "warning"
    assert config.rules_dir == tmp_path / "rules"
    path.write_text("logging:\n  level: loud\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{path}:2: logging.level: "):
        load_config(str(path))


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read: ") as info:
        load_config(path)
    assert info.value.issues[0].line is None


# --- who may have written the file ---------------------------------------------------------------------
# The config names the rules directory, whose modules run as root: a file others could edit is refused.


def _gw_config(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text("logging:\n  level: warning\n", encoding="utf-8")
    path.chmod(mode)
    return path


def test_config_writable_by_other_users_is_refused(tmp_path: Path) -> None:
    path = _gw_config(tmp_path, 0o646)
    with pytest.raises(ConfigError, match=rf"^{path}: writable by other users: refusing to load it") as info:
        load_config(path)
    assert info.value.issues[0].file == str(path)


def test_config_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    path = _gw_config(shared, 0o644)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=rf"^{path}: its directory {shared} is writable by other users"):
        load_config(path)
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot replace a file they do not own
    assert load_config(path).logging.level == "warning"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
@pytest.mark.parametrize("mode", [0o644, 0o444])
def test_config_owned_by_another_user_is_refused(tmp_path: Path, mode: int) -> None:
    # Read-only does not help: the owner can make it writable again at any time.
    path = _gw_config(tmp_path, mode)
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError, match=rf"^{path}: owned by uid 65534, neither root nor the user"):
        load_config(path)


def test_config_writable_by_its_group_is_accepted(tmp_path: Path) -> None:
    # A group of administrators allowed to edit the config is the operator's decision.
    assert load_config(_gw_config(tmp_path, 0o664)).logging.level == "warning"


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- the schema and the shipped file ------------------------------------------------------------------


def test_schema_covers_the_engine_settings_fields() -> None:
    keys = set(schema_keys())
    for cls, prefix in ((Timeouts, "timeouts"), (Limits, "limits"), (Policies, "policies")):
        for f in dataclasses.fields(cls):
            assert f"engine.{prefix}.{f.name}" in keys


def _shipped_keys(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of every key in the shipped file."""
    found: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else key_node.value
            found[key] = key_node.start_mark.line + 1
            found.update(_shipped_keys(value_node, key))
    return found


def test_shipped_file_parses() -> None:
    config = load_config(SHIPPED)
    assert config.rules_dir.resolve() == REPO / "rules"


def test_shipped_file_lists_every_key() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert list(_shipped_keys(yaml.compose(text, Loader=yaml.SafeLoader))) == schema_keys()


def test_shipped_file_documents_every_key() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    lines = text.splitlines()
    undocumented = []
    for key, line in _shipped_keys(yaml.compose(text, Loader=yaml.SafeLoader)).items():
        before = [row.strip() for row in lines[: line - 1] if row.strip()]
        if not (before and before[-1].startswith("#")) and "#" not in lines[line - 1]:
            undocumented.append(key)
    assert undocumented == []


def test_shipped_file_is_the_defaults_except_rules_dir() -> None:
    shipped = load_config(SHIPPED)
    defaults = parse_config("", str(SHIPPED))
    assert shipped.rules_dir != defaults.rules_dir
    assert dataclasses.replace(shipped, rules_dir=defaults.rules_dir) == defaults


def test_held_packets_must_fit_twice_in_the_kernel_queue() -> None:
    with pytest.raises(
        ConfigError, match=r"engine.limits.max_held_packets: 600 is more than half of queue.maxlen"
    ):
        parse("queue: {maxlen: 1000}\nengine:\n  limits: {max_held_packets: 600}\n")
    assert parse("queue: {maxlen: 1000}\nengine:\n  limits: {max_held_packets: 500}\n").queue.maxlen == 1000
