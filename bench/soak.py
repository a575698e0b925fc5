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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, BenchError, Target, machine_info, terminate_as_exit, tree_rss, versions
from workers import aggregate, collect, go, start_workers

#: memory counts as flat when it grows less than this after warm-up ...
FLAT_KIB = 4096
#: ... or less than this fraction of the baseline, whichever is larger
FLAT_FRACTION = 0.03


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
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    ok = calls["errors"] == 0 and bool(memory.get("flat")) and alive
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
    print(f"soak: daemon {'alive' if alive else 'DEAD'}; {'PASS' if ok else 'FAIL'}; JSON: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
