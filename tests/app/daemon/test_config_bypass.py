"""Connection bypass in the configuration (issue 20): `iptables.bypass_mark`, what the daemon builds from
it, and what `tcpguard check` says when bypass is on but the kernel side is the operator's or missing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tcpguard.app.daemon.config import (
    Config,
    ConfigError,
    bypass_chain_rules,
    config_warnings,
    parse_config,
)
from tcpguard.app.daemon.run import iptables_spec
from tests.app.test_check import config, run

CONF = "/etc/tcpguard/tcpguard.yaml"


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), CONF)


ON = "engine: {inspection: {bypass: true}}\n"


def test_the_default_bit_reaches_the_chain_and_follows_queue_repeat() -> None:
    cfg = parse(ON)
    assert cfg.iptables.bypass_mark == 0x40000000
    spec = iptables_spec(cfg)
    assert (spec.bypass_mark, spec.repeat) == (0x40000000, True)
    assert spec.bypass_rules()[1][-1] == "RETURN"
    spec = iptables_spec(parse(ON + "queue: {repeat: false}\niptables: {bypass_mark: 0x100}\n"))
    assert (spec.bypass_mark, spec.repeat) == (0x100, False)
    assert spec.bypass_rules()[1][-1] == "ACCEPT"
    assert iptables_spec(parse(ON + "iptables: {bypass_mark: 0}\n")).bypass_rules() == []


def test_no_bypass_rules_and_so_no_conntrack_while_bypass_is_off() -> None:
    # The connmark match would make the kernel track (and defragment) every connection in the namespace,
    # which a gateway without bypass never asked for: the rules come with engine.inspection.bypass only.
    cfg = parse("")
    assert cfg.iptables.bypass_mark == 0x40000000 and not cfg.engine.inspection.bypass
    assert iptables_spec(cfg).bypass_mark == 0
    assert iptables_spec(cfg).bypass_rules() == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3", "0x3 is not a single bit"),
        ("0x7467", "not a single bit"),
        ("0x4", "0x4 is a bit of iptables.mark (0x7467)"),
        ("0x100000000", "from 0 to 4294967295"),
        ("-1", "from 0 to 4294967295"),
    ],
)
def test_a_bad_bypass_mark_names_file_key_and_line(value: str, message: str) -> None:
    text = f"iptables:\n  manage: true\n  bypass_mark: {value}\n"
    with pytest.raises(ConfigError) as info:
        parse(text)
    (issue,) = info.value.issues
    assert issue.key == "iptables.bypass_mark"
    assert issue.file == CONF and issue.line in (2, 3)
    assert message in issue.message, issue.message


def test_bypass_with_operator_rules_warns_with_the_exact_rules() -> None:
    cfg = parse("engine: {inspection: {bypass: true}}\niptables: {manage: false, bypass_mark: 0x800}\n")
    (warning,) = [w for w in config_warnings(cfg) if w.startswith("engine.inspection.bypass")]
    assert "-A <your chain> -m mark --mark 0x800/0x800 -j CONNMARK --set-xmark 0x800/0x800" in warning
    assert "-A <your chain> -m connmark --mark 0x800/0x800 -j RETURN" in warning  # queue.repeat's default
    assert "before its NFQUEUE rule" in warning
    no_repeat = parse(
        "engine: {inspection: {bypass: true}}\nqueue: {repeat: false}\niptables: {manage: false}\n"
    )
    assert bypass_chain_rules(no_repeat)[1].endswith("-m connmark --mark 0x40000000/0x40000000 -j ACCEPT")


def test_bypass_without_a_bit_warns_and_managed_or_off_does_not() -> None:
    (warning,) = config_warnings(parse("engine: {inspection: {bypass: true}}\niptables: {bypass_mark: 0}\n"))
    assert "iptables.bypass_mark: 0" in warning
    for text in (
        "engine: {inspection: {bypass: true}}\n",
        "iptables: {manage: false}\nqueue: {repeat: false}\n",
    ):
        assert [w for w in config_warnings(parse(text)) if "bypass" in w] == [], text


def test_check_prints_the_rules_the_operator_needs(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, "queue: {repeat: false}\niptables: {manage: false}\nengine: {inspection: {bypass: true}}\n"
    )
    r = run("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"{cfg}: warning: engine.inspection.bypass: true with iptables.manage: false" in r.stderr
    assert "-m mark --mark 0x40000000/0x40000000 -j CONNMARK --set-xmark 0x40000000/0x40000000" in r.stderr
    assert "-m connmark --mark 0x40000000/0x40000000 -j ACCEPT" in r.stderr


def test_the_shipped_file_documents_the_key() -> None:
    shipped = (Path(__file__).resolve().parents[3] / "etc" / "tcpguard.yaml").read_text()
    assert "  bypass_mark: 0x40000000\n" in shipped
