"""The small interface every installer format implements, and what flows through it.

A format module (msi.py, exe.py, pkg.py, dmg.py) defines one class with `name`, `platform`,
`suffix` and the methods of `Format` below. It renders its templates, runs its tools through
`builder.tools.runner`, signs through `builder.signing`, and returns the finished file inside
its private work folder; `builder.build` moves it into the output folder once verified.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from builder.config import Product
from builder.errors import PayloadError
from builder.trust import SignedEnrollment, Trust
from builder.signing.signers import Signers


@dataclass(frozen=True, kw_only=True)
class BuildRequest:
    product: Product
    version: str
    payload: Path
    # None for a release build: the installer then carries an empty, reserved enrollment slot.
    enrollment: SignedEnrollment | None
    # The pins installed beside the agent (trust.json), covered by the installer's signature.
    trust: Trust
    work: Path
    source_date_epoch: int
    signers: Signers

    def payload_dir(self, platform: str) -> Path:
        return self.payload / platform


@dataclass(frozen=True, kw_only=True)
class Built:
    """A finished installer inside the format's work folder, and what the summary says of it."""

    path: Path
    signer: str | None
    notarized: bool | None = None
    details: dict = field(default_factory=dict)


class Format(Protocol):
    name: str  # "msi", "exe", "pkg", "dmg"
    platform: str  # "windows" or "macos": the payload sub-folder it takes
    suffix: str  # ".msi"
    signed_with: tuple[str, ...]  # the Signers fields a signed build needs ("authenticode", ...)
    stamp_signed_with: tuple[str, ...]  # ... and a stamp that signs again (() where every kind is slotted)

    def build(self, request: BuildRequest) -> Built:
        """Render, run the tools, sign, and return the finished file in request.work."""

    def verify(self, path: Path, ca: Path | None) -> dict:
        """Structure + signature checks; {"ok": bool, "signature": {...}, "enrollment": {...} | None, ...}."""

    def inspect(self, path: Path) -> dict:
        """What `verify` reports about structure and enrollment, without checking signatures."""

    def release_entry(self, path: Path, product: Product, *, signed: bool) -> dict:
        """What the release manifest records of this format's file beyond size, hash and signer
        (the slot's place for EXE and MSI; {} where there is nothing more)."""

    def stamp(self, release, enrollment, signers: Signers, out: Path) -> Built:
        """A group's installer made from the release by re-baking and signing (formats whose kinds
        are not all slotted: builder/formats/__init__.py KINDS)."""


def refuse_symlinks(folder: Path) -> None:
    """A payload holds real files and folders only. A symbolic link would carry whatever it
    points to on the build machine (a signing key) into a signed installer, or be skipped or
    kept as a link depending on the format: any link, to a file or a folder, is refused with
    its path. Dot-files are checked too, though no format installs them."""
    folder = Path(folder)
    if folder.is_symlink():
        raise PayloadError(f"{folder}: the payload folder is a symbolic link", "give the folder it points to")
    for root, dirs, files in os.walk(folder):  # os.walk lists linked folders in `dirs` and does not enter them
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink():
                raise PayloadError(f"{path}: a symbolic link in the payload (to {os.readlink(path)!r})",
                                   "copy the real file or folder into the payload instead")


__all__ = ["refuse_symlinks", "BuildRequest", "Built", "Format"]
