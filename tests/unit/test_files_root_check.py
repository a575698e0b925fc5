"""``mcp-brokerctl check`` refuses a files-server root that overlaps the broker's own directories.

A root, read-only or read-write, at, inside or above the broker's config
(and its secrets), state, log (the audit trail), run (the sockets), cache,
the servers' homes or its code (``/opt/mcp-privsep``, the venv) is one clear
line naming the file, the server and the root; written as a link to one of
them it is refused too. A root elsewhere, ``{home}``, or a root in the
server's own home is accepted. Paths are a staged root (``Paths(tmp)``), as
``install --root`` makes them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from broker.admin import check
from broker.core.paths import Paths
from broker.core.servers import files_root_clashes


@pytest.fixture
def paths() -> Iterator[Paths]:
    top = tempfile.mkdtemp(prefix="files-check-")
    p = Paths(top)
    for d in (p.etc, p.secrets, p.state, p.log, p.run, p.cache, p.server_homes, p.venv, f"{top}/srv/inbox"):
        os.makedirs(d, exist_ok=True)
    try:
        yield p
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _args(*roots: str) -> tuple[str, ...]:
    out: list[str] = ["-m", "mcp_servers.files"]
    for r in roots:
        out += ["--root", r]
    return tuple(out)


def _own(p: Paths) -> tuple[str, ...]:
    return check.broker_dirs(p)


def test_the_broker_dirs_are_the_hidden_ones_and_the_code(paths: Paths) -> None:
    own = _own(paths)
    for d in (paths.etc, paths.state, paths.log, paths.run, paths.cache, paths.server_homes, paths.opt):
        assert d in own
    assert paths.audit_log.startswith(paths.log + "/") and paths.secrets.startswith(paths.etc + "/")
    assert paths.venv.startswith(paths.opt + "/") and paths.gate_sock.startswith(paths.run + "/")


@pytest.mark.parametrize("mode", [":rw", ":ro", ""])
@pytest.mark.parametrize("which", ["etc", "secrets", "state", "log", "run", "cache", "venv", "opt"])
def test_a_root_at_or_inside_a_broker_dir_is_refused(paths: Paths, which: str, mode: str) -> None:
    d = getattr(paths, which)
    at = "is" if d in _own(paths) else "lies inside"  # the secrets lie in etc, the venv in opt
    for path, relation in ((d, at), (f"{d}/sub/dir", "lies inside")):
        found = files_root_clashes(_args(f"r={path}{mode}"), _own(paths))
        assert len(found) == 1, found
        assert f"--root r={path}{mode}: {relation} the broker's own directory" in found[0], found


@pytest.mark.parametrize("above", ["", "/var", "/var/log", "/var/lib", "/etc", "/opt", "/run"])
def test_a_root_above_a_broker_dir_is_refused(paths: Paths, above: str) -> None:
    path = (paths.root + above) if above else "/"
    found = files_root_clashes(_args(f"up={path}:ro"), _own(paths))
    assert len(found) == 1 and ": holds the broker's own directory" in found[0], found


def test_tricks_are_refused_too(paths: Paths) -> None:
    link = f"{paths.root}/srv/innocent"
    os.symlink(paths.log, link)  # written as a link to the audit log's directory
    tricks = (
        f"a={link}:rw",
        f"b={paths.root}/srv/../var/log/mcp-privsep:ro",  # '..' climbs back in
        f"c={paths.etc}/",  # a trailing slash
        f"d={paths.state}//x:rw",
        f"e={paths.server_homes}/other-server:rw",  # another server's home
        "f={home}/../other:rw",  # out of its own home
    )
    for spec in tricks:
        assert len(files_root_clashes(_args(spec), _own(paths))) == 1, spec
    found = files_root_clashes(("-m", "mcp_servers.files", f"--root=a={link}:rw"), _own(paths))
    assert len(found) == 1


def test_normal_roots_are_accepted(paths: Paths) -> None:
    own = _own(paths)
    home = paths.server_home("files")
    fine = _args(
        f"inbox={paths.root}/srv/inbox:rw",
        f"nas={paths.root}/srv:ro",
        f"sibling={paths.log}-archive:rw",  # a name that only starts like a broker dir
        "mine={home}:rw",
        "docs={home}/docs",
        f"own={home}/share:rw",  # in its own home, written out
        "relative=srv:rw",  # the server itself refuses it
    )
    assert files_root_clashes(fine, own, (home,)) == []
    # another program's --root is not a files server root
    assert files_root_clashes(("-m", "other", "--root", f"x={paths.etc}"), own) == []


def test_check_names_the_file_the_server_and_the_root(paths: Paths) -> None:
    conf = f"{paths.servers_d}/files.toml"
    os.makedirs(paths.servers_d, exist_ok=True)
    with open(conf, "w", encoding="utf-8") as fh:
        fh.write(
            f"""
[servers.files]
command = "/usr/bin/python3"
args = ["-m", "mcp_servers.files", "--root", "inbox={paths.root}/srv/inbox:rw", "--root", "logs={paths.log}:ro"]

[servers.fine]
command = "/usr/bin/python3"
args = ["-m", "mcp_servers.files", "--root", "inbox={paths.root}/srv/inbox:rw", "--quota", "inbox=1M,10"]
"""
        )
    problems = [p for p in check.check_all(paths) if "--root" in p]
    assert problems == [
        f"{conf}: servers.files: --root logs={paths.log}:ro: is the broker's own directory {paths.log} "
        "(a files server root may not be at, inside or above the broker's directories)"
    ]
    assert all(p.count("\n") == 0 for p in problems)
