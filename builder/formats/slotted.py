"""The enrollment slot of the Authenticode formats (EXE, MSI), shared by both format modules.

A release build signs the installer, then reserves an empty slot in its PKCS#7
(`authenticode.add_enrollment_slot`). The manifest records where the slot's bytes are, so a
stamp (builder/stamp.py) writes them without parsing the file again. The installer reads the
slot back at install time: the agent's `enroll-from-installer` finds it in its own file.
"""

from __future__ import annotations

import os
from pathlib import Path

from builder.binfmt import pe, tag
from builder.binfmt.slot import empty_slot, encode_slot
from builder.errors import FormatError, SlotError
from builder.signing import authenticode


def add_slot(signed: Path, kind: str, size: int) -> Path:
    """Replace `signed` (in a work folder) with a copy carrying an empty slot; returns its path."""
    with_slot = signed.with_name(f"slot-{signed.name}")
    with_slot.unlink(missing_ok=True)
    authenticode.add_enrollment_slot(signed, with_slot, kind, size)
    os.replace(with_slot, signed)
    return signed


def fill_slot(path: Path, kind: str, payload: bytes) -> None:
    """Stamp `payload` into the empty slot of `path` in place (a one-shot build's own file)."""
    data = path.read_bytes()
    extents = tag.slot_extents(data, kind, str(path))
    size = sum(n for _, n in extents)
    new = encode_slot(payload, size)
    if kind == "exe" and pe.parse(data, str(path)).checksum and len(extents) == 1:
        new = tag.checksum_neutral(new, empty_slot(size), extents[0][0])
    with open(path, "r+b") as fh:
        pos = 0
        for offset, length in extents:
            fh.seek(offset)
            fh.write(new[pos:pos + length])
            pos += length


def release_entry(path: Path, kind: str) -> dict:
    """Where the slot is, for the manifest. An EXE's stamps keep its PE CheckSum valid."""
    data = path.read_bytes()
    extents = tag.slot_extents(data, kind, str(path))
    entry = {"kind": kind, "size": sum(n for _, n in extents), "extents": [list(e) for e in extents]}
    if kind == "exe":
        layout = pe.parse(data, str(path))
        # Only a contiguous slot can hold the balancing word (tag.checksum_neutral).
        entry["checksum_neutral"] = bool(layout.checksum) and len(extents) == 1
    return {"slot": entry}


def stamped_jws(data: bytes, kind: str, name: str) -> tuple[str | None, bool]:
    """(the signed enrollment in the slot or None, whether the file has a slot at all).
    A structure an agent would refuse (a second slot, bytes after the PKCS#7) raises."""
    try:
        payload = tag.read_slot(data, kind, name)
    except (SlotError, FormatError):
        return None, False
    if payload is None:
        return None, True
    try:
        return payload.decode("ascii"), True
    except UnicodeDecodeError:
        return "\ufffd", True  # not a JWS: describe() reports it unsigned
