"""How a server's sandbox reads for the operator: the lines ``status``, ``tools`` and ``doctor`` print.

From what the server's own process reported to the spawner just before it
executed the server (``status --json`` has it whole, under ``sandbox``).
Its strings (paths, warnings, the account) are shown through
:mod:`broker.admin.screen`, like everything else the admin CLI prints.
"""

from __future__ import annotations

from typing import Any

from broker.admin import screen


def _size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def protections(sandbox: dict[str, Any]) -> list[str]:
    """The protections in force, each a few words."""
    out: list[str] = []
    for key, words in (
        ("pid_namespace", "own pid namespace"),
        ("own_proc", "own /proc"),
        ("private_tmp", "private /tmp"),
        ("system_read_only", "system read-only"),
        ("broker_dirs_hidden", "broker's directories hidden"),
        ("network_namespace", "no network (own namespace)"),
        ("no_new_privs", "no_new_privs, no capabilities"),
    ):
        if sandbox.get(key):
            out.append(words)
    abi = sandbox.get("landlock") or 0
    if abi:
        parts = ["file system"] + (["tcp"] if sandbox.get("landlock_net") else [])
        parts += ["signals and abstract sockets"] if sandbox.get("landlock_scope") else []
        out.append(f"Landlock ABI {abi} ({', '.join(parts)})")
    limits = sandbox.get("rlimits") or {}
    if limits:
        out.append(
            f"limits: memory {_size(limits.get('memory'))}, {limits.get('processes') or 'unlimited'} processes, "
            f"{limits.get('open_files') or 'unlimited'} files, file size {_size(limits.get('file_size'))}"
        )
    if sandbox.get("writable"):
        out.append(f"writes only in {', '.join(screen.text(w) for w in sandbox['writable'])} and its /tmp")
    if sandbox.get("network"):
        out.append(f"network {screen.text(sandbox['network'])}")
    if sandbox.get("command_sha256") == "verified":
        out.append("command sha256 verified")
    return out


def lines(server: dict[str, Any]) -> list[str]:
    """The indented lines under one stdio server of ``status``: who runs it, what protects it, what is missing."""
    if server.get("transport") != "stdio":
        return []
    sandbox = server.get("sandbox") or {}
    if not sandbox:
        return ["  not running: no sandbox report yet"] if server.get("state") != "up" else []
    who = (
        f"  runs as {screen.name(server.get('user'))} (uid {screen.text(sandbox.get('uid'))}), "
        f"sandbox {screen.text(server.get('sandbox_mode', 'auto'))}: "
    )
    out = [who + "; ".join(protections(sandbox))]
    out.extend(f"  WITHOUT {screen.line(w)}" for w in server.get("sandbox_warnings") or [])
    return out
