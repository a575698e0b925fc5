"""``servers.log`` and ``mcp-brokerd.log`` rotate by size (issue 16).

``servers.log`` (the stdio servers' stderr, through :func:`logs.server_sink`)
becomes ``servers.log.1`` ... ``.N`` beyond ``servers_log_max_bytes``, with
the limits of the running config (so a reload applies), and its lines are
still redacted. The detached daemon's own log rotates under its logging
handler, the stream object staying valid.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Iterator

import pytest

from broker.core.paths import Paths
from broker.daemon import logs
from broker.daemon.config import BrokerSettings


@pytest.fixture
def logdir(tmp_root: str) -> str:
    path = os.path.join(tmp_root, "log")
    os.mkdir(path, 0o700)
    return path


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def test_servers_log_rotates_by_size_and_keeps_n(logdir: str) -> None:
    path = f"{logdir}/servers.log"
    errlog = logs.open_server_log(path, lambda: (1000, 2))
    sink = logs.server_sink("demo", errlog, lambda text: text.replace("s3cret", "[REDACTED]"))
    for i in range(100):
        sink(f"line {i:03d} token=s3cret")
    names = sorted(os.listdir(logdir))
    assert names == ["servers.log", "servers.log.1", "servers.log.2"]
    for name in names:
        assert 0 < os.path.getsize(f"{logdir}/{name}") <= 1000
        assert os.stat(f"{logdir}/{name}").st_mode & 0o777 == 0o600
    text = read(f"{path}.2") + read(f"{path}.1") + read(path)
    assert "s3cret" not in text and text.count("[REDACTED]") == text.count("\n")
    numbers = [int(line.split("line ")[1][:3]) for line in text.splitlines()]
    assert numbers == list(range(numbers[0], 100))  # the newest lines, in order, none lost in the kept files
    assert numbers[0] > 0  # the oldest went


def test_servers_log_limits_are_read_at_each_write(logdir: str) -> None:
    path = f"{logdir}/servers.log"
    limits = [0, 3]
    errlog = logs.open_server_log(path, lambda: (limits[0], limits[1]))
    for _ in range(50):
        errlog.write("x" * 99 + "\n")
    assert os.listdir(logdir) == ["servers.log"]  # 0: never
    limits[:] = [500, 0]
    errlog.write("after\n")
    assert os.listdir(logdir) == ["servers.log"] and read(path) == "after\n"  # keep 0: only the live file
    errlog.close()
    with pytest.raises(ValueError):
        errlog.write("closed\n")


def test_open_errlog_follows_the_running_settings(tmp_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.daemon import service

    monkeypatch.setattr(logs, "_limits", logs.default_limits)
    paths = Paths(tmp_root)
    os.makedirs(paths.log, 0o700)
    holder = types.SimpleNamespace(settings=BrokerSettings(servers_log_max_bytes=300, servers_log_keep=1))
    errlog = service.open_errlog(paths, lambda: holder.settings)
    for _ in range(20):
        errlog.write("y" * 49 + "\n")
    assert sorted(os.listdir(paths.log)) == ["servers.log", "servers.log.1"]
    holder.settings = BrokerSettings(servers_log_max_bytes=300, servers_log_keep=3)  # a reload
    for _ in range(40):
        errlog.write("y" * 49 + "\n")
    assert sorted(os.listdir(paths.log)) == ["servers.log", "servers.log.1", "servers.log.2", "servers.log.3"]
    assert logs._limits() == (300, 3)  # the daemon's own log follows the same settings
    assert BrokerSettings().servers_log_max_bytes == logs.MAX_BYTES == 8 * 1024 * 1024
    assert BrokerSettings().servers_log_keep == logs.KEEP == 3


def test_open_errlog_falls_back_to_stderr(tmp_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.daemon import service

    monkeypatch.setattr(logs, "_limits", logs.default_limits)
    assert service.open_errlog(Paths(tmp_root)) is sys.stderr  # no log directory


@pytest.fixture
def daemon_log(logdir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logging.Logger, str]]:
    path = f"{logdir}/mcp-brokerd.log"
    fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - as the detached daemon opens it
    handler = logging.StreamHandler(fh)
    logger = logging.getLogger("test-log-rotation")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])  # what install() looks at
    monkeypatch.setattr(logs, "_limits", lambda: (2000, 2))
    try:
        yield logger, path
    finally:
        logger.removeHandler(handler)
        fh.close()


def test_the_daemon_log_rotates_under_its_handler(daemon_log: tuple[logging.Logger, str], logdir: str) -> None:
    logger, path = daemon_log
    logs.install(lambda text: text.replace("hunter2", "***"))
    logs.install(lambda text: text)  # installed twice: still one rotation filter
    handler = logging.getLogger().handlers[0]
    assert handler in logger.handlers
    assert sum(isinstance(f, logs.RotatingStream) for f in handler.filters) == 1
    for i in range(200):
        logger.info("message %03d password=hunter2", i)
    assert sorted(os.listdir(logdir)) == ["mcp-brokerd.log", "mcp-brokerd.log.1", "mcp-brokerd.log.2"]
    for name in os.listdir(logdir):
        assert os.path.getsize(f"{logdir}/{name}") <= 2200
    last = read(path)
    assert "message 199" in last and "hunter2" not in last
    text = read(f"{path}.2") + read(f"{path}.1") + last
    numbers = [int(line.split("message ")[1][:3]) for line in text.splitlines()]
    assert numbers == list(range(numbers[0], 200))


def test_only_a_handler_on_a_named_regular_file_rotates(logdir: str) -> None:
    assert logs._file_stream(logging.StreamHandler(sys.stderr)) is None
    assert logs._file_stream(logging.NullHandler()) is None
    with open(f"{logdir}/x.log", "a", encoding="utf-8") as fh:
        found = logs._file_stream(logging.StreamHandler(fh))
        assert found is not None and found[1] == f"{logdir}/x.log"
