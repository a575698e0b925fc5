"""The daemon's life cycle and the admin commands, for real."""

from __future__ import annotations

import os
import subprocess
import time

from tests.e2e.harness import BROKERD, PYTHON, Installation


def test_second_daemon_reports_already_running(live: Installation) -> None:
    for mode in ("--foreground", "--daemon"):
        proc = subprocess.run([BROKERD, "--root", live.root, mode], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and "already running" in proc.stderr, proc
    assert live.mcp("call", "demo.echo", "text=ok").code == 0


def test_daemon_killed_gate_answers_69_at_once_then_daemonized_restart(live: Installation) -> None:
    assert live.daemon is not None
    live.daemon.kill()
    live.daemon.wait()
    live.daemon = None
    assert os.path.exists(live.paths.pidfile)  # stale pid file left by SIGKILL
    started = time.monotonic()
    r = live.mcp("call", "demo.echo", "text=x")
    assert r.code == 69 and "broker unavailable" in r.err and r.err.count("\n") == 1
    assert time.monotonic() - started < 5
    assert live.ctl("status").code == 69
    # python-daemon mode: the launcher returns once the daemon serves, despite the stale pid file
    proc = subprocess.run([BROKERD, "--root", live.root, "--daemon"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "started" in proc.stdout, proc
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and live.mcp("call", "demo.echo", "text=y").code != 0:
            time.sleep(0.2)
        assert live.mcp("call", "demo.echo", "text=y").out == "y\n"
        with open(live.paths.pidfile) as fh:
            pid = int(fh.read())
        with open(f"/proc/{pid}/status") as fh:
            uid_line = next(ln for ln in fh if ln.startswith("Uid:"))
        import pwd

        assert int(uid_line.split()[1]) == pwd.getpwnam("mcp-broker").pw_uid
    finally:
        assert live.ctl("stop").code == 0
    live.start_daemon()


def test_check_and_status_exit_codes(live: Installation) -> None:
    assert live.ctl("check").code == 0
    assert live.ctl("status").code == 0
    live.set_allowlist("demo.echo\nbad line here\n")
    r = live.ctl("check")
    assert r.code == 1 and f"{live.paths.allowlist}:2:" in r.err


def test_config_error_is_one_clear_line_with_location(live: Installation) -> None:
    bad = f"{live.paths.servers_d}/bad.toml"
    with open(bad, "w") as fh:
        fh.write('[servers.demo]\ncommand = "/bin/true"\n')
    try:
        r = live.ctl("check")
        assert r.code == 1 and "servers.demo" in r.err and "already defined" in r.err and bad in r.err
        r = live.ctl("reload")
        assert r.code == 78
        # the config on disk is broken: calls fail closed, saying where, until it is fixed (no reload needed)
        r = live.mcp("call", "demo.echo", "text=kept")
        assert r.code == 78 and f"{bad}:1:1: servers.demo: already defined" in r.err, r
    finally:
        os.unlink(bad)
    assert live.mcp("call", "demo.echo", "text=kept").out == "kept\n"


def test_reload_adds_and_removes_servers(live: Installation) -> None:
    extra = f"{live.paths.servers_d}/extra.toml"
    with open(extra, "w") as fh:
        fh.write(f'[servers.demo2]\ncommand = "{PYTHON}"\nargs = ["-m", "mcp_servers.demo"]\n')
    os.chmod(extra, 0o644)
    try:
        demo_pids = live.server_pids()
        r = live.ctl("reload")
        assert r.code == 0 and "demo2" in r.out
        live.set_allowlist("demo.echo\ndemo2.echo\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and live.mcp("call", "demo2.echo", "text=new").code != 0:
            time.sleep(0.2)
        assert live.mcp("call", "demo2.echo", "text=new").out == "new\n"
        assert set(demo_pids) <= set(live.server_pids())  # unchanged server kept its session
    finally:
        os.unlink(extra)
    assert live.ctl("reload").code == 0
    assert live.mcp("call", "demo2.echo", "text=gone").code == 69
