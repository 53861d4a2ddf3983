"""Where the enrollment slot is in a signed EXE or MSI, and a stamp as byte ranges.

A stamped file is the base file with the slot's bytes replaced (and, for an EXE, the PE
CheckSum): same length, same Authenticode signature. `stamp_pieces` describes it as an
ordered list of pieces, ("base", offset, length) ranges of the base file and ("bytes", data)
literals, so storage can stream the output without building it in memory.

Per release: `slot_extents` and `checksum_field` (one parse of the base). Per stamp:
`stamp_pieces`, which touches only the slot's few kilobytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, Union

from builder.binfmt import cfb, pe
from builder.binfmt.pkcs7 import element_size, find_slot
from builder.binfmt.slot import decode_slot, empty_slot
from builder.errors import SlotError, UsageError, VerificationError

Kind = Literal["exe", "msi"]
SIGNATURE_STREAM = "\x05DigitalSignature"
Piece = Union[tuple[Literal["base"], int, int], tuple[Literal["bytes"], bytes]]


@dataclass(frozen=True)
class ChecksumField:
    """The PE CheckSum of a base file: where it is and what it holds."""

    offset: int
    value: int


def _signature_extents(data, kind: Kind, name: str) -> list[tuple[int, int]]:
    if kind == "exe":
        offset, length = pe.pkcs7_span(data, name)
        return [(offset, length)]
    if kind == "msi":
        extents = cfb.stream_extents(data, SIGNATURE_STREAM, name)
        stream = _gather(data, extents)
        # Nothing may follow the PKCS#7 in the stream: agents read only the DER element.
        if element_size(stream) != len(stream):
            raise VerificationError(f"{name} has {len(stream) - element_size(stream)} bytes after the PKCS#7 "
                                    "in its DigitalSignature stream",
                                    hint="the file was altered after signing: do not use it")
        return extents
    raise UsageError(f"unknown installer kind {kind!r}", hint="use 'exe' or 'msi'")


def _gather(data, extents: list[tuple[int, int]]) -> bytes:
    return b"".join(memoryview(data)[o:o + n] for o, n in extents)


def _sub_extents(extents: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The file ranges of bytes [start, start + length) of the data mapped by `extents`."""
    out, pos, end = [], 0, start + length
    for offset, size in extents:
        lo, hi = max(start, pos), min(end, pos + size)
        if lo < hi:
            out.append((offset + lo - pos, hi - lo))
        pos += size
    return out


def slot_extents(data, kind: Kind, name: str = "the input") -> list[tuple[int, int]]:
    """File ranges (offset, length) holding the slot's bytes, in slot order."""
    extents = _signature_extents(data, kind, name)
    offset, length = find_slot(_gather(data, extents))
    return _sub_extents(extents, offset, length)


def read_slot(data, kind: Kind, name: str = "the input") -> bytes | None:
    """The payload stamped into `data`, or None when its slot is empty."""
    return decode_slot(_gather(data, slot_extents(data, kind, name)))


def checksum_field(data, kind: Kind, name: str = "the input") -> ChecksumField | None:
    """The base's PE CheckSum, or None for an MSI or a PE whose CheckSum is 0 (not set)."""
    if kind == "msi":
        return None
    if kind != "exe":
        raise UsageError(f"unknown installer kind {kind!r}", hint="use 'exe' or 'msi'")
    layout = pe.parse(data, name)
    return ChecksumField(layout.checksum_offset, layout.checksum) if layout.checksum else None


def stamp_pieces(base_size: int, extents: list[tuple[int, int]], slot_bytes: bytes,
                 checksum: ChecksumField | None = None,
                 base_slot: bytes | None = None) -> list[Piece]:
    """The stamped file as pieces: the base with `slot_bytes` written over `extents`.

    With `checksum` (the base's, from `checksum_field`) the PE CheckSum is updated
    incrementally from the words the stamp replaces: `base_slot` (the base's slot bytes; an
    empty slot, as a release is built, when not given) out, `slot_bytes` in. The base's
    CheckSum must be correct, as signing leaves it.
    """
    total = sum(length for _, length in extents)
    if total != len(slot_bytes):
        raise SlotError(f"the stamp is {len(slot_bytes)} bytes but the release's slot is "
                        f"{total} bytes", hint="encode the stamp with the release's slot size")
    patches: list[tuple[int, bytes]] = []
    pos = 0
    for offset, length in extents:
        patches.append((offset, slot_bytes[pos:pos + length]))
        pos += length
    if checksum is not None:
        old = empty_slot(total) if base_slot is None else base_slot
        if len(old) != total:
            raise SlotError(f"the base slot is {len(old)} bytes, the stamp {total}")
        word_sum = checksum.value - base_size
        pos = 0
        for offset, length in extents:
            word_sum += (pe.words_sum(slot_bytes[pos:pos + length], offset)
                         - pe.words_sum(old[pos:pos + length], offset))
            pos += length
        patches.append((checksum.offset,
                        struct.pack("<I", pe.fold_checksum(word_sum, base_size))))
    patches.sort()

    pieces: list[Piece] = []
    pos = 0
    for offset, data in patches:
        if offset < pos or offset + len(data) > base_size:
            raise SlotError("the slot ranges overlap or fall outside the base file",
                            hint="take the ranges from slot_extents of this base file")
        if offset > pos:
            pieces.append(("base", pos, offset - pos))
        pieces.append(("bytes", bytes(data)))
        pos = offset + len(data)
    if pos < base_size:
        pieces.append(("base", pos, base_size - pos))
    return pieces


def apply_pieces(base, pieces: list[Piece]) -> bytes:
    """The output `pieces` describe, built from `base` (bytes, memoryview or mmap)."""
    view = memoryview(base)
    return b"".join(view[p[1]:p[1] + p[2]] if p[0] == "base" else p[1] for p in pieces)


def checksum_neutral(slot_bytes: bytes, base_slot: bytes, file_offset: int) -> bytes:
    """`slot_bytes` with its last padding word set so the file's PE CheckSum stays valid.

    The CheckSum is a sum of 16-bit words modulo 0xFFFF plus the file size; a stamp that keeps
    the sum of the slot's words equal to the base slot's leaves it unchanged. So instead of a
    second patch at offset 216 (which would make a streamed or server-side-copied stamp touch
    the start of the file too), one word in the slot's zero padding balances the sum, and the
    stamp stays a single contiguous piece. The slot decoder ignores padding.
    """
    if len(slot_bytes) != len(base_slot):
        raise SlotError(f"the stamp is {len(slot_bytes)} bytes but the base slot is {len(base_slot)}")
    end = file_offset + len(slot_bytes)
    word_at = (end - 2) & ~1  # the last word boundary in the slot, in file offsets
    rel = word_at - file_offset
    used = len(slot_bytes.rstrip(b"\0"))
    if rel < used or any(slot_bytes[rel:rel + 2]):
        raise SlotError("the enrollment leaves no room for the slot's checksum word",
                        hint="shorten the enrollment by a few bytes or use a larger slot")
    delta = (pe.words_sum(base_slot, file_offset) - pe.words_sum(slot_bytes, file_offset)) % 0xFFFF
    out = bytearray(slot_bytes)
    out[rel:rel + 2] = struct.pack("<H", delta)
    return bytes(out)
