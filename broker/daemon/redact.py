"""Replace every secret the broker knows, in its common encodings, before it leaves.

Known secrets are the values of each server's env file and of its injected
headers. Each is searched for as is, URL-encoded, hex, and base64 (standard
and URL-safe, at all three byte alignments, so a secret inside a longer
encoded blob is still found), and replaced by ``[REDACTED:name]`` in result
text, content blocks, structured content and error messages.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import quote, quote_plus

#: shorter values would redact ordinary words; `check` warns about them
MIN_SECRET_LENGTH = 6


def _base64_forms(value: bytes) -> set[str]:
    """Substrings that appear in any base64 stream that contains ``value``."""
    forms: set[str] = set()
    for shift in range(3):
        padded = b"\0" * shift + value
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(padded).decode().rstrip("=")
            # drop characters that also depend on bytes before or after the value
            start = (shift * 8 + 5) // 6 if shift else 0
            end = (len(padded) * 8) // 6
            core = text[start:end]
            if len(core) >= MIN_SECRET_LENGTH:
                forms.add(core)
    return forms


def encodings(value: str) -> set[str]:
    raw = value.encode()
    forms = {value, quote(value, safe=""), quote_plus(value), quote(value), raw.hex(), raw.hex().upper()}
    forms |= _base64_forms(raw)
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


class Redactor:
    """Redacts a fixed set of named secrets; cheap when there are none."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.names: dict[str, str] = {}
        for name, value in secrets.items():
            if len(value) < MIN_SECRET_LENGTH:
                continue
            for form in encodings(value):
                # longest name wins nothing; first registration keeps its name
                self.names.setdefault(form, name)
        forms = sorted(self.names, key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(f) for f in forms)) if forms else None

    def text(self, value: str) -> str:
        if self._re is None:
            return value
        return self._re.sub(lambda m: f"[REDACTED:{self.names[m.group(0)]}]", value)

    def deep(self, value: Any) -> Any:
        """Redact every string (keys included) inside a JSON-like value."""
        if self._re is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.deep(v) for v in value]
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.deep(v) for k, v in value.items()}
        return value
