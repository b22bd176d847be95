"""Layering rules of the udpbackend package, checked on the source with ast (nothing is imported).

Lives here: the allowed import edges between udpbackend's modules and the rule that each module
opens with a comment or docstring of at least two lines. Must not: import udpbackend itself, so
these tests run even where the C fast path did not build.
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

ANY = None  # marker: the module may import any other udpbackend module (but see _fastpath)

# module -> the udpbackend modules it may import (ANY: all of them).
# Modules missing from this table may import any udpbackend module except _fastpath.
ALLOWED: dict[str, frozenset[str] | None] = {
    "packet": frozenset(),
    "fastpath": frozenset({"_fastpath", "packet"}),
    "forwarder": frozenset({"fastpath", "packet"}),
    "tun": frozenset(),
    "testbed": frozenset(),
    "demo": frozenset({"testbed"}),
    "daemon": ANY,
    "cli": ANY,
}
STDLIB_ONLY = frozenset({"packet"})
COMPILED = "_fastpath"
COMPILED_IMPORTER = "fastpath"


def internal_and_external_imports(source: str, module: str) -> tuple[set[str], set[str]]:
    """Return (udpbackend modules imported, top-level names of other packages imported).

    Counts every import statement anywhere in the file (inside functions and `if TYPE_CHECKING:`
    too) and importlib.import_module / __import__ calls with a constant string. `from udpbackend
    import x` and `from . import x` count as importing module x.
    """
    tree = ast.parse(source)
    internal: set[str] = set()
    external: set[str] = set()

    def add_dotted(name: str) -> None:
        parts = name.split(".")
        if parts[0] == PACKAGE:
            if len(parts) > 1:
                internal.add(parts[1])
        else:
            external.add(parts[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add_dotted(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                parts = node.module.split(".")
                if parts[0] != PACKAGE:
                    external.add(parts[0])
                elif len(parts) > 1:
                    internal.add(parts[1])
                else:
                    internal.update(alias.name for alias in node.names)
            elif node.level == 1:
                if node.module:
                    internal.add(node.module.split(".")[0])
                else:
                    internal.update(alias.name for alias in node.names)
            else:
                # Beyond the package: never expected; record it so a rule can flag it.
                internal.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            arg = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                if arg.value.startswith("."):
                    internal.add(arg.value.lstrip(".").split(".")[0])
                else:
                    add_dotted(arg.value)
    internal.discard(module)
    return internal, external


def layer_violations(source: str, module: str) -> list[str]:
    """Every forbidden import edge of `module` (given its source), as readable lines."""
    internal, external = internal_and_external_imports(source, module)
    problems: list[str] = []
    if COMPILED in internal and module != COMPILED_IMPORTER:
        problems.append(f"{module} imports {COMPILED}: only {COMPILED_IMPORTER} may")
    allowed = ALLOWED.get(module, ANY)
    if allowed is not ANY:
        for target in sorted(internal - allowed - {COMPILED}):
            what = "only " + ", ".join(sorted(allowed)) if allowed else "no udpbackend module"
            problems.append(f"{module} imports {target}: it may import {what}")
    if module in STDLIB_ONLY:
        for name in sorted(external - set(sys.stdlib_module_names)):
            problems.append(f"{module} imports {name}: it may import only the standard library")
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
    return {path.stem: path.read_text() for path in sorted(PKG_DIR.glob("*.py"))}


# --- the checkers themselves, on synthetic sources: the real-tree tests cannot pass vacuously ---


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("packet", "import struct\nfrom udpbackend import fastpath\n"),
        ("packet", "import numpy\n"),
        ("packet", "from . import tun\n"),
        ("fastpath", "from udpbackend.forwarder import Forwarder\n"),
        ("forwarder", "from . import _fastpath\n"),
        ("forwarder", "import udpbackend.tun\n"),
        ("forwarder", "def f():\n    from .daemon import Daemon\n"),
        ("tun", "from udpbackend.packet import parse\n"),
        ("testbed", "import importlib\nimportlib.import_module('udpbackend.daemon')\n"),
        ("demo", "from .daemon import run\n"),
        ("daemon", "from udpbackend._fastpath import ffi, lib\n"),
        ("cli", "import udpbackend._fastpath\n"),
        ("stats", "from ._fastpath import lib\n"),
    ],
)
def test_checker_flags_planted_violation(module: str, source: str) -> None:
    assert layer_violations(source, module), f"{module}: {source!r} should be a violation"


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("packet", "from __future__ import annotations\nimport struct, ipaddress\n"),
        ("fastpath", "from . import packet\nfrom ._fastpath import ffi, lib\n"),
        ("fastpath", "from udpbackend import _fastpath, packet\n"),
        ("forwarder", "import uvloop\nfrom .fastpath import Batch\nfrom . import packet\n"),
        ("tun", "import fcntl, os, struct\n"),
        ("testbed", "import subprocess\nfrom pyroute2 import NetNS\n"),
        ("demo", "from .testbed import Testbed\n"),
        ("daemon", "from . import forwarder, tun, fastpath, packet\n"),
        ("cli", "from udpbackend.daemon import Daemon\nfrom udpbackend.demo import main\n"),
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


def test_package_has_modules() -> None:
    assert (PKG_DIR / "packet.py").is_file(), f"{PKG_DIR} has no packet.py"


def test_no_forbidden_imports() -> None:
    problems = [
        line
        for module, source in package_modules().items()
        for line in layer_violations(source, module)
    ]
    assert problems == [], "forbidden imports:\n  " + "\n  ".join(problems)


def test_every_module_opens_with_a_header() -> None:
    short = [
        f"{PACKAGE}/{module}.py"
        for module, source in package_modules().items()
        if header_lines(source) < 2
    ]
    assert short == [], (
        "each module must open with a comment or docstring of at least two lines "
        "(what lives there and what must not): " + ", ".join(short)
    )
