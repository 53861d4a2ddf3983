"""Stapled notarization tickets, as bytes: the xar trailer and the disk image's ticket slot."""

from __future__ import annotations

import struct

import pytest

from builder.binfmt import ticket
from builder.binfmt.macho import KOLY_SIZE, koly_code_signature, koly_for_hash, superblob_entries
from builder.errors import FormatError

TICKET = b"s8ch" + bytes(range(40))


def test_xar_trailer_round_trip_and_layout():
    archive = b"xar!" + bytes(100)
    stapled = archive + ticket.xar_trailer(TICKET)
    assert ticket.xar_ticket(stapled) == TICKET
    # terminator (16 bytes), ticket, ticket trailer (16 bytes), little-endian
    assert stapled[len(archive):len(archive) + 16] == b"t8lr" + struct.pack("<HHII", 1, 1, 0, 0)
    assert stapled[-16:] == b"t8lr" + struct.pack("<HHII", 1, 2, len(TICKET), 0)
    assert ticket.xar_ticket(archive) is None
    assert ticket.xar_ticket(stapled[:-1]) is None
    broken = bytearray(stapled)
    broken[len(archive)] ^= 1  # the terminator's magic
    assert ticket.xar_ticket(bytes(broken)) is None


def test_record_names():
    assert ticket.xar_record_name(bytes(range(20)), "sha1") == "2/1/" + bytes(range(20)).hex()
    assert ticket.dmg_record_name(bytes(range(32)), 2) == "2/2/" + bytes(range(20)).hex()
    with pytest.raises(FormatError):
        ticket.xar_record_name(bytes(16), "md5")


def _blob(magic: int, payload: bytes) -> bytes:
    return struct.pack(">II", magic, 8 + len(payload)) + payload


def _image(signature: bytes) -> bytes:
    disk = b"\x00" * 1000
    koly = bytearray(KOLY_SIZE)
    koly[:4] = b"koly"
    struct.pack_into(">QQ", koly, 296, len(disk), len(signature))
    return disk + signature + bytes(koly)


def test_dmg_ticket_slot_round_trip_keeps_the_signed_parts():
    cd = _blob(0xFADE0C02, b"code directory stand-in")
    cms = _blob(0xFADE0B01, b"cms stand-in")
    entries = [(0, cd), (0x10000, cms)]
    header = 12 + 8 * len(entries)
    index, body, offset = b"", b"", header
    for slot, data in entries:
        index += struct.pack(">II", slot, offset)
        body += data
        offset += len(data)
    signature = struct.pack(">III", 0xFADE0CC0, offset, len(entries)) + index + body
    image = _image(signature)
    assert ticket.dmg_ticket(image, "x") is None
    stapled = ticket.dmg_with_ticket(image, TICKET, "x")
    assert ticket.dmg_ticket(stapled, "x") == TICKET
    offset_after, size_after = koly_code_signature(stapled, "x")
    assert offset_after == 1000 and size_after == len(stapled) - 1000 - KOLY_SIZE
    blobs = superblob_entries(stapled[offset_after:offset_after + size_after], "x")
    assert blobs[0] == cd and blobs[0x10000] == cms[8:] and blobs[0x10002][8:] == TICKET
    # What the CodeDirectory hashes of the koly (size zeroed) and the disk do not change.
    assert koly_for_hash(stapled[-KOLY_SIZE:]) == koly_for_hash(image[-KOLY_SIZE:])
    assert stapled[:1000] == image[:1000]
    # Stapling again replaces the ticket instead of adding a second one.
    again = ticket.dmg_with_ticket(stapled, b"s8ch" + b"new", "x")
    assert ticket.dmg_ticket(again, "x") == b"s8ch" + b"new"
    assert len(superblob_entries(again[1000:-KOLY_SIZE], "x")) == 3
    with pytest.raises(FormatError, match="not signed"):
        ticket.dmg_with_ticket(_image(b""), TICKET, "x")
