"""The audit trail's copy that leaves the box: RFC 5424 messages to a syslog socket.

One datagram per record, never blocking a call and never failing one: with no
listener, or a full queue, the copy is dropped and counted; the file stays the
record of truth.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from broker.daemon.audit.chain import canonical, timestamp

log = logging.getLogger("mcp-brokerd.audit")

#: RFC 5424 structured-data id; 32473 is the private enterprise number reserved for examples (RFC 5612)
SD_ID = "mcp-privsep@32473"
SYSLOG_FACILITIES = {
    "kern": 0,
    "user": 1,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "authpriv": 10,
    **{f"local{i}": 16 + i for i in range(8)},
}
#: severity by decision; anything else is "notice"
_SEVERITY = {
    "allow": 6,
    "pending": 6,
    "approved": 6,
    "pin": 6,
    "unfreeze": 6,
    "rotate": 6,
    "deny": 4,
    "rejected": 4,
    "usage": 4,
    "freeze": 4,
    "config_error": 3,
    "unavailable": 3,
    "error": 3,
    "recover": 3,
}
SYSLOG_MAX_BYTES = 8192


def _sd_escape(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    text = "".join(ch if ch >= " " and ch != "\x7f" else " " for ch in str(value))
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(value: str, limit: int) -> str:
    token = "".join(ch for ch in value if "!" <= ch <= "~")[:limit]
    return token or "-"


#: record fields copied into the structured data, in this order
SD_FIELDS = (
    "seq",
    "id",
    "caller",
    "uid",
    "op",
    "verb",
    "tool",
    "decision",
    "rule",
    "mode",
    "exit",
    "outcome",
    "duration_ms",
    "arg_keys",
    "args_size",
    "args_digest",
    "result_size",
    "approval",
    "hash",
)


def format_syslog(
    record: dict[str, Any],
    facility: int,
    hostname: str,
    app: str = "mcp-brokerd",
    procid: int | None = None,
    limit: int = SYSLOG_MAX_BYTES,
) -> bytes:
    """One RFC 5424 message: the key fields as structured data, the whole record as MSG.

    ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID [mcp-privsep@32473 k="v" ...] {json}``.
    A message over ``limit`` bytes drops argument values and shortens the reason
    in MSG (``"msg_truncated": true``); the structured data is always complete.
    """
    severity = _SEVERITY.get(str(record.get("decision")), 5)
    pri = facility * 8 + severity
    params = " ".join(
        f'{key}="{_sd_escape(record[key])}"' for key in SD_FIELDS if key in record and record[key] is not None
    )
    head = (
        f"<{pri}>1 {record.get('ts') or timestamp()} {_header_token(hostname, 255)} {_header_token(app, 48)} "
        f"{os.getpid() if procid is None else procid} {_header_token(str(record.get('op') or ''), 32)} "
        f"[{SD_ID} {params}] "
    ).encode("utf-8", "replace")
    body = canonical(record).encode("utf-8", "replace")
    if len(head) + len(body) > limit:
        short = {k: v for k, v in record.items() if k != "args"}
        if isinstance(short.get("reason"), str):
            short["reason"] = short["reason"][:256]
        short["msg_truncated"] = True
        body = canonical(short).encode("utf-8", "replace")
        if len(head) + len(body) > limit:
            minimal = {k: short[k] for k in (*SD_FIELDS, "ts", "prev") if k in short} | {"msg_truncated": True}
            body = canonical(minimal).encode("utf-8", "replace")
    return head + body


class SyslogMirror:
    """Copies records to a syslog socket (``/dev/log``); never blocks, never raises.

    A missing socket, a full receive queue or any other error drops the copy
    and counts it (``dropped``); the file is the record of truth.
    """

    def __init__(self, address: str, facility: str = "authpriv", hostname: str | None = None) -> None:
        self.address = address
        self.facility = SYSLOG_FACILITIES[facility]
        self.hostname = hostname or socket.gethostname()
        self.sent = 0
        self.dropped = 0
        #: why the last copy was dropped ("" once one is sent again), for status
        self.last_error = ""
        self._sock: socket.socket | None = None

    def send(self, record: dict[str, Any]) -> bool:
        try:
            message = format_syslog(record, self.facility, self.hostname)
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except (OSError, ValueError) as exc:
            self.dropped += 1
            self.last_error = f"{self.address}: {exc}"
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit syslog copy dropped (%d so far): %s: %s", self.dropped, self.address, exc)
            return False
        self.sent += 1
        self.last_error = ""
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
