"""Layering rules of the udpbackend package, checked on the source with ast (nothing is imported).

Lives here: which udpbackend modules each module may import (closed by default: a module or
package nobody placed here fails), who alone may import a given outside library, and the rule
that each module opens with two lines saying what lives there.  Must not: import udpbackend
itself, so these tests run even where the C fast path did not build.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest

PACKAGE = "udpbackend"
PKG_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Data flows one way: cli -> node (the one place the planes meet) -> control, dataplane, host;
# errors and options are leaves every layer may use; the lab drives nodes only as processes.
# A unit is a top-level module or a package; unit -> the units it may import.
UNITS: dict[str, frozenset[str]] = {
    "__init__": frozenset(),
    "__main__": frozenset({"cli"}),
    "errors": frozenset(),
    "options": frozenset(),
    "cli": frozenset({"__init__", "errors", "options", "control", "host", "node", "lab"}),
    "node": frozenset({"errors", "options", "control", "dataplane", "host"}),
    "control": frozenset({"errors", "options"}),
    "dataplane": frozenset({"errors", "options"}),
    "host": frozenset({"errors"}),
    "lab": frozenset({"__init__"}),
}

# Inside a unit whose modules are layers of their own, every module is listed (closed too):
# module -> the modules it may import (dotted, relative to udpbackend).
MODULES: dict[str, frozenset[str]] = {
    "dataplane.__init__": frozenset(),
    "dataplane.packet": frozenset(),
    "dataplane._fastpath": frozenset(),
    "dataplane.fastpath": frozenset({"dataplane._fastpath", "dataplane.packet"}),
    "dataplane.forwarder": frozenset({"options", "dataplane.fastpath", "dataplane.packet"}),
    "dataplane.tun": frozenset(),
    "dataplane.sockets": frozenset({"errors", "dataplane.fastpath"}),
    "dataplane.plane": frozenset(
        {
            "errors",
            "options",
            "dataplane.packet",
            "dataplane.fastpath",
            "dataplane.forwarder",
            "dataplane.sockets",
            "dataplane.tun",
        }
    ),
    "control.__init__": frozenset(),
    "control.registry": frozenset(),
    "control.gojson": frozenset({"errors"}),
    "control.network": frozenset({"errors", "control.gojson"}),
    "control.lease": frozenset({"errors", "control.gojson", "control.registry"}),
    "control.allocate": frozenset({"errors", "control.network", "control.lease"}),
    "control.manager": frozenset({"errors", "control.lease", "control.network"}),
    "control.local": frozenset(
        {
            "errors",
            "control.registry",
            "control.gojson",
            "control.network",
            "control.lease",
            "control.allocate",
            "control.manager",
        }
    ),
    "control.static": frozenset({"errors", "options", "control.lease", "control.network"}),
    "control.etcd": frozenset({"errors", "control.registry"}),
    "control.annotations": frozenset({"errors", "control.lease"}),
    "control.kube": frozenset(
        {
            "errors",
            "control.annotations",
            "control.lease",
            "control.manager",
            "control.network",
            "control.registry",
        }
    ),
    "node.routes": frozenset({"control.lease"}),
    "node.health": frozenset(),
    "node.notify": frozenset(),
    "node.metrics": frozenset(),
}
LAYERED_UNITS = frozenset({"dataplane", "control"})  # every module of these must be in MODULES

STDLIB_ONLY = frozenset({"dataplane.packet", "errors", "options"})
# outside library -> the only modules that may import it
EXCLUSIVE = {
    "aetcd": frozenset({"control.etcd"}),
    "grpc": frozenset({"control.etcd"}),
    "prometheus_client": frozenset({"node.metrics"}),
    "lightkube": frozenset({"control.kube"}),
    "httpx2": frozenset({"control.kube"}),
    "sdnotify": frozenset({"node.notify"}),
    "cffi": frozenset(),
}
COMPILED = "dataplane._fastpath"
COMPILED_IMPORTER = "dataplane.fastpath"


def unit_of(module: str) -> str:
    return module.split(".")[0]


PACKAGES = frozenset({"dataplane", "control", "host", "node", "lab"})


def _resolve(module: str, level: int, name: str | None) -> str:
    """The dotted module (relative to udpbackend) that a relative import in `module` names."""
    base = module.split(".")[:-1]  # "dataplane.__init__" and "dataplane.plane" -> dataplane
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *(name.split(".") if name else [])])


def _targets(dotted: str, names: list[str]) -> list[str]:
    """What ``from <dotted> import names`` imports: submodules of a package, else the module."""
    if dotted == "":
        return [n if n in UNITS or n in PACKAGES else "__init__" for n in names]
    if dotted in PACKAGES:
        return [f"{dotted}.{n}" for n in names]
    return [dotted]


def internal_and_external_imports(source: str, module: str) -> tuple[set[str], set[str]]:
    """(udpbackend modules imported, dotted relative to the package; top-level names of the
    other packages imported).  Counts every import statement anywhere in the file and
    importlib.import_module / __import__ calls with a constant string."""
    tree = ast.parse(source)
    internal: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    internal.add(".".join(parts[1:]) or "__init__")
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0:
                assert node.module is not None
                parts = node.module.split(".")
                if parts[0] != PACKAGE:
                    external.add(parts[0])
                else:
                    internal.update(_targets(".".join(parts[1:]), names))
            else:
                internal.update(_targets(_resolve(module, node.level, node.module), names))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = getattr(func, "attr", None) or getattr(func, "id", "")
            arg = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                parts = arg.value.split(".")
                if parts[0] == PACKAGE:
                    internal.add(".".join(parts[1:]) or "__init__")
                else:
                    external.add(parts[0])
    internal.discard(module)
    return internal, external


def _allowed(module: str, target: str) -> bool:
    if module in MODULES:
        rule = MODULES[module]
        return target in rule or unit_of(target) in rule
    unit = unit_of(module)
    return unit_of(target) == unit or unit_of(target) in UNITS.get(unit, frozenset())


def layer_violations(source: str, module: str) -> list[str]:
    """Every forbidden import edge of `module` (dotted, relative to udpbackend), as lines."""
    internal, external = internal_and_external_imports(source, module)
    problems: list[str] = []
    unit = unit_of(module)
    if unit not in UNITS:
        problems.append(f"{module}: nobody placed unit {unit!r} in test_layers.UNITS")
    elif unit in LAYERED_UNITS and module not in MODULES:
        problems.append(f"{module}: nobody placed it in test_layers.MODULES")
    for target in sorted(internal):
        if target == COMPILED and module != COMPILED_IMPORTER:
            problems.append(f"{module} imports {COMPILED}: only {COMPILED_IMPORTER} may")
        elif target != COMPILED and not _allowed(module, target):
            problems.append(f"{module} imports {target}: not an allowed edge")
    if module in STDLIB_ONLY:
        for name in sorted(external - set(sys.stdlib_module_names)):
            problems.append(f"{module} imports {name}: it may import only the standard library")
    for name in sorted(external):
        if name in EXCLUSIVE and module not in EXCLUSIVE[name]:
            only = ", ".join(sorted(EXCLUSIVE[name])) or "no module (build time only)"
            problems.append(f"{module} imports {name}: only {only} may")
    return problems


def header_lines(source: str) -> int:
    """Lines of the comment block or docstring the module opens with (0 if it opens with code)."""
    comment_lines = 0
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            if tok.start[0] == 1 and tok.string.startswith("#!"):
                continue
            if "coding" in tok.string and tok.start[0] <= 2 and comment_lines == 0:
                continue
            if tok.string.lstrip("#").strip():
                comment_lines += 1
        elif tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
            continue
        else:
            break
    doc = ast.get_docstring(ast.parse(source), clean=True) or ""
    doc_lines = sum(1 for line in doc.splitlines() if line.strip())
    return max(comment_lines, doc_lines)


def package_modules() -> dict[str, str]:
    """dotted module (relative to udpbackend, "dataplane.__init__" for a package) -> source."""
    return {
        ".".join(path.relative_to(PKG_DIR).with_suffix("").parts): path.read_text()
        for path in sorted(PKG_DIR.rglob("*.py"))
    }


# --- the checkers themselves, on synthetic sources: the real-tree tests cannot pass vacuously ---


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("dataplane.packet", "import struct\nfrom udpbackend.dataplane import fastpath\n"),
        ("dataplane.packet", "import numpy\n"),
        ("dataplane.packet", "from . import tun\n"),
        ("dataplane.fastpath", "from udpbackend.dataplane.forwarder import Forwarder\n"),
        ("dataplane.forwarder", "from . import _fastpath\n"),
        ("dataplane.forwarder", "import udpbackend.dataplane.tun\n"),
        ("dataplane.forwarder", "def f():\n    from ..node import lifecycle\n"),
        ("dataplane.plane", "from ..control.lease import Lease\n"),
        ("dataplane.plane", "from ..host.iface import find_interface\n"),
        ("dataplane.newthing", "import os\n"),
        ("control.lease", "from ..dataplane import packet\n"),
        ("control.etcd", "from ..node.lifecycle import Node\n"),
        ("control.static", "import aetcd\n"),
        ("control.etcd", "from lightkube import AsyncClient\n"),
        ("control.annotations", "from .kube import KubeManager\n"),
        ("control.newthing", "import os\n"),
        ("host.iptables", "from ..control.network import NetworkConfig\n"),
        ("lab.testbed", "import importlib\nimportlib.import_module('udpbackend.node.compose')\n"),
        ("lab.demo", "from ..node.lifecycle import Node\n"),
        ("lab.bench", "from ..dataplane import fastpath\n"),
        ("node.lifecycle", "from udpbackend.dataplane._fastpath import ffi, lib\n"),
        ("node.lifecycle", "from ..lab import testbed\n"),
        ("node.lifecycle", "from .. import cli\n"),
        ("cli", "import udpbackend.dataplane._fastpath\n"),
        ("cli", "from .dataplane import plane\n"),
        ("host.dockeropts", "from ..node import lifecycle\n"),
        ("errors", "from .options import RunOptions\n"),
        ("newtop", "import os\n"),
        ("newpkg.thing", "import os\n"),
    ],
)
def test_checker_flags_planted_violation(module: str, source: str) -> None:
    assert layer_violations(source, module), f"{module}: {source!r} should be a violation"


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("dataplane.packet", "from __future__ import annotations\nimport struct, ipaddress\n"),
        ("dataplane.fastpath", "from . import packet\nfrom ._fastpath import ffi, lib\n"),
        ("dataplane.fastpath", "from udpbackend.dataplane import _fastpath, packet\n"),
        ("dataplane.forwarder", "import uvloop\nfrom .fastpath import Pump\nfrom . import packet"),
        ("dataplane.tun", "import fcntl, os, struct\nfrom pyroute2 import IPRoute\n"),
        ("dataplane.plane", "from ..errors import StartupError\nfrom . import packet\n"),
        ("control.etcd", "import aetcd\nfrom .registry import Registry\nfrom ..errors import E\n"),
        ("lab.testbed", "import subprocess\nfrom pyroute2 import NetNS\n"),
        ("lab.demo", "from .testbed import Testbed\n"),
        ("lab.bench", "from .. import __version__\n"),
        ("node.lifecycle", "from ..control.lease import Lease\nfrom ..host import iptables\n"),
        ("node.compose", "from ..dataplane.plane import DataPlane\n"),
        ("cli", "from .node.compose import run_node\nfrom .lab import demo\n"),
        ("__main__", "from .cli import main\n"),
    ],
)
def test_checker_accepts_allowed_imports(module: str, source: str) -> None:
    assert layer_violations(source, module) == []


def test_header_checker() -> None:
    assert header_lines('"""One line only."""\nimport os\n') == 1
    assert header_lines("# one comment\nimport os\n") == 1
    assert header_lines("import os\n") == 0
    assert header_lines('"""Summary.\n\nWhat must not live here.\n"""\n') == 2
    assert header_lines("#!/usr/bin/env python3\n# first\n# second\nx = 1\n") == 2
    assert header_lines("") == 0


# --- the real package ---


def test_package_has_the_layers() -> None:
    found = {unit_of(m) for m in package_modules()}
    assert {"cli", "node", "control", "dataplane", "host", "lab"} <= found, found


def test_no_forbidden_imports() -> None:
    problems = [
        line
        for module, source in package_modules().items()
        for line in layer_violations(source, module)
    ]
    assert problems == [], "forbidden imports:\n  " + "\n  ".join(problems)


def test_no_import_cycles() -> None:
    """Module-level imports only (a function-level import cannot make an import cycle)."""
    graph: dict[str, set[str]] = {}
    mods = package_modules()
    for module, source in mods.items():
        top = ast.Module(
            body=[n for n in ast.parse(source).body if isinstance(n, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
        internal, _ = internal_and_external_imports(ast.unparse(top), module)
        graph[module] = {t for t in internal if t in mods} | {
            f"{t}.__init__" for t in internal if f"{t}.__init__" in mods
        }

    def visit(m: str, path: list[str], done: set[str]) -> list[str] | None:
        if m in path:
            return [*path[path.index(m) :], m]
        if m in done:
            return None
        for t in sorted(graph.get(m, ())):
            cycle = visit(t, [*path, m], done)
            if cycle:
                return cycle
        done.add(m)
        return None

    done: set[str] = set()
    for m in sorted(graph):
        cycle = visit(m, [], done)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_opens_with_a_header() -> None:
    short = [
        f"{PACKAGE}/{module.replace('.', '/')}.py"
        for module, source in package_modules().items()
        if module != "__init__" and header_lines(source) < 2
    ]
    assert short == [], (
        "each module must open with a comment or docstring of at least two lines "
        "(what lives there and what must not): " + ", ".join(short)
    )
