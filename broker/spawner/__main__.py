"""``python -I -m broker.spawner --root ROOT --fd N [--log FILE]``: started by ``mcp-brokerd`` as root, only.

``mcp-brokerd`` forks and executes this before it drops to ``mcp-broker``
and imports anything heavy; descriptor N is its end of the channel. Run
by hand it has no channel and exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from broker.core.errors import EX_SOFTWARE, EX_USAGE
from broker.core.paths import Paths
from broker.spawner.service import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mcp-spawner", description="mcp-privsep's spawner (started by mcp-brokerd).")
    p.add_argument("--root", default="/")
    p.add_argument("--fd", type=int, required=True, help="the channel to the daemon (a socketpair end)")
    p.add_argument("--log", default="-", help="a file to append to, or - for standard error")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ns = p.parse_args(argv)
    if os.geteuid() != 0:
        print("mcp-spawner: must run as root (mcp-brokerd starts it)", file=sys.stderr)
        return EX_USAGE
    handler: logging.Handler
    if ns.log == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        fd = os.open(ns.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s mcp-spawner[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(ns.log_level.upper())
    os.chdir("/")
    try:
        return run(Paths(ns.root), ns.fd)
    except OSError as exc:
        logging.getLogger("mcp-spawner").error("%s", exc)
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
