"""Concurrent agent processes calling ``mcp call demo.echo`` in a loop.

Each worker is a separate ``/usr/bin/python3 -IS -c`` process running as the
agent user (so nothing in the bench process, its GIL or its fork cost, sits
between the callers and the broker). It waits for a start line on stdin (all
workers start together), spawns ``mcp call demo.echo text=UNIQUE`` with
``posix_spawn`` either ``count`` times or until ``duration`` seconds have
passed, checks every answer, and writes its latencies, completion times
(CLOCK_MONOTONIC, comparable across processes) and errors as JSON on stdout.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from benchlib import AGENT_ENV, BenchError, Target, percentile, summary

WORKER = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])
mcp, wid, count, duration = cfg["mcp"], cfg["worker"], cfg["count"], cfg["duration"]
env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
sys.stdin.readline()
lat, ends, errs = [], [], []
n_err = 0
start = time.monotonic()
i = 0
while (count and i < count) or (duration and time.monotonic() - start < duration):
    text = "w%d-%d" % (wid, i)
    i += 1
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.posix_spawn(mcp, [mcp, "call", "demo.echo", "text=" + text], env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2),
        (os.POSIX_SPAWN_CLOSE, out_r), (os.POSIX_SPAWN_CLOSE, err_r)])
    os.close(out_w); os.close(err_w)
    out = b""
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        out += chunk
    err = os.read(err_r, 4096)
    os.close(out_r); os.close(err_r)
    _, status = os.waitpid(pid, 0)
    t1 = time.monotonic()
    code = os.waitstatus_to_exitcode(status)
    lat.append((t1 - t0) * 1000)
    ends.append(t1)
    if code != 0 or out != (text + "\n").encode():
        n_err += 1
        if len(errs) < 5:
            errs.append("exit %d: %s" % (code, (err or out).decode(errors="replace").strip()[:200]))
json.dump({"lat": lat, "ends": ends, "errors": n_err, "messages": errs, "start": start}, sys.stdout)
"""


def start_workers(target: Target, workers: int, count: int = 0, duration: float = 0) -> list[subprocess.Popen[bytes]]:
    procs = []
    pw = target.agent_pw
    for k in range(workers):
        cfg = json.dumps({"mcp": target.paths.mcp, "worker": k, "count": count, "duration": duration})
        procs.append(
            subprocess.Popen(
                ["/usr/bin/python3", "-IS", "-c", WORKER, cfg],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                user=pw.pw_uid,
                group=pw.pw_gid,
                extra_groups=[],
                env=AGENT_ENV,
                cwd="/",
            )
        )
    time.sleep(0.3)  # let every interpreter reach its start line
    return procs


def go(procs: list[subprocess.Popen[bytes]]) -> float:
    started = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.close()
        p.stdin = None  # so communicate() does not flush it
    return started


def collect(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[dict[str, Any]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise BenchError(f"a worker did not finish within {timeout:g} s") from None
        if p.returncode != 0:
            raise BenchError(f"a worker failed (exit {p.returncode}): {err.decode(errors='replace')[-300:]}")
        results.append(json.loads(out))
    return results


def aggregate(results: list[dict[str, Any]], started: float) -> dict[str, Any]:
    lat = [x for r in results for x in r["lat"]]
    ends = [x for r in results for x in r["ends"]]
    elapsed = (max(ends) - started) if ends else 0.0
    messages = [m for r in results for m in r["messages"]]
    return {
        **summary(lat),
        "workers": len(results),
        "calls": len(lat),
        "errors": sum(int(r["errors"]) for r in results),
        "error_messages": messages[:5],
        "elapsed_s": round(elapsed, 3),
        "calls_per_s": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        "p999_ms": round(percentile(lat, 99.9), 3) if lat else None,
    }


def run_workers(target: Target, workers: int, count: int) -> dict[str, Any]:
    """``workers`` agents, ``count`` calls each, all started together."""
    procs = start_workers(target, workers, count=count)
    started = go(procs)
    return aggregate(collect(procs, timeout=60 + count * 10), started)
