"""What every offline command starts from: the engine settings and the rule set named by `--config` and
`--rules`. It lives here, not in the CLI, because `tcpguard cost` needs it as much as `tcpguard replay`,
and a command module importing the CLI made the cycle cli -> command -> cli."""

from __future__ import annotations

import sys
from pathlib import Path

from tcpguard.app.daemon.config import Config, ConfigError, load_config
from tcpguard.app.daemon.ruleload import DEFAULT_LOAD_BUDGET, load_rules_bounded
from tcpguard.core.errors import RuleLoadError
from tcpguard.core.rules import RuleSet
from tcpguard.core.settings import EngineSettings


def load_settings(config: str | None, ignore_checksums: bool = False) -> tuple[Config | None, EngineSettings]:
    """The config (None without `--config`) and its engine settings, the defaults without one; a capture
    taken with checksum offload needs `ignore_checksums`, or every packet would be dropped as damaged."""
    cfg = load_config(config) if config else None
    settings = cfg.engine if cfg is not None else EngineSettings()
    if ignore_checksums:
        settings.policies.verify_checksums = False
    return cfg, settings


def load_settings_and_rules(
    command: str, config: str | None, rules_dir: str | None, ignore_checksums: bool
) -> tuple[EngineSettings, RuleSet, Path] | int:
    """(engine settings, rule set, its directory) for an offline command (`replay`, `cost`), from
    `--config` and `--rules`; or, having printed why, the exit status (1: a broken file, 2: nothing to
    load)."""
    try:
        cfg, settings = load_settings(config, ignore_checksums)
    except ConfigError as e:
        print(f"tcpguard {command}: {e}", file=sys.stderr)
        return 1
    where = rules_dir or (cfg.rules_dir if cfg is not None else None)
    if where is None:
        print(f"tcpguard {command}: give --rules DIR (or --config)", file=sys.stderr)
        return 2
    try:
        budget = cfg.rules_load_budget if cfg is not None else DEFAULT_LOAD_BUDGET
        return settings, load_rules_bounded(where, budget), Path(where)
    except RuleLoadError as e:
        print(f"tcpguard {command}: {e}", file=sys.stderr)
        return 1
