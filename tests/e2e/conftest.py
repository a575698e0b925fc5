"""Fixtures for privileged end-to-end tests (root, sudo, real users, real daemon).

Every test here is marked ``privileged`` and skipped, with the reason, when
it cannot cross the real boundary: not root, or sudo not installed ('make
test' installs it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.e2e.harness import Installation


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "privileged e2e test: needs root (real users, sudo, a real daemon); run 'make test' as root"
    if shutil.which("sudo") is None or shutil.which("visudo") is None:
        return "privileged e2e test: sudo is not installed ('make test' installs it)"
    if shutil.which("runuser") is None:
        return "privileged e2e test: runuser (util-linux) is missing"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.privileged)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def _drop_stale_sudoers() -> None:
    """A test run that was killed leaves its staging root's sudoers drop-in behind: sudo -l would show its rules."""
    import glob
    import re

    for path in glob.glob("/etc/sudoers.d/mcp-privsep-*"):
        try:
            with open(path, encoding="utf-8") as fh:
                roots = set(re.findall(r"(/tmp/mcp-privsep-[A-Za-z0-9_-]+|/srv/mcp-privsep-e2e/root-\w+)/", fh.read()))
        except OSError:
            continue
        if roots and not any(os.path.isdir(r) for r in roots):
            os.unlink(path)


@pytest.fixture(scope="session", autouse=True)
def _clean_machine() -> None:
    if os.geteuid() == 0:
        _drop_stale_sudoers()


@pytest.fixture(scope="session")
def inst() -> Iterator[Installation]:
    """One staging installation with a running daemon, shared by the session."""
    installation = Installation()
    try:
        installation.install()
        installation.start_http()
        installation.start_daemon()
        yield installation
    finally:
        installation.teardown()


@pytest.fixture
def live(inst: Installation) -> Iterator[Installation]:
    """The shared installation, with a daemon that is up and the default allowlist."""
    from tests.e2e.harness import ALLOWLIST

    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    inst.set_allowlist(ALLOWLIST)
    yield inst
    inst.set_allowlist(ALLOWLIST)


@pytest.fixture(scope="module")
def hostile(inst: Installation) -> Iterator[Installation]:
    """The shared installation with the hostile test servers configured (``tests/e2e/servers/hostile.py``)."""
    from tests.e2e.harness import add_hostile_servers

    undo = add_hostile_servers(inst)
    try:
        yield inst
    finally:
        undo()
