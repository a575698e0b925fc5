"""Last of the end-to-end tests: no broker log of any installation the suite made holds a server's secret.

The test servers carry secrets where an HTTP library logs them (a token in
the streamable-HTTP server's URL, a bearer header), the daemon runs at
``--log-level debug``, and every installation is checked when it is torn
down (``Installation.check_logs``); the shared one is checked here, last.
"""

from __future__ import annotations

from tests.e2e.harness import LOG_LEAKS, LOGS_CHECKED, Installation


def test_no_broker_log_holds_a_secret(inst: Installation) -> None:
    assert inst.mcp("call", "web.echo", "text=through the URL with a key").code == 0  # the HTTP client ran
    inst.check_logs()
    assert inst.root in LOGS_CHECKED
    assert LOG_LEAKS == []
