"""The installer formats. Adding one means a module here and a line in `_MODULES`."""

from __future__ import annotations

import importlib

from builder.errors import UsageError
from builder.formats.base import Format

_MODULES = {
    "msi": "builder.formats.msi:MsiFormat",
    "exe": "builder.formats.exe:ExeFormat",
    "pkg": "builder.formats.pkg:PkgFormat",
    "dmg": "builder.formats.dmg:DmgFormat",
}

NAMES = tuple(_MODULES)


def get(name: str) -> Format:
    spec = _MODULES.get(name)
    if spec is None:
        raise UsageError(f"unknown format {name!r}", f"choose from {', '.join(NAMES)}")
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)()


def for_file(path) -> Format:
    """The format of an existing installer, by its suffix."""
    suffix = str(path).rsplit(".", 1)[-1].lower()
    if suffix not in _MODULES:
        raise UsageError(f"{path}: unknown installer type '.{suffix}'", f"expected one of {', '.join('.' + n for n in NAMES)}")
    return get(suffix)
