"""What redaction costs the daemon: a result rendered with 20 known secrets beside the same result with none.

In process, with the daemon's own :func:`broker.daemon.results.render_result`:
a small result (what ``demo.echo`` answers) and a 1 MiB one (text blocks and
structured content, the default ``max_output_bytes``), each rendered with a
redactor of 20 secrets (a host with many servers) and with an empty one,
alternating, the median of each. Nothing in the results holds a secret:
this is the cost every call pays, not the cost of a leak.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def _median_ms(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def redaction(rounds: int) -> dict[str, Any]:
    import mcp

    from broker.daemon.redact import Redactor
    from broker.daemon.results import render_result

    secrets = {f"srv{i}.TOKEN": f"tok-{i:02d}-Zq8vR2mX9pL4wK7n" for i in range(20)}
    many, none = Redactor(secrets), Redactor({})
    line = "2026-12-02T01:02:03Z INFO request 0x5f3e handled in 12 ms by worker-7 (cache hit)\n"
    big_text = line * (512 * 1024 // len(line))
    big = mcp.types.CallToolResult(
        content=[mcp.types.TextContent(type="text", text=big_text[i::4]) for i in range(4)],
        structured_content={"rows": [{"id": i, "msg": line.strip(), "n": i * 7} for i in range(3000)]},
    )
    small = mcp.types.CallToolResult(content=[mcp.types.TextContent(type="text", text="hi")])
    cap = 4 << 20
    out: dict[str, Any] = {"secrets": len(secrets), "rounds": rounds}
    for name, result, n in (("small", small, rounds * 50), ("1mib", big, rounds)):
        with_ms: list[float] = []
        without_ms: list[float] = []
        for _ in range(3):  # alternate, so drift hits both
            with_ms.append(_median_ms(lambda r=result: render_result(r, cap, many), n))
            without_ms.append(_median_ms(lambda r=result: render_result(r, cap, none), n))
        out[name] = {
            "with_secrets_ms": round(statistics.median(with_ms), 4),
            "without_ms": round(statistics.median(without_ms), 4),
        }
    out["size_bytes"] = render_result(big, cap, none)[1]
    return out
