"""The precedent mcp-privsep replaces: a sudo'd bash wrapper around ``mcporter``.

The hand-rolled set-up the homelab community uses: the agent may run one
bash script through sudo as the credential-holding user; the script greps
the tool name in an allowlist and ``exec``s a general MCP CLI (``mcporter``)
with a config naming the servers. mcporter either spawns the server for each
call ("cold") or, with ``"lifecycle": "keep-alive"`` in the server entry
(its README, "Keep MCP servers warm with the daemon"), routes the call
through its per-user daemon that keeps the server session warm.

``Precedent`` installs mcporter 0.12.3 from the npm registry into a scratch
directory (``npm install --prefix``; reused by later runs), writes the
wrapper, its allowlist and mcporter's config there, installs a sudoers
drop-in for the agent (validated by ``visudo -cf``), and removes the drop-in
and stops mcporter's daemon on ``close()``. It calls the same demo echo
server the broker serves, over stdio, as ``mcp-broker``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
from typing import Any

from benchlib import PRECEDENT_SUDOERS, BenchError, Target, write_file

MCPORTER_VERSION = "0.12.3"
#: root-owned and reused across runs; never a world-writable place like /tmp: the agent gets a sudo
#: rule for a script in here, so nobody but root may ever have written to it
SCRATCH = "/var/cache/mcp-privsep-bench"
RUN_AS = "mcp-broker"  # the precedent runs the CLI as the user holding the credentials

WRAPPER = """#!/bin/bash
# The precedent: the agent may run this, and only this, through sudo as {run_as}.
# It checks the tool against an allowlist, then hands everything to a general MCP CLI.
set -euo pipefail
tool="${{1:-}}"
shift || true
grep -qxF -- "$tool" {allow} || {{ echo "denied: $tool" >&2; exit 77; }}
export HOME={home} XDG_STATE_HOME={home}/state XDG_CACHE_HOME={home}/cache MCPORTER_LOG_LEVEL=error
cd "$HOME"
exec {node} {cli} --config {config} call --output text "$tool" "$@"
"""


class Precedent:
    """mcporter behind a sudo'd bash wrapper, set up for one agent; ``close()`` undoes it."""

    def __init__(self, target: Target, server_command: str, server_args: list[str]) -> None:
        self.target = target
        self.node = shutil.which("node") or ""
        self.npm = shutil.which("npm") or ""
        self.dir = f"{SCRATCH}/mcporter-{MCPORTER_VERSION}"
        self.cli = f"{self.dir}/node_modules/mcporter/dist/cli.js"
        self.home = f"{self.dir}/home"
        self.config = f"{self.dir}/mcporter.json"
        self.allow = f"{self.dir}/allowed-actions.txt"
        self.wrapper = f"{self.dir}/mcp-precedent"
        self.server_command = server_command
        self.server_args = server_args
        self.installed_sudoers = False
        self.install_seconds = 0.0

    def available(self) -> str | None:
        """Why the precedent cannot be measured here, or None."""
        if not self.node or not self.npm:
            return "node and npm are not installed"
        return None

    def setup(self) -> None:
        import time

        for d in (os.path.dirname(SCRATCH), SCRATCH, self.dir):
            try:
                os.mkdir(d, 0o700)
                os.chmod(d, 0o755)  # noqa: S103 - mcp-broker runs mcporter from here; only root writes
            except FileExistsError:
                pass
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                raise BenchError(
                    f"{d}: not a root-owned directory closed to others; refusing to put a sudo rule's script there"
                )
        if not self._installed_version_ok():
            started = time.monotonic()
            proc = subprocess.run(
                [
                    self.npm,
                    "install",
                    "--prefix",
                    self.dir,
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    f"mcporter@{MCPORTER_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                cwd=self.dir,
                env=dict(os.environ),  # the operator's npm set-up: registry, proxy, CA certificates
            )
            self.install_seconds = time.monotonic() - started
            if proc.returncode != 0 or not self._installed_version_ok():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise BenchError(f"npm install mcporter@{MCPORTER_VERSION} failed: {' / '.join(tail)}")
            subprocess.run(["chmod", "-R", "a+rX,go-w", self.dir], check=True)
        broker = pwd.getpwnam(RUN_AS)
        shutil.rmtree(self.home, ignore_errors=True)
        os.makedirs(self.home, mode=0o700)
        os.chown(self.home, broker.pw_uid, broker.pw_gid)
        server: dict[str, Any] = {"command": self.server_command, "args": self.server_args}
        config = {
            "mcpServers": {
                "demo": {**server, "lifecycle": "keep-alive"},
                "democold": {**server, "lifecycle": "ephemeral"},
            },
            "imports": [],
        }
        write_file(self.config, json.dumps(config, indent=2) + "\n", 0, 0, 0o644)
        write_file(self.allow, "demo.echo\ndemocold.echo\n", 0, 0, 0o644)
        write_file(
            self.wrapper,
            WRAPPER.format(
                run_as=RUN_AS, allow=self.allow, home=self.home, node=self.node, cli=self.cli, config=self.config
            ),
            0,
            0,
            0o755,
        )
        rule = f"{self.target.agent} ALL=({RUN_AS}) NOPASSWD: {self.wrapper}\n"
        tmp = f"{PRECEDENT_SUDOERS}.tmp"
        write_file(tmp, "# mcp-privsep bench: the mcporter precedent (removed after the run)\n" + rule, 0, 0, 0o440)
        check = subprocess.run(["visudo", "-cf", tmp], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            os.unlink(tmp)
            raise BenchError(f"visudo rejected the precedent's sudoers rule: {check.stdout.strip()}")
        os.replace(tmp, PRECEDENT_SUDOERS)
        self.installed_sudoers = True

    def _installed_version_ok(self) -> bool:
        try:
            with open(f"{self.dir}/node_modules/mcporter/package.json", encoding="utf-8") as fh:
                return bool(json.load(fh).get("version") == MCPORTER_VERSION)
        except (OSError, ValueError):
            return False

    def argv(self, tool: str, *args: str) -> list[str]:
        """What the agent runs."""
        return ["sudo", "-n", "-u", RUN_AS, self.wrapper, tool, *args]

    def close(self) -> None:
        if self.installed_sudoers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(PRECEDENT_SUDOERS)
            self.installed_sudoers = False
        if os.path.exists(self.cli):
            broker = pwd.getpwnam(RUN_AS)
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": self.home,
                "XDG_STATE_HOME": f"{self.home}/state",
                "XDG_CACHE_HOME": f"{self.home}/cache",
            }
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [self.node, self.cli, "--config", self.config, "daemon", "stop"],
                    user=broker.pw_uid,
                    group=broker.pw_gid,
                    extra_groups=[],
                    env=env,
                    cwd=self.home if os.path.isdir(self.home) else "/",
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
