"""Run a bench script against a throw-away staging installation (for development).

``python bench/staging.py [--keep] [SCRIPT [ARGS...]]`` builds a real
installation under /tmp with the privileged test harness
(``tests/e2e/harness.py``: real users, sudoers drop-in, daemon, a stdio and
an HTTP demo server), runs ``bench/SCRIPT`` (default ``bench.py``) against
it with ``--root R --agent mcpt-agent1``, and tears it down (unless
``--keep``, which prints the root and waits for Ctrl-C). It needs the
repository checkout (for the harness) and a virtualenv with mcp-privsep
installed; the installation runs from that virtualenv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main(argv: list[str]) -> int:
    keep = "--keep" in argv
    argv = [a for a in argv if a != "--keep"]
    script = argv[0] if argv else "bench.py"
    extra = argv[1:]
    if os.geteuid() != 0:
        print("staging: run as root (it creates users, a sudoers drop-in and a daemon)", file=sys.stderr)
        return 77
    sys.path.insert(0, str(REPO))
    from tests.e2e.harness import AGENT1, Installation

    # SIGTERM too must tear the installation down (users' sudoers drop-in, daemon, servers)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))

    inst = Installation()
    try:
        inst.install()
        inst.start_http()
        inst.start_daemon()
        print(f"staging: installation at {inst.root}, agent {AGENT1}", flush=True)
        if keep:
            print("staging: --keep: press Ctrl-C to tear it down", flush=True)
            try:
                while True:
                    signal.pause()
            except KeyboardInterrupt:
                return 0
        cmd = [sys.executable, str(HERE / script), "--root", inst.root, "--agent", AGENT1, *extra]
        return subprocess.run(cmd, check=False).returncode
    finally:
        inst.teardown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
