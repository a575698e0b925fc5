"""``make bench``: how fast mcp-privsep is, measured side by side in one run.

Run as root on an installation (``/`` after ``make demo``, or a staging root
with ``--root R --agent USER``) whose daemon is up and whose allowlist lets
the agent call ``demo.echo``. It measures, in one run:

- the floor: ``sudo -n -u GATE_USER /usr/bin/python3 -IS -c pass`` (as root, to the agent's own gate user);
- ``mcp call demo.echo text=hi`` as the agent, end to end (interleaved with
  the floor so drift hits both alike);
- calls per second over one ``mcp stdio`` session, driven with raw JSON-RPC
  lines (n/a while the verb is not available), next to the demo server
  spoken to directly as a reference;
- 16 and 32 concurrent agent processes calling in a loop: throughput, p99,
  errors;
- the per-call cost with a 10-line and a 10,000-line allowlist (swapped
  atomically, restored afterwards);
- the daemon's resident memory (itself and its children) with three servers
  connected, and after 10,000 more calls;
- where node and npm exist, the precedent: a sudo'd bash wrapper around
  mcporter 0.12.3, cold and with mcporter's keep-alive daemon;
- where the time of one call goes (``profile_gate.py``);
- a stdio server's start-up through the spawner, sandboxed and with every
  optional protection disabled, next to a plain child process
  (``startup.py``: its own roots and spawners, nothing of the installation);
- a hostile neighbour (``neighbours.py``): a second agent stalls ``mcp stdio``
  sessions up to its session cap and floods calls while the agent calls; the
  agent's p95 against its unloaded p95, the daemon's RSS idle, during and
  after, and the growth of a second such cycle;
- what redaction costs every call (``redaction.py``, in process): a result
  rendered with 20 known secrets beside the same result with none.

It prints a table and the target ratios, and writes everything, with the
machine and the versions, to ``bench/results/latest.json``. Every change it
makes (allowlist, ``servers.d/bench-*.toml``, a sudoers drop-in for the
precedent) is undone on exit, and a run that was killed is cleaned up by the
next one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import (
    RESULTS,
    BenchError,
    GateConnection,
    Target,
    allowlist_text,
    call_message,
    extra_servers,
    machine_info,
    percentile,
    recover,
    spawn_timed,
    summary,
    swapped_allowlist,
    terminate_as_exit,
    tree_rss,
    versions,
)
from neighbours import neighbours, render_lines
from precedent import Precedent
from redaction import redaction
from startup import startup
from stdio_driver import SessionError, StdioSession, find_tool
from workers import run_workers


def floor_argv(t: Target) -> list[str]:
    """The floor of one call: sudo to the agent's own gate user, and an interpreter that does nothing."""
    return ["sudo", "-n", "-u", t.gate_user, "/usr/bin/python3", "-IS", "-c", "pass"]


#: pause before each timed run of two commands measured alternately
SETTLE_SECONDS = 0.2


class Sizes:
    """How much of everything to do; ``--quick`` shrinks it for a smoke run."""

    def __init__(self, quick: bool) -> None:
        q = quick
        self.samples = 40 if q else 200
        self.allowlist_rounds = 2 if q else 20
        self.allowlist_per_round = 10 if q else 20
        self.stdio_sequential = 300 if q else 3000
        self.stdio_pipelined = 500 if q else 9000
        self.stdio_window = 16
        self.stdio_rounds = 3 if q else 9
        self.concurrency = {16: 8 if q else 25, 32: 5 if q else 16}
        self.memory_calls = 1000 if q else 10_000
        self.memory_connections = 8
        self.precedent_cold = 3 if q else 8
        self.precedent_warm = 5 if q else 30
        self.profile_rounds = 10 if q else 40
        self.startup = 3 if q else 15
        self.neighbours = 10 if q else 30


# --- measurements ----------------------------------------------------------------------


def preflight(t: Target) -> dict[str, Any]:
    status = t.status()
    r = t.mcp("call", "demo.echo", "text=hi")
    if (r.code, r.out) != (0, "hi\n"):
        raise BenchError(
            f"'mcp call demo.echo text=hi' as {t.agent} did not work (exit {r.code}: {r.err.strip()}); "
            "the bench needs a running daemon and demo.echo in the agent's allowlist ('make demo')"
        )
    return {"daemon_pid": status["pid"], "servers": [s["name"] for s in status["servers"]]}


def floor_and_call(t: Target, n: int) -> dict[str, Any]:
    """The floor and the agent's call, interleaved one by one."""
    call_argv = [t.paths.mcp, "call", "demo.echo", "text=hi"]
    floor: list[float] = []
    call: list[float] = []
    errors = 0
    floor_cmd = floor_argv(t)
    for _ in range(10):  # warm caches
        spawn_timed(floor_cmd)
        spawn_timed(call_argv, t.agent_pw)
    for _ in range(n):
        ms, code, _ = spawn_timed(floor_cmd)
        if code != 0:
            raise BenchError(f"the floor command exited {code} (is sudo installed, does {t.gate_user} exist?)")
        floor.append(ms)
        ms, code, out = spawn_timed(call_argv, t.agent_pw)
        if code != 0 or out != b"hi\n":
            errors += 1
        call.append(ms)
    return {"floor": summary(floor), "mcp_call": {**summary(call), "errors": errors}}


def allowlist_cost(t: Target, rounds: int, per_round: int) -> dict[str, Any]:
    """Per-call cost with a 10-line and a 10,000-line allowlist.

    End to end: alternating blocks of agent calls (the first call after each
    swap, which re-validates the new file, is reported apart). As a
    cross-check with less noise: for each file, the cold gate's own phases
    (allowlist check; socket round trip, which includes the daemon's check)
    and the gate's and the daemon's check timed in-process (warm).
    """
    from profile_gate import cold_timeline

    from broker.core.allowlist import Cache
    from broker.gate import verbs as gate

    path = t.effective_allowlist()
    texts = {10: allowlist_text(10), 10_000: allowlist_text(10_000)}
    samples: dict[int, list[float]] = {10: [], 10_000: []}
    first: dict[int, list[float]] = {10: [], 10_000: []}
    gate_ms: dict[int, float] = {}
    daemon_ms: dict[int, float] = {}
    cold: dict[int, dict[str, float]] = {}
    errors = 0
    argv = [t.paths.mcp, "call", "demo.echo", "text=hi"]
    with swapped_allowlist(path) as put:
        for lines in (10, 10_000):
            put(texts[lines])
            gate_ms[lines] = _time_in_process(lambda: gate.check_allowlist(t.paths, t.agent, "demo.echo"))
            cache = Cache(t.paths.allowlist, t.paths.allowlist_d)
            daemon_ms[lines] = _time_in_process(lambda c=cache: c.get(t.agent).allows("demo.echo"))  # type: ignore[misc]
            cold[lines] = cold_timeline(t, max(10, rounds * 2))
        for _ in range(rounds):
            for lines in (10, 10_000):
                put(texts[lines])
                for i in range(per_round + 1):
                    ms, code, out = spawn_timed(argv, t.agent_pw)
                    if code != 0 or out != b"hi\n":
                        errors += 1
                    # the first call after a swap re-validates the new file: reported apart
                    (first if i == 0 else samples)[lines].append(ms)
    s10, s10k = summary(samples[10]), summary(samples[10_000])
    return {
        "file": path,
        "bytes": {str(k): len(v) for k, v in texts.items()},
        "10_lines": s10,
        "10000_lines": s10k,
        "first_call_after_swap_median_ms": {str(k): round(percentile(v, 50), 3) for k, v in first.items()},
        "extra_ms": round(s10k["median_ms"] - s10["median_ms"], 3),
        "gate_check_warm_ms": {str(k): v for k, v in gate_ms.items()},
        "daemon_check_warm_ms": {str(k): v for k, v in daemon_ms.items()},
        "in_process_extra_ms": round(gate_ms[10_000] - gate_ms[10] + daemon_ms[10_000] - daemon_ms[10], 3),
        "cold_gate_phases_ms": {str(k): v for k, v in cold.items()},
        "phase_extra_ms": round(
            sum(cold[10_000][k] - cold[10][k] for k in ("allowlist check", "socket round trip (daemon included)")), 3
        ),
        "errors": errors,
    }


def _time_in_process(fn: Callable[[], Any], n: int = 300) -> float:
    fn()
    xs = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - s) * 1000)
    return round(percentile(xs, 50), 4)


def stdio(t: Target, sizes: Sizes, demo_command: list[str]) -> dict[str, Any]:
    """Calls per second over one ``mcp stdio`` session, and the demo server direct for reference.

    Both sessions stay open and take turns, round by round, so drift on the
    machine hits both alike; each figure is the median over the rounds.
    """
    out: dict[str, Any] = {}
    sessions: dict[str, tuple[StdioSession, str]] = {}
    broker = StdioSession([t.paths.mcp, "stdio"], user=t.agent_pw)
    ref = StdioSession(demo_command, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/"})
    try:
        for key, session in (("broker", broker), ("demo_direct", ref)):
            try:
                session.initialize(timeout=30)
                name = find_tool(session.tools(), "demo", "echo")
            except SessionError as exc:
                code = session.close()
                err = session.stderr_tail() or str(exc)
                out[key] = {"available": False, "reason": f"exits {code}: {err}"[:300]}
                continue
            if name is None:
                out[key] = {"available": False, "reason": "no tool for demo.echo"}
                continue
            session.call_sequential(name, 50)  # warm up
            sessions[key] = (session, name)
        runs: dict[str, dict[str, Any]] = {
            k: {"lat": [], "seq_errors": 0, "rates": [], "pipe_errors": 0, "rss_before": _session_rss(s)}
            for k, (s, _n) in sessions.items()
        }
        seq_chunk = max(1, sizes.stdio_sequential // sizes.stdio_rounds)
        pipe_chunk = max(1, sizes.stdio_pipelined // sizes.stdio_rounds)
        for _round in range(sizes.stdio_rounds):
            for key, (session, name) in sessions.items():
                lat, errors = session.call_sequential(name, seq_chunk)
                runs[key]["lat"].extend(lat)
                runs[key]["seq_errors"] += errors
                elapsed, errors = session.call_pipelined(name, pipe_chunk, sizes.stdio_window)
                runs[key]["rates"].append(pipe_chunk / elapsed)
                runs[key]["pipe_errors"] += errors
        for key, (session, name) in sessions.items():
            r = runs[key]
            rss_after = _session_rss(session)
            rates = sorted(r["rates"])
            out[key] = {
                "available": True,
                "tool_name": name,
                # the session's own processes (shim, sudo, gate): growth over the calls shows a leak in the session
                "session_rss_kib": {
                    "before": r["rss_before"],
                    "after": rss_after,
                    "growth": rss_after - r["rss_before"],
                },
                "sequential": {
                    **summary(r["lat"]),
                    "calls_per_s": round(len(r["lat"]) / (sum(r["lat"]) / 1000), 1),
                    "errors": r["seq_errors"],
                },
                "pipelined": {
                    "n": pipe_chunk * len(rates),
                    "window": sizes.stdio_window,
                    "rounds": len(rates),
                    "calls_per_s": round(percentile(rates, 50), 1),
                    "min_calls_per_s": round(rates[0], 1),
                    "max_calls_per_s": round(rates[-1], 1),
                    "errors": r["pipe_errors"],
                },
            }
    finally:
        broker.close()
        ref.close()
    return out


def _session_rss(session: StdioSession) -> int:
    return int(tree_rss(session.proc.pid)["total_kib"])


def concurrency(t: Target, levels: dict[int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workers, per_worker in levels.items():
        out[str(workers)] = run_workers(t, workers, count=per_worker)
    return out


def memory(t: Target, calls: int, connections: int, demo_command: list[str]) -> dict[str, Any]:
    """Daemon RSS (itself + children) with three servers, then after ``calls`` more calls."""
    names = ["bench_a", "bench_b"]
    tools = ["demo.echo", *(f"{n}.echo" for n in names)]
    path = t.effective_allowlist()
    with extra_servers(t, names, demo_command[0], demo_command[1:]), swapped_allowlist(path) as put:
        original = Path(f"{path}.bench-orig").read_text()
        put(original.rstrip("\n") + "\n" + "".join(f"{x}\n" for x in tools[1:]))
        t.wait_servers(["demo", *names])
        pid = t.daemon_pid()
        servers = len(t.status()["servers"])
        _drive_gate_sock(t, tools, 300, connections)  # warm-up: caches, pools, first records
        time.sleep(1.0)
        before = tree_rss(pid)
        started = time.monotonic()
        errors = _drive_gate_sock(t, tools, calls, connections)
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        after = tree_rss(pid)
        if t.daemon_pid() != pid:
            raise BenchError("the daemon restarted during the memory run")
    growth = after["total_kib"] - before["total_kib"]
    return {
        "servers_connected": servers,
        "calls": calls,
        "connections": connections,
        "errors": errors,
        "daemon_only_calls_per_s": round(calls / elapsed, 1),
        "before": before,
        "after": after,
        "growth_kib": growth,
        "daemon_growth_kib": after["daemon_kib"] - before["daemon_kib"],
        "growth_bytes_per_call": round(growth * 1024 / calls, 1),
    }


def _drive_gate_sock(t: Target, tools: list[str], calls: int, connections: int) -> int:
    """``calls`` calls over gate.sock as root (caller = the agent), spread over connections and tools."""
    errors = [0] * connections
    failures: list[str] = []

    def worker(k: int) -> None:
        conn = GateConnection(t)
        try:
            for i in range(k, calls, connections):
                text = f"m{i}"
                try:
                    answer = conn.request(call_message(t, tools[i % len(tools)], text))
                except (OSError, BenchError) as exc:
                    errors[k] += 1
                    failures.append(str(exc))
                    conn.close()
                    conn = GateConnection(t)
                    continue
                result = answer.get("result")
                if not answer.get("ok") or not isinstance(result, dict) or result.get("text") != text:
                    errors[k] += 1
                    failures.append(str(answer.get("error")))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        print(f"  memory run: {len(failures)} failed calls, first: {failures[0]}", file=sys.stderr)
    return sum(errors)


def precedent(t: Target, sizes: Sizes, demo_command: list[str]) -> dict[str, Any]:
    p = Precedent(t, demo_command[0], demo_command[1:])
    why = p.available()
    if why is not None:
        return {"available": False, "reason": why}
    try:
        p.setup()
        r = t.as_agent(p.argv("democold.echo", "text=hi"), timeout=120)
        if r.code != 0 or r.out.strip() != "hi":
            return {"available": False, "reason": f"the wrapper call failed (exit {r.code}): {r.err.strip()[-300:]}"}
        cold = _timed_calls(t, p.argv("democold.echo", "text=hi"), sizes.precedent_cold)
        first_warm = _timed_calls(t, p.argv("demo.echo", "text=hi"), 1)  # starts mcporter's daemon
        # side by side: each keep-alive call is followed by one of ours, so drift hits both alike
        warm, ours = _interleaved_calls(
            t, p.argv("demo.echo", "text=hi"), [t.paths.mcp, "call", "demo.echo", "text=hi"], sizes.precedent_warm
        )
        return {
            "available": True,
            "mcporter": "0.12.3",
            "npm_install_s": round(p.install_seconds, 1),
            "wrapper": p.wrapper,
            "cold": cold,
            "keep_alive_first_call_ms": first_warm["median_ms"],
            "keep_alive": warm,
            "mcp_call_interleaved": ours,
        }
    except BenchError as exc:
        return {"available": False, "reason": str(exc)}
    finally:
        p.close()


def _timed_calls(t: Target, argv: list[str], n: int) -> dict[str, Any]:
    samples: list[float] = []
    errors = 0
    for _ in range(n):
        ms, code, out = spawn_timed(argv, t.agent_pw)
        if code != 0 or out.strip() != b"hi":
            errors += 1
        samples.append(ms)
    return {**summary(samples), "errors": errors}


def _interleaved_calls(t: Target, first: list[str], second: list[str], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``n`` runs of each command, alternating; the summaries of both.

    A pause before each run lets what the previous one left running (node's
    garbage collector, a daemon's bookkeeping) settle, so neither command is
    timed while the other's aftermath still holds a CPU.
    """
    runs: tuple[list[float], list[float]] = ([], [])
    errors = [0, 0]
    for _ in range(n):
        for i, argv in enumerate((first, second)):
            time.sleep(SETTLE_SECONDS)
            ms, code, out = spawn_timed(argv, t.agent_pw)
            if code != 0 or out.strip() != b"hi":
                errors[i] += 1
            runs[i].append(ms)
    return {**summary(runs[0]), "errors": errors[0]}, {**summary(runs[1]), "errors": errors[1]}


def demo_server_command(t: Target) -> list[str]:
    """How the installation runs its demo server (so extra servers and the precedent run the same)."""
    fallback = [sys.executable, "-m", "mcp_servers.demo"]
    try:
        from broker.daemon import config

        server = config.load(t.paths).servers["demo"]
    except Exception as exc:  # noqa: BLE001 - any config trouble: fall back to this interpreter
        print(f"bench: cannot read the demo server's command ({exc}); using {' '.join(fallback)}", file=sys.stderr)
        return fallback
    return [server.spec.command, *server.spec.args] if server.spec.command else fallback


# --- report ------------------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as ratios from this run."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, ok: Callable[[float], bool], note: str = "") -> None:
        out.append(
            {
                "target": name,
                "value": None if value is None else round(value, 3),
                "goal": goal,
                "met": None if value is None else bool(ok(value)),
                "note": note,
            }
        )

    fc = res.get("floor_and_call", {})
    call_med = fc.get("mcp_call", {}).get("median_ms")
    floor_med = fc.get("floor", {}).get("median_ms")
    add(
        "mcp call median / floor",
        call_med / floor_med if call_med and floor_med else None,
        "<= 1.6",
        lambda v: v <= 1.6,
    )
    pre = res.get("precedent", {})
    warm = pre.get("keep_alive", {}).get("median_ms") if pre.get("available") else None
    alternating = pre.get("mcp_call_interleaved", {}).get("median_ms")
    note = str(pre.get("reason", "not run")) if not warm else ""
    if warm and alternating:
        # a call right after one of mcporter's runs with caches that node has just washed: the harsher view
        note = f"against mcp call timed alternating with mcporter ({alternating:.2f} ms): {warm / alternating:.1f}x"
    add(
        "mcporter keep-alive median / mcp call median",
        warm / call_med if warm and call_med else None,
        ">= 15",
        lambda v: v >= 15,
        note,
    )
    stdio_res = res.get("stdio", {})
    broker = stdio_res.get("broker", {})
    direct = stdio_res.get("demo_direct", {})
    if broker.get("available"):
        seq = broker["sequential"]["calls_per_s"]
        pipe = broker["pipelined"]["calls_per_s"]
        ref = ""
        if direct.get("available"):
            kept = pipe / direct["pipelined"]["calls_per_s"] if direct["pipelined"]["calls_per_s"] else 0.0
            ref = (
                f"; the demo server spoken to directly: {direct['sequential']['calls_per_s']}/s sequential, "
                f"{direct['pipelined']['calls_per_s']}/s pipelined, so the broker keeps {kept:.0%} of it"
            )
        # throughput over one session: the client keeps requests in flight, as MCP clients may
        add(
            f"stdio calls/s (one session, {broker['pipelined']['window']} in flight)",
            pipe,
            ">= 1500",
            lambda v: v >= 1500,
            f"one at a time (latency-bound): {seq}/s{ref}",
        )
    else:
        add(
            "stdio calls/s (one session)",
            None,
            ">= 1500",
            lambda v: v >= 1500,
            str(broker.get("reason", "not run")),
        )
    conc = res.get("concurrency", {}).get("32", {})
    add("errors at 32 concurrent callers", conc.get("errors") if conc else None, "== 0", lambda v: v == 0)
    up = res.get("startup", {})
    if up:
        sb, nosb = up["spawner_answer_sandboxed"]["median_ms"], up["spawner_answer_unsandboxed"]["median_ms"]
        note = (
            f"until initialize answered: {up['sandboxed']['median_ms']:.0f} ms sandboxed, "
            f"{up['unsandboxed']['median_ms']:.0f} ms without, "
            f"{up['plain_process']['median_ms']:.0f} ms as a plain process"
        )
    add(
        "sandbox set-up at server start (ms, spawner's answer)",
        sb - nosb if up else None,
        "< 50",
        lambda v: v < 50,
        note if up else str(res.get("errors", {}).get("startup", "not run")),
    )
    nb = res.get("neighbours", {})
    why = str(res.get("errors", {}).get("neighbours", "not run"))
    add(
        "hostile neighbour: victim p95 loaded / unloaded",
        nb.get("p95_ratio"),
        "<= 3",
        lambda v: v <= 3,
        f"{nb['cycles'][0]['victim']['p95_ms']:.0f} / {nb['unloaded']['p95_ms']:.0f} ms" if nb else why,
    )
    add(
        "hostile neighbour: daemon RSS during - idle (MiB)",
        nb["rss_during_over_idle_kib"] / 1024 if nb else None,
        "<= 64",
        lambda v: v <= 64,
        f"idle {nb['rss_idle_kib'] / 1024:.1f} MiB" if nb else why,
    )
    add(
        "hostile neighbour: second stuck cycle's growth (MiB)",
        nb["second_cycle_growth_kib"] / 1024 if nb else None,
        "< 5",
        lambda v: v < 5,
        "RSS after cycle 2 - after cycle 1" if nb else why,
    )
    red = res.get("redaction")
    big = red["1mib"] if red else None
    add(
        "render of a large result: 20 secrets / none",
        big["with_secrets_ms"] / big["without_ms"] if big else None,
        "<= 5",
        lambda v: v <= 5,
        f"{red['size_bytes'] // 1024} KiB of text and structured content, no secret in it" if red else "",
    )
    al = res.get("allowlist", {})
    add(
        "10,000-line allowlist extra cost (ms)",
        al.get("extra_ms"),
        "< 2",
        lambda v: v < 2,
        f"end to end; from the cold gate's phases: {al['phase_extra_ms']:+.2f} ms" if al else "",
    )
    return out


def _ms(d: dict[str, Any] | None, key: str) -> str:
    if not d or d.get(key) is None:
        return "n/a"
    return f"{d[key]:.2f}"


def render(res: dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    lines = [
        f"mcp-privsep bench  {res['started']}  root {res['target']['root']}  agent {res['target']['agent']}",
        f"machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_mib']} MiB, Linux {m['kernel']} ({m['machine']})",
        f"versions: mcp-privsep {v['mcp_privsep']}, python {v['python_gate']} (gate) / {v['python_bench']} (venv), "
        f"mcp {v['mcp']}, sudo {v['sudo']}, node {v['node']}",
        "",
        f"{'measurement':<58}{'n':>6}{'median':>10}{'p95':>10}{'p99':>10}  other",
    ]

    def row(name: str, d: dict[str, Any] | None, other: str = "") -> None:
        n = str(d.get("n", "")) if d else ""
        lines.append(f"{name:<58}{n:>6}{_ms(d, 'median_ms'):>10}{_ms(d, 'p95_ms'):>10}{_ms(d, 'p99_ms'):>10}  {other}")

    fc = res.get("floor_and_call")
    if fc:
        row("floor: sudo -n -u GATE-USER python3 -IS -c pass (root)", fc["floor"])
        row("mcp call demo.echo text=hi (agent, end to end)", fc["mcp_call"], f"errors {fc['mcp_call']['errors']}")
    else:
        lines.append(f"floor / mcp call: {res.get('errors', {}).get('floor_and_call', 'not run')}")
    al = res.get("allowlist")
    if al:
        row("mcp call with a 10-line allowlist", al["10_lines"])
        row(
            "mcp call with a 10,000-line allowlist",
            al["10000_lines"],
            f"extra {al['extra_ms']:+.2f} ms (cold gate phases: {al['phase_extra_ms']:+.2f} ms; "
            f"warm gate+daemon check: {al['in_process_extra_ms']:+.2f} ms)",
        )
    st = res.get("stdio", {})
    for key, label in (("broker", "mcp stdio session (broker)"), ("demo_direct", "demo server direct (reference)")):
        d = st.get(key)
        if not d:
            continue
        if d.get("available"):
            seq, pipe = d["sequential"], d["pipelined"]
            grow = d.get("session_rss_kib", {}).get("growth")
            note = f", session RSS {grow:+d} KiB over the run" if grow is not None else ""
            row(
                f"{label}: tools/call one at a time",
                seq,
                f"{seq['calls_per_s']:.0f} calls/s, errors {seq['errors']}{note}",
            )
            spread = ""
            if "rounds" in pipe:
                lo, hi = pipe["min_calls_per_s"], pipe["max_calls_per_s"]
                spread = f" (median of {pipe['rounds']} rounds, {lo:.0f}..{hi:.0f})"
            lines.append(
                f"{label + ': ' + str(pipe['window']) + ' in flight':<58}{pipe['n']:>6}{'':>30}  "
                f"{pipe['calls_per_s']:.0f} calls/s{spread}, errors {pipe['errors']}"
            )
        else:
            lines.append(f"{label:<58}{'n/a':>6}  {d.get('reason', '')[:100]}")
    for level, d in res.get("concurrency", {}).items():
        row(
            f"{level} concurrent agents calling in a loop",
            d,
            f"{d['calls_per_s']:.1f} calls/s, errors {d['errors']}",
        )
    mem = res.get("memory")
    if mem:
        lines.append(
            f"{'daemon RSS (+children), ' + str(mem['servers_connected']) + ' servers connected':<58}"
            f"{mem['before']['processes']:>6}{mem['before']['total_kib'] / 1024:>9.1f}M"
            f"{'':>20}  daemon {mem['before']['daemon_kib'] / 1024:.1f} MiB"
        )
        lines.append(
            f"{'  after ' + format(mem['calls'], ',') + ' more calls':<58}{mem['after']['processes']:>6}"
            f"{mem['after']['total_kib'] / 1024:>9.1f}M{'':>20}  growth {mem['growth_kib']} KiB "
            f"({mem['growth_bytes_per_call']} B/call), errors {mem['errors']}, "
            f"{mem['daemon_only_calls_per_s']:.0f} calls/s over gate.sock"
        )
    up = res.get("startup")
    if up:
        for key, label in (
            ("sandboxed", "stdio server start-up, sandboxed (until initialize)"),
            ("unsandboxed", "  ... every optional protection disabled"),
            ("plain_process", "  ... a plain child process of its user"),
            ("spawner_answer_sandboxed", "  spawner's answer to start, sandboxed"),
            ("spawner_answer_unsandboxed", "  spawner's answer to start, protections disabled"),
            ("round_trip_sandboxed", "  a tools/call on its pipes, sandboxed"),
            ("round_trip_unsandboxed", "  a tools/call on its pipes, protections disabled"),
            ("round_trip_plain_process", "  a tools/call on its pipes, plain child process"),
        ):
            row(label, up[key])
    nb = res.get("neighbours")
    if nb:
        lines.extend(render_lines(nb, row))
    red = res.get("redaction")
    if red:
        for key, label in (("small", "a one-line result"), ("1mib", f"a {red['size_bytes'] // 1024} KiB result")):
            lines.append(
                f"{'redaction of ' + label + ', ' + str(red['secrets']) + ' secrets / none':<58}"
                f"{red[key]['with_secrets_ms']:>9.3f} ms / {red[key]['without_ms']:.3f} ms"
            )
    pre = res.get("precedent")
    if pre:
        if pre.get("available"):
            row("precedent: sudo bash wrapper + mcporter 0.12.3, cold", pre["cold"], f"errors {pre['cold']['errors']}")
            row(
                "precedent: ... with mcporter's keep-alive daemon",
                pre["keep_alive"],
                f"errors {pre['keep_alive']['errors']}, first call {pre['keep_alive_first_call_ms']:.0f} ms",
            )
            if "mcp_call_interleaved" in pre:
                ours = pre["mcp_call_interleaved"]
                row("  mcp call demo.echo, alternating with the row above", ours, f"errors {ours['errors']}")
        else:
            lines.append(f"{'precedent (mcporter)':<58}{'n/a':>6}  {pre.get('reason', '')[:120]}")
    if res.get("errors"):
        lines.append("")
        for name, err in res["errors"].items():
            lines.append(f"section {name} failed: {err}")
    lines += ["", "targets (ratios from this run):"]
    for tg in res["targets"]:
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[tg["met"]]
        value = "n/a" if tg["value"] is None else f"{tg['value']:g}"
        note = f"  ({tg['note']})" if tg["note"] else ""
        lines.append(f"  {tg['target']:<50} {value:>10}   target {tg['goal']:<8} {verdict}{note}")
    if res.get("profile"):
        from profile_gate import render as render_profile

        lines += ["", render_profile(res["profile"])]
    lines += ["", f"JSON: {res['json_path']}   ({res['duration_s']:.0f} s)"]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/", help="installation root (default /, as after 'make demo')")
    p.add_argument("--agent", default="moltbot", help="agent user (default moltbot)")
    p.add_argument("--quick", action="store_true", help="small sample counts (a smoke run, not a measurement)")
    p.add_argument("--skip", action="append", default=[], help="skip a section (repeatable): " + ", ".join(SECTIONS))
    p.add_argument("--out", default=str(RESULTS / "latest.json"), help="where to write the JSON results")
    ns = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (it spawns processes as the agent and swaps the allowlist)", file=sys.stderr)
        return 77
    terminate_as_exit()
    try:
        t = Target(ns.root, ns.agent)
        recover(t, lambda msg: print(f"bench: {msg}", file=sys.stderr))
        pre = preflight(t)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 69
    sizes = Sizes(ns.quick)
    demo_command = demo_server_command(t)
    started = time.monotonic()
    res: dict[str, Any] = {
        "schema": 1,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "quick": ns.quick,
        "target": {"root": t.paths.root, "agent": t.agent, **pre},
        "machine": machine_info(),
        "versions": versions(),
        "errors": {},
    }
    plan: dict[str, Callable[[], Any]] = {
        "floor_and_call": lambda: floor_and_call(t, sizes.samples),
        "profile": lambda: _profile(t, sizes.profile_rounds),
        "allowlist": lambda: allowlist_cost(t, sizes.allowlist_rounds, sizes.allowlist_per_round),
        "stdio": lambda: stdio(t, sizes, demo_command),
        "concurrency": lambda: concurrency(t, sizes.concurrency),
        "memory": lambda: memory(t, sizes.memory_calls, sizes.memory_connections, demo_command),
        "precedent": lambda: precedent(t, sizes, demo_command),
        "startup": lambda: startup(sizes.startup),
        "neighbours": lambda: neighbours(t, sizes.neighbours),
        "redaction": lambda: redaction(3 if ns.quick else 20),
    }
    for name, fn in plan.items():
        if name in ns.skip:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others; it is reported
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=3, file=sys.stderr)
        res.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
    res["targets"] = targets(res)
    res["duration_s"] = round(time.monotonic() - started, 1)
    out = Path(ns.out)
    res["json_path"] = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(render(res))
    return 1 if res["errors"] else 0


def _profile(t: Target, rounds: int) -> dict[str, Any]:
    from profile_gate import profile

    return profile(t, rounds)


SECTIONS = (
    "floor_and_call",
    "profile",
    "allowlist",
    "stdio",
    "concurrency",
    "memory",
    "precedent",
    "startup",
    "neighbours",
    "redaction",
)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
