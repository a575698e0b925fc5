"""The files server's command line: parse and check the roots, then serve over stdio.

The MCP SDK is imported only once the roots are known to be good, so a bad
command line fails in milliseconds with one line and a sysexits code (64
usage, 78 configuration) instead of after the SDK's import time.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mcp_servers.files import confine

EX_USAGE = 64
EX_CONFIG = 78


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), as the rest of mcp-privsep does."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m mcp_servers.files",
        description="A confined file share over MCP (stdio). The agent sees root names, never host paths.",
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="NAME=PATH[:ro|:rw]",
        help="a root the agent may use by NAME; read-only unless it ends in :rw (repeatable)",
    )
    parser.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="NAME=SIZE[,FILES]",
        help=(
            "the quota of read-write root NAME: SIZE bytes (K, M, G, T: binary units) of regular files and FILES "
            f"entries; without it a :rw root gets {confine.human_size(confine.QUOTA_BYTES_DEFAULT)} and "
            f"{confine.QUOTA_FILES_DEFAULT} entries (repeatable)"
        ),
    )
    ns = parser.parse_args(argv)
    try:
        roots = confine.apply_quotas([confine.parse_root(spec) for spec in ns.root], ns.quota)
        confine.check_roots(roots)
    except confine.ConfigError as exc:
        print(f"files: {exc}", file=sys.stderr)
        return EX_CONFIG
    from mcp_servers.files import server

    server.configure(roots)
    server.server.run()
    return 0
