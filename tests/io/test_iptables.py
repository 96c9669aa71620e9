"""The iptables manager: rule generation (pure) and install/remove/idempotence in a real namespace (root)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpguard.io.iptables import IptablesError, IptablesManager, IptablesSpec
from tests.netns import Lab

# ---------------------------------------------------------------------------------------------- pure


def test_default_spec_rules() -> None:
    spec = IptablesSpec()
    assert spec.chain_rules() == [
        ["-m", "mark", "--mark", "0x7467", "-j", "RETURN"],
        [
            "-m",
            "mark",
            "--mark",
            "0x40000000/0x40000000",
            "-j",
            "CONNMARK",
            "--set-xmark",
            "0x40000000/0x40000000",
        ],
        ["-m", "connmark", "--mark", "0x40000000/0x40000000", "-j", "RETURN"],
        ["-p", "tcp", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"],
    ]
    script = spec.restore_script()
    assert script.splitlines()[:2] == ["*filter", ":TCPGUARD - [0:0]"]
    assert script.endswith("COMMIT\n")


def test_balance_interfaces_and_port_chunks() -> None:
    ports = list(range(1000, 1020))  # 20 ports: more than multiport's 15 per rule
    spec = IptablesSpec(
        queue_num=3,
        queue_count=4,
        bypass=False,
        in_interface="c0",
        out_interface="s+",
        ports=tuple(ports),
        hooks=("FORWARD",),
    )
    rules = spec.chain_rules()[2:]  # after the mark RETURN and the bypass CONNMARK
    assert rules[0][-2:] == ["-j", "RETURN"]  # bypassed connections skip the queue rules
    rules = rules[1:]
    assert len(rules) == 2
    for rule in rules:
        assert rule[:6] == ["-p", "tcp", "-i", "c0", "-o", "s+"]
        assert rule[-4:] == ["-j", "NFQUEUE", "--queue-balance", "3:6"]
    assert rules[0][rules[0].index("--ports") + 1] == ",".join(str(p) for p in ports[:15])
    assert rules[1][rules[1].index("--ports") + 1] == ",".join(str(p) for p in ports[15:])


def test_lists_from_yaml_become_tuples() -> None:
    spec = IptablesSpec(hooks=["FORWARD", "INPUT"], ports=[80, 443])  # type: ignore[arg-type]
    assert spec.hooks == ("FORWARD", "INPUT")
    assert spec.ports == (80, 443)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chain": "FORWARD"}, "chain"),
        ({"chain": "a" * 29}, "chain"),
        ({"chain": "-x"}, "chain"),
        ({"hooks": ()}, "hooks"),
        ({"hooks": ("PREROUTING",)}, "hooks"),
        ({"hooks": ("INPUT", "INPUT")}, "hooks"),
        ({"queue_num": 70000}, "queue_num"),
        ({"queue_num": 65535, "queue_count": 2}, "queue_count"),
        ({"queue_count": 0}, "queue_count"),
        ({"mark": 0}, "mark"),
        ({"mark": 1 << 32}, "mark"),
        ({"in_interface": "bad name"}, "in_interface"),
        ({"hooks": ("OUTPUT",), "in_interface": "eth0"}, "in_interface"),
        ({"hooks": ("INPUT",), "out_interface": "eth0"}, "out_interface"),
        ({"ports": (0,)}, "ports"),
        ({"ports": (True,)}, "ports"),
    ],
)
def test_invalid_specs_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        IptablesSpec(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- root


def _save(lab: Lab, binary: str = "iptables") -> str:
    """iptables-save without timestamp comments and with chain counters zeroed: the namespace's own IPv6
    neighbour discovery moves the OUTPUT counters, and counters are not configuration."""
    out = lab.run("gw", [f"{binary}-save"]).stdout
    lines = (re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in out.splitlines() if not line.startswith("#"))
    return "\n".join(lines)


def _operator_rules(lab: Lab) -> None:
    """Rules an operator already has, which install/remove must leave exactly as they are."""
    for binary in ("iptables", "ip6tables"):
        for rule in (
            "-N OPERATOR",
            "-A OPERATOR -p udp --dport 53 -j ACCEPT",
            "-A FORWARD -m conntrack --ctstate ESTABLISHED -j ACCEPT",
            "-A FORWARD -j OPERATOR",
            "-A INPUT -p tcp --dport 22 -j ACCEPT",
            "-P OUTPUT ACCEPT",
        ):
            lab.run("gw", [binary, "-w", *shlex.split(rule)])


@pytest.fixture
def gw_lab(lab: Lab) -> Iterator[Lab]:
    _operator_rules(lab)
    yield lab


@pytest.mark.root
def test_install_remove_restores_tables_exactly(gw_lab: Lab) -> None:
    lab = gw_lab
    before = {b: _save(lab, b) for b in ("iptables", "ip6tables")}
    mgr = IptablesManager(
        IptablesSpec(hooks=("FORWARD", "INPUT", "OUTPUT"), ports=(80, 443)), netns=lab.name("gw")
    )
    assert not mgr.is_installed()
    mgr.install()
    assert mgr.is_installed()
    for binary in ("iptables", "ip6tables"):
        saved = _save(lab, binary)
        assert saved != before[binary]
        assert ":TCPGUARD - [0:0]" in saved
        # The jump is the first rule of every hook, ahead of the operator's ESTABLISHED accept.
        for hook in ("INPUT", "FORWARD", "OUTPUT"):
            first = lab.run("gw", [binary, "-w", "-S", hook]).stdout.splitlines()[1]
            assert first == f"-A {hook} -j TCPGUARD"
        assert "-A TCPGUARD -m mark --mark 0x7467 -j RETURN" in saved
        queue = "-j NFQUEUE --queue-num 0 --queue-bypass"
        assert f"-A TCPGUARD -p tcp -m multiport --ports 80,443 {queue}" in saved
    mgr.remove()
    assert not mgr.is_installed()
    for binary in ("iptables", "ip6tables"):
        assert _save(lab, binary) == before[binary]
    mgr.remove()  # a second removal is a no-op
    for binary in ("iptables", "ip6tables"):
        assert _save(lab, binary) == before[binary]


@pytest.mark.root
def test_remove_in_pristine_namespace(lab: Lab) -> None:
    """From a namespace that never had a filter table, remove() leaves only the empty built-in chains."""
    assert _save(lab) == ""
    mgr = IptablesManager(IptablesSpec(ipv6=False), netns=lab.name("gw"))
    mgr.install()
    mgr.remove()
    empty = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT"
    assert _save(lab) in ("", empty)
    assert lab.run("gw", ["iptables", "-w", "-S"]).stdout.split("\n") == [
        "-P INPUT ACCEPT",
        "-P FORWARD ACCEPT",
        "-P OUTPUT ACCEPT",
        "",
    ]


@pytest.mark.root
def test_install_is_idempotent_and_reuses_leftovers(gw_lab: Lab) -> None:
    lab = gw_lab
    spec = IptablesSpec(hooks=("FORWARD", "INPUT"), queue_num=2, queue_count=2)
    IptablesManager(spec, netns=lab.name("gw")).install()
    once = {b: _save(lab, b) for b in ("iptables", "ip6tables")}
    # A second manager (a restarted daemon after a crash) installs over the leftovers.
    mgr = IptablesManager(spec, netns=lab.name("gw"))
    mgr.install()
    mgr.install()
    assert {b: _save(lab, b) for b in ("iptables", "ip6tables")} == once
    # Leftover damage from a crash half-way or a careless operator: a duplicate jump, a stray rule in our
    # chain, a missing jump. install() repairs all of it.
    lab.run("gw", ["iptables", "-w", "-A", "FORWARD", "-j", "TCPGUARD"])
    lab.run("gw", ["iptables", "-w", "-A", "TCPGUARD", "-p", "udp", "-j", "DROP"])
    lab.run("gw", ["ip6tables", "-w", "-D", "INPUT", "-j", "TCPGUARD"])
    assert not mgr.is_installed()
    mgr.install()
    assert {b: _save(lab, b) for b in ("iptables", "ip6tables")} == once


@pytest.mark.root
def test_changed_spec_replaces_old_rules(gw_lab: Lab) -> None:
    lab = gw_lab
    before = _save(lab)
    old = IptablesManager(IptablesSpec(hooks=("FORWARD", "OUTPUT"), ports=(80,)), netns=lab.name("gw"))
    old.install()
    new = IptablesManager(
        IptablesSpec(hooks=("INPUT",), queue_num=7, bypass=False, ipv6=False), netns=lab.name("gw")
    )
    new.install()
    rules = lab.run("gw", ["iptables", "-w", "-S"]).stdout
    assert "-A FORWARD -j TCPGUARD" not in rules
    assert "-A OUTPUT -j TCPGUARD" not in rules
    assert "-A INPUT -j TCPGUARD" in rules
    assert "-A TCPGUARD -p tcp -j NFQUEUE --queue-num 7" in rules.splitlines()
    assert "multiport" not in rules
    # remove() cleans the IPv6 chain the old spec left, although the new spec has ipv6 off.
    new.remove()
    assert _save(lab) == before
    assert "TCPGUARD" not in _save(lab, "ip6tables")


@pytest.mark.root
def test_remove_deletes_operator_jumps_too(gw_lab: Lab) -> None:
    """A chain that is referenced cannot be deleted, so every jump to it goes, even ones we did not add."""
    lab = gw_lab
    mgr = IptablesManager(IptablesSpec(ipv6=False), netns=lab.name("gw"))
    mgr.install()
    lab.run("gw", ["iptables", "-w", "-A", "OPERATOR", "-p", "tcp", "--dport", "25", "-j", "TCPGUARD"])
    mgr.remove()
    assert "TCPGUARD" not in _save(lab)


@pytest.mark.root
def test_show(lab: Lab) -> None:
    mgr = IptablesManager(IptablesSpec(chain="TG_TEST", in_interface="c0"), netns=lab.name("gw"))
    assert "not installed" in mgr.show()
    mgr.install()
    text = mgr.show()
    assert text.count("-A FORWARD -j TG_TEST") == 2  # iptables and ip6tables
    assert "-A TG_TEST -i c0 -p tcp -j NFQUEUE --queue-num 0 --queue-bypass" in text
    assert re.search(r"^# ip6tables$", text, re.M)
    mgr.remove()


@pytest.mark.root
def test_errors_carry_the_command(lab: Lab) -> None:
    mgr = IptablesManager(IptablesSpec(ipv6=False), netns=lab.name("gw"))
    mgr.spec = IptablesSpec(ipv6=False, binaries=("iptables-no-such-binary", "ip6tables"))
    with pytest.raises(IptablesError, match="iptables-no-such-binary"):
        mgr.install()
    local = IptablesManager(IptablesSpec(ipv6=False, binaries=("iptables-no-such-binary", "x")))
    with pytest.raises(IptablesError, match="exited 127"):
        local.install()


@pytest.mark.root
def test_remove_reports_what_it_removed(gw_lab: Lab) -> None:
    lab = gw_lab
    mgr = IptablesManager(IptablesSpec(hooks=("FORWARD", "INPUT"), ipv6=False), netns=lab.name("gw"))
    mgr.install()
    lab.run("gw", ["iptables", "-w", "-A", "OPERATOR", "-p", "tcp", "--dport", "25", "-j", "TCPGUARD"])
    assert sorted(mgr.remove()) == [
        "iptables chain TCPGUARD (4 rules)",
        "iptables rule: -A FORWARD -j TCPGUARD",
        "iptables rule: -A INPUT -j TCPGUARD",
        "iptables rule: -A OPERATOR -p tcp -m tcp --dport 25 -j TCPGUARD",
    ]
    assert mgr.remove() == []


@pytest.mark.root
def test_iptables_remove_command_says_what_it_removed(lab: Lab, tmp_path: Path) -> None:
    config = tmp_path / "tcpguard.yaml"
    config.write_text("rules_dir: .\niptables:\n  ipv6: false\n  chain: TG_CLI\n")
    tcpguard = str(Path(sys.executable).parent / "tcpguard")

    def run(action: str) -> str:
        r = lab.run("gw", [tcpguard, "iptables", action, "--config", str(config)], check=False)
        assert r.returncode == 0, r.stderr
        return str(r.stdout)

    run("install")
    assert run("remove") == (
        # Two: the forged-packet RETURN and the NFQUEUE rule; the bypass rules come only with
        # engine.inspection.bypass, off by default.
        "removed iptables rule: -A FORWARD -j TG_CLI\nremoved iptables chain TG_CLI (2 rules)\n"
    )
    assert run("remove") == "nothing to remove: no chain TG_CLI in iptables or ip6tables\n"
