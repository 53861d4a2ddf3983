"""The package's layers, held against its imports: what a lower layer may never import (an
arrow up makes the lower layer depend on what is built on it), and no module takes another's
private (underscore) names. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "builder"

# layer -> what it must never import (module prefixes)
NEVER = {
    "builder.binfmt": ("builder.formats", "builder.service", "builder.signing", "builder.storage", "builder.cli",
                       "builder.build", "builder.release", "builder.stamp"),
    "builder.signing": ("builder.formats", "builder.service", "builder.storage", "builder.cli", "builder.build",
                        "builder.release", "builder.stamp"),
    "builder.storage": ("builder.formats", "builder.service", "builder.signing", "builder.cli", "builder.build",
                        "builder.release", "builder.stamp"),
    "builder.tools": ("builder.formats", "builder.service", "builder.cli"),
    "builder.formats": ("builder.service", "builder.cli", "builder.storage"),
    "builder.errors": ("builder",),  # the ground floor: imports nothing of the package
    "builder.log": ("builder.formats", "builder.service", "builder.cli", "builder.signing", "builder.storage"),
    "builder.config": ("builder.formats", "builder.service", "builder.cli", "builder.signing", "builder.storage"),
    "builder.trust": ("builder.formats", "builder.service", "builder.cli", "builder.signing", "builder.storage"),
    "builder.enrollment": ("builder.formats", "builder.service", "builder.cli", "builder.signing", "builder.storage"),
    "builder.build": ("builder.service", "builder.cli"),
    "builder.release": ("builder.service", "builder.cli"),
    "builder.stamp": ("builder.service", "builder.cli"),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            found.append((node.module, names, node.lineno))
            # `from builder import formats` imports the module builder.formats
            found += [(f"{node.module}.{n}", [], node.lineno) for n in names]
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_the_layers_are_read():
    assert len(FILES) > 50 and any(_module_name(f) == "builder.signing.apple.sign" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: _module_name(p))
def test_no_layer_imports_what_is_built_on_it(path):
    me = _module_name(path)
    banned = [b for layer, never in NEVER.items() if _under(me, layer) for b in never]
    up = [(mod, line) for mod, _, line in _imports(path)
          if any(_under(mod, b) for b in banned) and not _under(mod, me)]
    assert not up, f"{me} imports {up}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: _module_name(p))
def test_no_module_takes_anothers_private_names(path):
    taken = [(mod, n, line) for mod, names, line in _imports(path) if mod.startswith("builder")
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not taken, taken
