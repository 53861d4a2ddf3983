"""The files of a Windows payload folder, as both Windows formats (MSI, EXE) install them."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from builder.config import Product
from builder.errors import PayloadError
from builder.formats.base import refuse_symlinks

# Names that need no quoting in WiX, NSIS or a Windows path, and are valid on NTFS.
PAYLOAD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._\-()+]*$")


def payload_files(folder: Path, product: Product) -> list[str]:
    """Relative POSIX paths of the files to install, sorted. Dot-files (build stamps,
    .DS_Store, .gitkeep) are not part of the agent and are left out."""
    refuse_symlinks(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                found.append((Path(root) / name).relative_to(folder).as_posix())
    if product.agent_exe not in found:
        raise PayloadError(f"{folder}: {product.agent_exe} is missing", "build the Windows agent (make payload)")
    for rel in found:
        bad = [part for part in PurePosixPath(rel).parts if not PAYLOAD_NAME_RE.fullmatch(part)]
        if bad:
            raise PayloadError(f"{folder / rel}: the name {bad[0]!r} has a character outside {PAYLOAD_NAME_RE.pattern}",
                               "rename it in the payload")
    return sorted(found)
