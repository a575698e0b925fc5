"""The trust zones' import rules, read from the source with ``ast`` (every import, lazy ones too).

* ``broker.core``: the standard library and ``broker.core`` only;
* ``broker.gate`` and ``broker.spawner``: the standard library and ``broker.core``
  (and their own package); they run with another user's rights;
* ``broker.daemon``: never the gate, the spawner or the admin side;
* ``broker.admin``: never the gate (it talks to the daemon through ``broker.core.wire``);
* ``agent``: the standard library only (it runs as the agent, before sudo);
* ``mcp_servers``: nothing of the broker (they are servers like any other);
* no import circle among the project's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "agent", "mcp_servers")
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its body, resolved to project modules where it can be."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # "from broker.core import wire" imports the module broker.core.wire
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
    return found


def top(mod: str) -> str:
    return mod.split(".")[0]


def zone(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] == "broker" and len(parts) > 1:
        return f"broker.{parts[1]}"
    return parts[0]


def project(mod: str) -> bool:
    return top(mod) in PACKAGES


def allowed(importer: str, imported: str) -> bool:
    z = zone(importer)
    if top(imported) in STDLIB:
        return True
    if imported == "broker":  # the package face: __version__ only
        return z != "agent" and z != "mcp_servers"
    target = zone(imported)
    if z == "broker.core":
        return target == "broker.core"
    if z in ("broker.gate", "broker.spawner"):
        return target in ("broker.core", z)
    if z == "agent":
        return False
    if z == "mcp_servers":
        return not project(imported) or top(imported) == "mcp_servers"
    if z == "broker.daemon":
        return target not in ("broker.gate", "broker.spawner", "broker.admin", "agent")
    if z == "broker.admin":
        return target not in ("broker.gate",)
    return True  # broker/__init__.py


def violations() -> list[str]:
    out = []
    for name in MODULES:
        for imported in sorted(imports(name)):
            if not allowed(name, imported):
                out.append(f"{name} imports {imported}")
    return out


def test_every_zone_imports_only_what_its_rights_allow() -> None:
    assert violations() == []


def test_the_zones_exist_as_packages() -> None:
    for pkg in ("broker.core", "broker.gate", "broker.spawner", "broker.daemon", "broker.admin", "agent"):
        assert pkg in MODULES, f"{pkg} is not a package"
        doc = ast.get_docstring(ast.parse(MODULES[pkg].read_text()))
        assert doc, f"{pkg}/__init__.py must say who runs its code"


def graph() -> dict[str, set[str]]:
    return {name: {m for m in imports(name) if m in MODULES and m != name} for name in MODULES}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components larger than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    assert circles(graph()) == []


# --- the checker itself catches what it must ------------------------------------------------


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("broker.gate.verbs", "mcp"),
        ("broker.gate.verbs", "broker.daemon.config"),
        ("broker.core.allowlist", "broker.gate.verbs"),
        ("broker.spawner", "pydantic"),
        ("broker.daemon.service", "broker.admin.cli"),
        ("broker.daemon.service", "broker.gate.endpoint"),
        ("agent.helper", "broker.core.names"),
        ("mcp_servers.demo.server", "broker.daemon.config"),
        ("broker.admin.cli", "broker.gate.verbs"),
    ],
)
def test_a_forbidden_import_is_caught(importer: str, imported: str) -> None:
    assert not allowed(importer, imported)


def test_a_circle_is_caught() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --- what a process really loads (not just what its modules name) ----------------------------------

ROOT_SIDE_FORBIDDEN = ("mcp", "pydantic", "pydantic_core", "click", "httpx", "httpx2", "anyio", "jsonschema")


@pytest.mark.parametrize("module", ["broker.spawner.service", "broker.spawner.__main__", "broker.daemon.main"])
def test_the_root_side_loads_no_heavy_library(module: str) -> None:
    """The spawner and mcp-brokerd's root part (until it drops to mcp-broker) load the standard library only.

    Checked in a fresh interpreter: an import inside a function that runs at
    import time, or a heavy module pulled in by a light one, shows up here
    and nowhere in the static graph.
    """
    import subprocess
    import sys

    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(ROOT)
    ).stdout.split()
    heavy = sorted({m for m in loaded if m.split(".")[0] in ROOT_SIDE_FORBIDDEN})
    assert heavy == [], f"{module} loads {heavy}"
