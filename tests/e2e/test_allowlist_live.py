"""Allowlist edits take effect on the next call; broken files deny everything (78)."""

from __future__ import annotations

import os
import pwd

from tests.e2e.harness import AGENT1, AGENT2, Installation


def test_edit_takes_effect_without_restart(live: Installation) -> None:
    assert live.daemon is not None
    pid = live.daemon.pid
    assert live.mcp("call", "demo.echo", "text=a").code == 0
    live.set_allowlist("demo.whoami\n")
    r = live.mcp("call", "demo.echo", "text=a")
    assert r.code == 77 and "not in the allowlist" in r.err
    live.set_allowlist("demo.whoami\ndemo.echo\n")
    assert live.mcp("call", "demo.echo", "text=b").out == "b\n"
    assert live.daemon.pid == pid and live.daemon.poll() is None


def test_in_place_edit_same_size_is_noticed(live: Installation) -> None:
    # rewriting the file in place (same inode, same size) must still be seen
    live.set_allowlist("demo.echo\n")
    with open(live.paths.allowlist, "r+", encoding="utf-8") as fh:
        fh.write("demo.eche\n")
    assert live.mcp("call", "demo.echo", "text=a").code == 77


def test_syntax_error_denies_everything_naming_file_and_line(live: Installation) -> None:
    live.set_allowlist("demo.echo\n# fine\ndemo.*\n")
    for argv in (["call", "demo.echo", "text=a"], ["list"], ["describe", "demo.echo"]):
        r = live.mcp(*argv)
        assert r.code == 78, (argv, r)
        assert f"{live.paths.allowlist}:3:6:" in r.err, r.err
        assert r.err.count("\n") == 1 and r.out == ""


def test_group_writable_allowlist_denies_everything(live: Installation) -> None:
    live.set_allowlist("demo.echo\n", mode=0o660)
    r = live.mcp("call", "demo.echo", "text=a")
    assert r.code == 78 and live.paths.allowlist in r.err and "writable" in r.err


def test_allowlist_not_owned_by_root_denies_everything(live: Installation) -> None:
    live.set_allowlist("demo.echo\n")
    os.chown(live.paths.allowlist, pwd.getpwnam("mcp-gate").pw_uid, -1)
    r = live.mcp("call", "demo.echo", "text=a")
    assert r.code == 78 and "owned by root" in r.err


def test_group_writable_directory_denies_everything(live: Installation) -> None:
    d = live.paths.allowlist_d
    os.chmod(d, 0o770)
    try:
        r = live.mcp("call", "demo.echo", "text=a")
        assert r.code == 78 and d in r.err
    finally:
        os.chmod(d, 0o750)


def test_per_user_file_replaces_the_global_one(live: Installation) -> None:
    assert live.mcp("call", "demo.add", "a=1", "b=1", user=AGENT2).out == "2\n"
    assert live.mcp("call", "demo.echo", "text=x", user=AGENT2).code == 77
    assert live.mcp("call", "demo.echo", "text=x").code == 0


def test_daemon_rechecks_even_if_the_gate_were_bypassed(live: Installation) -> None:
    # speak the protocol directly, as the agent's gate user (what a compromised gate could), for a tool it may not use
    from broker.core import wire
    from tests.e2e.harness import gate_exchange, gate_user

    live.set_allowlist("demo.whoami\n")
    answer = gate_exchange(
        gate_user(AGENT1), live.paths.gate_sock, wire.request("call", tool="demo.echo", kv=[["text", "x"]],
                                                                     args=None, timeout=None)
    )  # fmt: skip
    assert answer is not None and answer["ok"] is False and answer["exit"] == 77
    # and a frame naming a caller (protocol 1) is dropped outright: the caller is the peer's uid, nothing else
    answer = gate_exchange(gate_user(AGENT1), live.paths.gate_sock, wire.request("list", caller=AGENT2, uid=0))
    assert answer is None
