"""The installer formats, and the kinds of installer they make: the one registry that the CLI's
choices, build, release, stamp, the service and its workers read.

Adding a format: its module here, a line in `_MODULES`, and its kinds in `KINDS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Kind:
    """One kind of group installer `stamp` and the service make from a release."""

    name: str  # what the command line and the service call it
    base: str  # the release's format it is made from
    suffix: str
    # True: the signed enrollment goes into the slot of the base file's signature, which is kept
    # (milliseconds, no key needed); False: the format's own stamp() re-bakes and signs.
    slotted: bool

    @property
    def platform(self) -> str:
        """Where it installs ("windows", "macos"): its base format's."""
        return get(self.base).platform


KINDS = {k.name: k for k in (
    Kind("exe", "exe", ".exe", slotted=True),
    Kind("msi", "msi", ".msi", slotted=False),  # ENROLLMENT baked into the Property table (GPO, Intune)
    Kind("msi-tagged", "msi", ".msi", slotted=True),
    Kind("pkg", "pkg", ".pkg", slotted=False),
    Kind("dmg", "pkg", ".dmg", slotted=False),  # the release's signed pkg and a sidecar on a new image
)}
KIND_NAMES = tuple(KINDS)
SLOTTED = tuple(k.name for k in KINDS.values() if k.slotted)  # stamped without re-signing


def kind(name: str) -> Kind:
    found = KINDS.get(name)
    if found is None:
        raise UsageError(f"unknown installer kind {name!r}", f"choose from {', '.join(KIND_NAMES)}")
    return found


def kinds_of(release_formats) -> list[str]:
    """The kinds a release holding `release_formats` can be stamped into."""
    return [k.name for k in KINDS.values() if k.base in release_formats]
