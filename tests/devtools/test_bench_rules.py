"""The benchmark's rule copies: the sample rules with the rate limiter opened up, and hollow copies whose
listeners do nothing but keep every subscription and filter."""

from __future__ import annotations

from pathlib import Path

from tcpguard.app.daemon.ruleload import load_module, load_rules
from tcpguard.core.rules import Rule
from tcpguard.devtools.bench.network import ROOT, bench_rules, hollow_rules

SAMPLES = ROOT / "rules"


def _shape(r: Rule) -> tuple[object, ...]:
    """Everything about a rule the engine dispatches on: all but the function's body."""
    code = r.func.__code__
    return (
        r.name,
        r.event,
        r.direction,
        r.ports,
        r.streamed,
        r.lookback,
        code.co_varnames[: code.co_argcount],
    )


def test_bench_copy_raises_the_rate_limit_and_leaves_the_others_as_shipped(tmp_path: Path) -> None:
    out = bench_rules(SAMPLES, tmp_path / "rules")
    for f in SAMPLES.glob("*.py"):
        copy = (out / f.name).read_text()
        if f.name == "ratelimit.py":
            assert copy.startswith(f.read_text()) and copy.endswith("RATE = 1e9\nBURST = 1e9\n")
        else:
            assert copy == f.read_text()
    mod = {r.name: r for r in load_module(out / "ratelimit.py")}
    assert mod["ratelimit.rate_limit"].func.__globals__["BURST"] == 1e9


def test_hollow_copy_keeps_every_subscription_and_does_nothing(tmp_path: Path) -> None:
    real = load_rules(SAMPLES)
    hollow = load_rules(hollow_rules(SAMPLES, tmp_path / "hollow"))
    assert [_shape(r) for r in hollow.rules] == [_shape(r) for r in real.rules]
    assert len(real.rules) >= 6
    for r in hollow.rules:
        # Every listener's code is a bare `pass`: it returns None whatever it is given, and touches
        # none of its arguments (None would raise on any attribute access).
        assert r.func(*([None] * r.func.__code__.co_argcount)) is None
        assert r.func.__code__.co_names == ()
    # Module-level code still runs: the hollow firewall compiled its allow-list like the real one.
    (fw_real,) = load_module(SAMPLES / "firewall.py")
    (fw_hollow,) = load_module(tmp_path / "hollow" / "firewall.py")
    assert fw_hollow.func.__globals__["_ENTRIES"] == fw_real.func.__globals__["_ENTRIES"]
