"""The audit trail: record format and hash chain (``chain``), the writer (``log``), the syslog mirror (``syslog``).

The daemon writes it; ``mcp-brokerctl audit`` reads and verifies it with the
same ``chain`` module. This face only hands the public names on.
"""

from broker.daemon.audit.chain import (
    GENESIS,
    Report,
    args_digest,
    canonical,
    chain_hash,
    head_path,
    load_key,
    log_files,
    new_request_id,
    read_head,
    reverse_lines,
    rotated,
    timestamp,
    unfinished_calls,
    verify,
    verify_files,
    verify_set,
)
from broker.daemon.audit.log import RESERVE_BYTES, RESERVE_LOW, AuditLog, options
from broker.daemon.audit.syslog import SD_ID, SYSLOG_FACILITIES, SYSLOG_MAX_BYTES, SyslogMirror, format_syslog

__all__ = [
    "GENESIS",
    "RESERVE_BYTES",
    "RESERVE_LOW",
    "SD_ID",
    "SYSLOG_FACILITIES",
    "SYSLOG_MAX_BYTES",
    "AuditLog",
    "Report",
    "SyslogMirror",
    "args_digest",
    "canonical",
    "chain_hash",
    "format_syslog",
    "head_path",
    "load_key",
    "log_files",
    "new_request_id",
    "options",
    "read_head",
    "reverse_lines",
    "rotated",
    "timestamp",
    "unfinished_calls",
    "verify",
    "verify_files",
    "verify_set",
]
