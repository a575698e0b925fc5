"""Soak test (not run in CI): 32 agent processes calling for minutes; 0 errors, memory flat.

``python bench/soak.py [--duration S] [--workers N] [--root R --agent USER]``
starts N agent processes (as in ``bench.py``'s concurrency test) that call
``mcp call demo.echo`` in a loop for S seconds, samples the resident memory
of the daemon and its children every few seconds, and reports errors,
throughput over time, latency, and whether memory stayed flat: after a
warm-up (the first fifth of the run), the growth from the first to the last
samples and the fitted slope must stay under a small threshold. It exits 0
only with 0 errors and flat memory, and writes
``bench/results/soak-latest.json``.

``--stuck N`` adds a hostile neighbour: the agent ``mcp-bench-attacker``
(created and installed as in ``neighbours.py``) keeps N stalled ``mcp
stdio`` sessions (each fed 16 ``demo.big`` calls of 450,000 bytes, its
stdout never read) open the whole time, so back-pressure, not the session
cap, is what holds. That needs the attacker's cap raised above N: the
operator adds ::

    [limits."mcp-bench-attacker"]
    max_sessions = 250

to ``/etc/mcp-privsep/broker.toml`` and runs ``mcp-brokerctl reload``; with
``--raise-cap`` the soak writes that table itself (cap N + 50), reloads, and
puts the file back (and reloads) afterwards. The soak's 32 workers are all
the bench's own agent, more than its default caps (16 sessions, 16 calls in
flight), so ``--raise-cap`` raises those for it too (workers + 16), and
without it the operator raises them in ``[limits."AGENT"]`` as well. With stuck sessions the run
also needs the daemon's own RSS (max) within its idle RSS + 64 MiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import (
    RESULTS,
    BenchError,
    Target,
    machine_info,
    terminate_as_exit,
    tree_rss,
    versions,
    vmrss_kb,
    write_file,
)
from neighbours import Hostile, daemon_pid, ensure_attacker, session_cap
from workers import aggregate, collect, go, start_workers

#: memory counts as flat when it grows less than this after warm-up ...
FLAT_KIB = 4096
#: ... or less than this fraction of the baseline, whichever is larger
FLAT_FRACTION = 0.03
#: with --stuck, the daemon's own RSS may grow this much over its idle RSS
RSS_BOUND_KIB = 64 * 1024


def slope_kib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) points, in KiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var * 60


def verdict(samples: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Is memory flat after the warm-up? Growth, slope and the threshold used."""
    warm = [s for s in samples if s["t"] >= duration * 0.2]
    if len(warm) < 4:
        return {"flat": None, "reason": "too few samples after warm-up (run longer)"}
    k = max(1, len(warm) // 5)
    first = sum(s["total_kib"] for s in warm[:k]) / k
    last = sum(s["total_kib"] for s in warm[-k:]) / k
    growth = last - first
    slope = slope_kib_per_min([(s["t"], s["total_kib"]) for s in warm])
    threshold = max(FLAT_KIB, FLAT_FRACTION * first)
    projected = slope * (warm[-1]["t"] - warm[0]["t"]) / 60
    flat = growth < threshold and projected < threshold
    return {
        "flat": flat,
        "baseline_kib": round(first),
        "final_kib": round(last),
        "growth_kib": round(growth),
        "slope_kib_per_min": round(slope, 1),
        "threshold_kib": round(threshold),
    }


def throughput_series(results: list[dict[str, Any]], started: float, interval: float) -> list[float]:
    ends = sorted(x for r in results for x in r["ends"])
    if not ends:
        return []
    buckets = int((ends[-1] - started) // interval) + 1
    counts = [0] * buckets
    for e in ends:
        counts[int((e - started) // interval)] += 1
    return [round(c / interval, 1) for c in counts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/")
    p.add_argument("--agent", default="moltbot")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of calling (default 180)")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--out", default=str(RESULTS / "soak-latest.json"))
    p.add_argument("--stuck", type=int, default=0, help="stalled mcp stdio sessions of a second agent (e.g. 200)")
    p.add_argument(
        "--raise-cap",
        action="store_true",
        help='write [limits."mcp-bench-attacker"] max_sessions into broker.toml for the run (restored after)',
    )
    ns = p.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root", file=sys.stderr)
        return 77
    terminate_as_exit()
    try:
        t = Target(ns.root, ns.agent)
        pid = t.daemon_pid()
        r = t.mcp("call", "demo.echo", "text=hi")
        if r.code != 0:
            raise BenchError(f"mcp call demo.echo as {t.agent} fails (exit {r.code}): {r.err.strip()}")
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 69
    saved: bytes | None = None
    hostile: Hostile | None = None
    stuck: dict[str, Any] = {}
    try:
        if ns.stuck:
            attacker = ensure_attacker(t)
            cap = session_cap(t, attacker.agent)
            if cap < ns.stuck:
                if not ns.raise_cap:
                    print(
                        f"soak: {attacker.agent}'s session cap is {cap} < --stuck {ns.stuck}: add "
                        f'[limits."{attacker.agent}"] max_sessions = {ns.stuck + 50} to {t.paths.broker_toml} '
                        "and run 'mcp-brokerctl reload' (or pass --raise-cap)",
                        file=sys.stderr,
                    )
                    return 64
                caps = {attacker.agent: {"max_sessions": ns.stuck + 50}}
                if session_cap(t, t.agent) < ns.workers:  # the normal agents' own processes need room too
                    caps[t.agent] = {"max_sessions": ns.workers + 16, "max_calls_in_flight": ns.workers + 16}
                saved = _raise_cap(t, caps)
                cap = session_cap(t, attacker.agent)
            pid = daemon_pid(t)
            idle = vmrss_kb(pid)
            print(f"soak: {ns.stuck} stuck sessions of {attacker.agent} (cap {cap}) ...", file=sys.stderr, flush=True)
            hostile = Hostile(attacker, ns.stuck, flooders=0)
            hostile.start()
            stuck = {"attacker": attacker.agent, "sessions": ns.stuck, "cap": cap, "held": hostile.held}
            stuck["daemon_idle_kib"] = idle
        return _soak(ns, t, pid, stuck)
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        if hostile is not None:
            hostile.stop()
        if saved is not None:
            _restore_cap(t, saved)


def _raise_cap(t: Target, caps: dict[str, dict[str, int]]) -> bytes:
    """Append ``[limits."AGENT"] max_sessions = CAP`` tables to broker.toml and reload; return the original."""
    path = t.paths.broker_toml
    with open(path, "rb") as fh:
        saved = fh.read()
    st = os.stat(path)
    extra = "\n# mcp-bench soak --raise-cap (removed after the run)\n"
    for agent, table in caps.items():
        extra += f'[limits."{agent}"]\n' + "".join(f"{k} = {v}\n" for k, v in table.items())
    write_file(path, saved.decode() + extra, st.st_uid, st.st_gid, st.st_mode & 0o7777)
    try:
        _reload(t)
    except BenchError:
        _restore_cap(t, saved)
        raise
    return saved


def _restore_cap(t: Target, saved: bytes) -> None:
    st = os.stat(t.paths.broker_toml)
    write_file(t.paths.broker_toml, saved.decode(), st.st_uid, st.st_gid, st.st_mode & 0o7777)
    _reload(t)


def _reload(t: Target) -> None:
    r = subprocess.run([*t.ctl, "reload"], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise BenchError(f"mcp-brokerctl reload failed: {r.stderr.strip() or r.stdout.strip()}")


def _soak(ns: argparse.Namespace, t: Target, pid: int, stuck: dict[str, Any]) -> int:
    print(f"soak: {ns.workers} agents for {ns.duration:g} s against pid {pid} ...", file=sys.stderr, flush=True)
    procs = start_workers(t, ns.workers, duration=ns.duration)
    started = go(procs)
    samples: list[dict[str, Any]] = []
    try:
        while any(p.poll() is None for p in procs):
            rss = tree_rss(pid)
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "total_kib": rss["total_kib"],
                    "daemon_kib": rss["daemon_kib"],
                }
            )
            if len(samples) % 6 == 0:
                print(
                    f"soak: t={samples[-1]['t']:.0f}s rss={rss['total_kib'] / 1024:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            deadline = time.monotonic() + ns.interval
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.2)
        results = collect(procs, timeout=120)
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    alive = os.path.exists(f"/proc/{pid}")
    calls = aggregate(results, started)
    memory = verdict(samples, ns.duration)
    report = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "target": {"root": t.paths.root, "agent": t.agent, "daemon_pid": pid},
        "machine": machine_info(),
        "versions": versions(),
        "workers": ns.workers,
        "duration_s": ns.duration,
        "calls": calls,
        "throughput_per_interval": throughput_series(results, started, ns.interval),
        "memory": memory,
        "memory_samples": samples,
        "daemon_alive": alive,
    }
    if stuck:
        stuck["daemon_max_kib"] = max((s["daemon_kib"] for s in samples), default=0)
        stuck["bound_kib"] = stuck["daemon_idle_kib"] + RSS_BOUND_KIB
        stuck["within_bound"] = stuck["daemon_max_kib"] <= stuck["bound_kib"]
        report["stuck"] = stuck
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    ok = calls["errors"] == 0 and bool(memory.get("flat")) and alive and bool(stuck.get("within_bound", True))
    print(
        f"soak: {calls['calls']} calls by {ns.workers} agents in {calls['elapsed_s']:.0f} s "
        f"({calls['calls_per_s']:.1f}/s), errors {calls['errors']}, latency median {calls.get('median_ms')} ms "
        f"p99 {calls.get('p99_ms')} ms"
    )
    if calls["error_messages"]:
        print(f"soak: first errors: {calls['error_messages']}")
    if memory.get("flat") is None:
        print(f"soak: memory: {memory['reason']}")
    else:
        print(
            f"soak: memory {'flat' if memory['flat'] else 'NOT flat'}: {memory['baseline_kib'] / 1024:.1f} -> "
            f"{memory['final_kib'] / 1024:.1f} MiB (growth {memory['growth_kib']} KiB, slope "
            f"{memory['slope_kib_per_min']} KiB/min, threshold {memory['threshold_kib']} KiB)"
        )
    if stuck:
        print(
            f"soak: {stuck['sessions']} stuck sessions of {stuck['attacker']} (held {stuck['held']}, cap "
            f"{stuck['cap']}): daemon RSS idle {stuck['daemon_idle_kib'] / 1024:.1f} MiB, max "
            f"{stuck['daemon_max_kib'] / 1024:.1f} MiB, bound {stuck['bound_kib'] / 1024:.1f} MiB: "
            f"{'within' if stuck['within_bound'] else 'EXCEEDED'}"
        )
    print(f"soak: daemon {'alive' if alive else 'DEAD'}; {'PASS' if ok else 'FAIL'}; JSON: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
