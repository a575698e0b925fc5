"""Making mcp-privsep's own system accounts: locked, no login shell, a group of their own.

Used by ``mcp-brokerctl install`` (the broker's and the gate users) and by
the spawner (a server's default account, ``mcp-srv-NAME``, the first time
that server starts). Root only; ``useradd`` runs with a clean environment.
"""

from __future__ import annotations

import pwd
import subprocess

from broker.core.errors import EX_FAILED, PrivsepError

NOLOGIN = "/usr/sbin/nologin"
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def run(cmd: list[str]) -> None:
    """Run an account tool; PrivsepError with its message when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_ENV, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrivsepError(f"{cmd[0]}: {exc}", EX_FAILED) from None
    if proc.returncode != 0:
        raise PrivsepError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}", EX_FAILED)


def create_system_user(name: str, home: str, group: str | None = None) -> pwd.struct_passwd:
    """A new locked system user with no login shell (in ``group``, else a group of its own); existing: as is."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    grouping = ["--gid", group] if group is not None else ["--user-group"]
    run(["useradd", "--system", *grouping, "--no-create-home", "--home-dir", home, "--shell", NOLOGIN, name])
    run(["usermod", "--lock", name])
    return pwd.getpwnam(name)
