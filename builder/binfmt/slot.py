"""The enrollment slot: a fixed-size region reserved at signing time and filled per stamp.

Layout: MAGIC (8 bytes) + payload length (uint32 little-endian) + payload + zero padding.
The slot's size is fixed by the release; a stamp never changes the length of the file.
"""

from __future__ import annotations

import struct

from builder.errors import FormatError, SlotError

MAGIC = b"ENRSLOT1"
SLOT_SIZE = 12288  # a signed enrollment with a 4 KiB token and a 2 KiB console URL fits
_HEADER = struct.Struct("<8sI")


def capacity(size: int) -> int:
    """The largest payload a slot of `size` bytes holds."""
    return size - _HEADER.size


def encode_slot(payload: bytes, size: int = SLOT_SIZE) -> bytes:
    if size < _HEADER.size:
        raise SlotError(f"a slot of {size} bytes cannot hold its {_HEADER.size}-byte header",
                        hint=f"use the default slot size of {SLOT_SIZE} bytes")
    over = len(payload) - capacity(size)
    if over > 0:
        raise SlotError(
            f"the enrollment is {len(payload)} bytes, {over} over the {capacity(size)} bytes "
            f"a {size}-byte slot holds",
            hint="build the release with a larger slot, or shorten the enrollment",
        )
    return _HEADER.pack(MAGIC, len(payload)) + payload + bytes(-over)


def empty_slot(size: int = SLOT_SIZE) -> bytes:
    return encode_slot(b"", size)


def decode_slot(buf: bytes) -> bytes | None:
    """The payload in `buf` (a whole slot), or None when the slot is empty."""
    if len(buf) < _HEADER.size:
        raise FormatError(f"the enrollment slot is {len(buf)} bytes, shorter than its header")
    magic, length = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError("the enrollment slot does not start with its magic bytes",
                          hint="the file is not a release built with a slot, or it was damaged")
    if length > len(buf) - _HEADER.size:
        raise FormatError(f"the enrollment slot claims {length} bytes of payload "
                          f"but holds at most {len(buf) - _HEADER.size}")
    return bytes(buf[_HEADER.size:_HEADER.size + length]) if length else None
