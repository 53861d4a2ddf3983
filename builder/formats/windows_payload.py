"""The files of a Windows payload folder, as both Windows formats (MSI, EXE) install them."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from builder.config import Product
from builder.errors import ConfigError, PayloadError
from builder.formats.base import refuse_symlinks
from builder.tools import runner
from builder.trust import TRUST_FILE, Trust

# Names that need no quoting in WiX, NSIS or a Windows path, and are valid on NTFS.
PAYLOAD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._\-()+]*$")

# Where the EXE leaves its marks beyond what both formats install: its Add/Remove Programs entry
# (HKLM, 64-bit view; the MSI's entry is its ProductCode) and its uninstaller in the install
# folder. The MSI removes both when it takes an EXE install over, so the machine keeps one
# product; the EXE refuses to replace an MSI install (templates/nsis/installer.nsi.j2).
UNINSTALL_ROOT = "Software\\Microsoft\\Windows\\CurrentVersion\\Uninstall"
EXE_UNINSTALLER = "uninstall.exe"


def exe_arp_key(product: Product) -> str:
    """The EXE's Add/Remove Programs key under HKLM: named after the service."""
    return f"{UNINSTALL_ROOT}\\{product.service_name}"


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
    if TRUST_FILE in found:
        raise PayloadError(f"{folder / TRUST_FILE}: this name is the installer's own (the pinned keys and hosts)",
                           "remove it from the payload; builder writes it from --enrollment-key and --console-host")
    return sorted(found)


def stage_trust(staged: Path, trust: Trust, mtime: int) -> str:
    """Write trust.json into the staged payload root (beside the agent, where agents look for
    it); returns its relative path for the installer's file list."""
    path = staged / TRUST_FILE
    path.write_bytes(trust.to_json_bytes())
    os.utime(path, (mtime, mtime))
    return TRUST_FILE


def installed_trust(installer: Path, member: str) -> Trust | None:
    """The trust.json an installer would put beside its agent, read with 7-Zip (a reader of
    NSIS and MSI cabinets we did not write); None when it carries none or it is malformed."""
    result = runner.run("7z", ["e", "-so", "-bd", installer, member], check=False, log_stdout=False)
    if result.returncode != 0 or not result.stdout:
        return None
    try:
        return Trust.from_json_bytes(result.stdout, f"{installer}: {TRUST_FILE}")
    except ConfigError:
        return None
