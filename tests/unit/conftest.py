"""Shared helpers for the unit tests.

The repository root is put on ``sys.path`` by ``tests/conftest.py``; this
file only adds what several unit-test modules need: a marker for tests that
must create root-owned files, and a fresh root-owned temporary tree.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

IS_ROOT = os.geteuid() == 0

#: Tests that need files owned by root (the allowlist loader fails closed on
#: anything else) or need to chown a file to another uid.
needs_root = pytest.mark.skipif(
    not IS_ROOT,
    reason="needs root: the allowlist loader only accepts root-owned files, and the test chowns files to uid 65534",
)

#: An unprivileged uid used to make a file "not owned by root".
NOBODY_UID = 65534


@pytest.fixture
def tmp_root() -> Iterator[str]:
    """A fresh directory (mode 0755, owned by whoever runs the tests)."""
    path = tempfile.mkdtemp(prefix="mcp-privsep-unit-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(path: str, data: bytes | str, mode: int = 0o644) -> str:
    """Write ``data`` to ``path`` (creating parents 0755) and chmod it."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path
