"""Notarization tickets on disk: where Apple's stapler puts them, and the record name a ticket is
looked up by. Pure bytes, no I/O beyond what the caller hands in.

- Flat package (xar): appended after the archive as `terminator trailer + ticket + ticket
  trailer`; each trailer is 16 bytes little-endian: magic "t8lr", version u16 (1), type u16
  (1 terminator, 2 ticket), length u32 (the ticket's, 0 for the terminator), unused u32. A reader
  looks at the last 16 bytes. Record name: "2/<digest type>/<TOC checksum, 20 bytes, hex>" with
  digest type 1 for a sha1 checksum, 2 for sha256.
- Disk image (UDIF): the ticket is one more entry of the code signature's SuperBlob, slot
  0x10002, in a blob wrapper (magic 0xfade0b01, u32 length with the 8-byte header, the ticket),
  entries in slot order; the koly trailer records the new signature size. The
  CodeDirectory does not cover the ticket slot, and the koly as it hashes it has the size zeroed,
  so the signature stays valid. Record name: "2/<CodeDirectory hash type>/<its cdhash, 20 bytes,
  hex>".
"""

from __future__ import annotations

import struct

from builder.binfmt.macho import KOLY_CODESIG, KOLY_CODESIG_AT, KOLY_SIZE, SUPERBLOB_MAGIC, koly_code_signature
from builder.errors import FormatError

TRAILER = struct.Struct("<4sHHII")
TRAILER_MAGIC = b"t8lr"
TERMINATOR, TICKET = 1, 2
TICKET_SLOT = 0x10002
TICKET_MAGIC = b"s8ch"
_BLOB_WRAPPER = 0xFADE0B01
_DIGEST_TYPES = {"sha1": 1, "sha256": 2}


def xar_record_name(checksum: bytes, style: str) -> str:
    if style not in _DIGEST_TYPES:
        raise FormatError(f"a flat package with a {style} TOC checksum cannot be notarized")
    return f"2/{_DIGEST_TYPES[style]}/{checksum[:20].hex()}"


def dmg_record_name(cdhash: bytes, hash_type: int) -> str:
    return f"2/{hash_type}/{cdhash[:20].hex()}"


def xar_trailer(ticket: bytes) -> bytes:
    return (TRAILER.pack(TRAILER_MAGIC, 1, TERMINATOR, 0, 0) + ticket
            + TRAILER.pack(TRAILER_MAGIC, 1, TICKET, len(ticket), 0))


def xar_ticket(data: bytes) -> bytes | None:
    """The ticket stapled to the flat package `data`, or None."""
    if len(data) < TRAILER.size:
        return None
    magic, _version, kind, length, _ = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if magic != TRAILER_MAGIC or kind != TICKET:
        return None
    start = len(data) - TRAILER.size - length
    if start < TRAILER.size:
        return None
    head = TRAILER.unpack_from(data, start - TRAILER.size)
    if head[0] != TRAILER_MAGIC or head[2] != TERMINATOR:
        return None
    return data[start:start + length]


def _superblob(blob: bytes, name: str) -> list[tuple[int, bytes]]:
    """[(slot, bytes)] of a SuperBlob in order, each entry up to the next one's offset."""
    if len(blob) < 12:
        raise FormatError(f"{name}: code signature is truncated")
    magic, length, count = struct.unpack_from(">III", blob, 0)
    if magic != SUPERBLOB_MAGIC or length > len(blob) or count > 64:
        raise FormatError(f"{name}: code signature is not an embedded-signature SuperBlob")
    index = [struct.unpack_from(">II", blob, 12 + 8 * i) for i in range(count)]
    bounds = sorted(offset for _, offset in index) + [length]
    out = []
    for slot, offset in index:
        end = next(b for b in bounds if b > offset)
        out.append((slot, blob[offset:end]))
    return out


def _build_superblob(entries: list[tuple[int, bytes]]) -> bytes:
    header = 12 + 8 * len(entries)
    offset, index, body = header, b"", b""
    for slot, data in entries:
        index += struct.pack(">II", slot, offset)
        body += data
        offset += len(data)
    return struct.pack(">III", SUPERBLOB_MAGIC, offset, len(entries)) + index + body


def dmg_with_ticket(data: bytes, ticket: bytes, name: str) -> bytes:
    """The signed disk image `data` with `ticket` stapled (an old ticket replaced)."""
    offset, size = koly_code_signature(data, name)
    if size == 0:
        raise FormatError(f"{name}: not signed, so it cannot carry a notarization ticket")
    entries = [(slot, blob) for slot, blob in _superblob(data[offset:offset + size], name) if slot != TICKET_SLOT]
    wrapped = struct.pack(">II", _BLOB_WRAPPER, 8 + len(ticket)) + ticket
    signature = _build_superblob(sorted(entries + [(TICKET_SLOT, wrapped)], key=lambda entry: entry[0]))
    koly = bytearray(data[-KOLY_SIZE:])
    KOLY_CODESIG.pack_into(koly, KOLY_CODESIG_AT, offset, len(signature))
    return data[:offset] + signature + bytes(koly)


def dmg_ticket(data: bytes, name: str) -> bytes | None:
    """The ticket stapled to the disk image `data`, or None."""
    offset, size = koly_code_signature(data, name)
    if size == 0:
        return None
    for slot, blob in _superblob(data[offset:offset + size], name):
        if slot == TICKET_SLOT:
            magic, length = struct.unpack_from(">II", blob, 0) if len(blob) >= 8 else (0, 0)
            if magic != _BLOB_WRAPPER or not 8 <= length <= len(blob):
                raise FormatError(f"{name}: the stapled ticket is not in a blob wrapper")
            return blob[8:length]
    return None
