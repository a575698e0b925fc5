"""``mcp-brokerctl check``: every problem of the allowlists and the daemon config, offline (like ``visudo -c``)."""

from __future__ import annotations

from broker.core import allowlist
from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.daemon import config


def check_all(paths: Paths) -> list[str]:
    """Every problem in the allowlists and the daemon config, each as ``file:line:col: message`` where known."""
    problems = allowlist.check_all(paths.allowlist, paths.allowlist_d)
    try:
        config.load(paths)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return problems
