import importlib.util
import io
import json
import os
from pathlib import Path

import olefile
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.binfmt import pe, tag
from builder.binfmt.pkcs7 import add_slot
from builder.binfmt.slot import SLOT_SIZE, empty_slot, encode_slot
from builder.errors import FormatError, SlotError, UsageError


def _helpers(module: str):
    """The byte builders of a sibling test module, loaded by path (no package needed)."""
    path = Path(__file__).with_name(f"{module}.py")
    spec = importlib.util.spec_from_file_location(f"_builders_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


PE = _helpers("test_pe")
CFB = _helpers("test_cfb")
P7 = _helpers("test_pkcs7")
PAYLOAD = json.dumps({"account": "a1", "group": "g1", "token": "t" * 5000}).encode()


def signed_exe(size: int = SLOT_SIZE) -> bytes:
    unsigned_slot = PE.make_pe(certs=PE.win_certificate(P7.TIMESTAMPED))
    return pe.with_signature(unsigned_slot, add_slot(P7.TIMESTAMPED, size))


def signed_msi(size: int = SLOT_SIZE, **options) -> bytes:
    streams = {tag.SIGNATURE_STREAM: add_slot(P7.TIMESTAMPED, size),
               "\x05SummaryInformation": os.urandom(400), "\u4840\u3b3f": os.urandom(9000)}
    return CFB.make_cfb(streams, **options)


def stamp(base: bytes, kind: str, payload: bytes) -> bytes:
    extents = tag.slot_extents(base, kind)
    slot = encode_slot(payload, sum(n for _, n in extents))
    pieces = tag.stamp_pieces(len(base), extents, slot, tag.checksum_field(base, kind))
    return tag.apply_pieces(base, pieces)


def changed_ranges(a: bytes, b: bytes) -> list[int]:
    return [i for i in range(len(a)) if a[i] != b[i]]


def test_exe_slot_is_one_extent_holding_an_empty_slot():
    base = signed_exe()
    (offset, length), = tag.slot_extents(base, "exe")
    assert length == SLOT_SIZE and base[offset:offset + length] == empty_slot()
    assert tag.read_slot(base, "exe") is None


def test_exe_stamp_changes_only_the_slot_and_the_checksum():
    base = signed_exe()
    out = stamp(base, "exe", PAYLOAD)
    assert len(out) == len(base)
    assert tag.read_slot(out, "exe") == PAYLOAD
    (offset, length), = tag.slot_extents(base, "exe")
    field = pe.parse(base).checksum_offset
    assert all(offset <= i < offset + length or field <= i < field + 4
               for i in changed_ranges(base, out))
    assert pe.parse(out).checksum == pe.pe_checksum(out) != pe.parse(base).checksum


def test_pieces_cover_the_base_in_order():
    base = signed_exe()
    extents = tag.slot_extents(base, "exe")
    pieces = tag.stamp_pieces(len(base), extents, encode_slot(PAYLOAD),
                              tag.checksum_field(base, "exe"))
    assert [p[0] for p in pieces][:4] == ["base", "bytes", "base", "bytes"]
    position = 0
    for piece in pieces:
        if piece[0] == "base":
            assert piece[1] == position
            position += piece[2]
        else:
            position += len(piece[1])
    assert position == len(base)
    assert tag.apply_pieces(memoryview(bytearray(base)), pieces) == tag.apply_pieces(base, pieces)


def test_zero_checksum_is_left_alone():
    base = bytearray(signed_exe())
    field = pe.parse(base).checksum_offset
    base[field:field + 4] = bytes(4)
    assert tag.checksum_field(bytes(base), "exe") is None
    out = stamp(bytes(base), "exe", PAYLOAD)
    assert out[field:field + 4] == bytes(4)


def test_restamp_with_base_slot_keeps_the_checksum_right():
    first = stamp(signed_exe(), "exe", b"first")
    extents = tag.slot_extents(first, "exe")
    old = b"".join(first[o:o + n] for o, n in extents)
    pieces = tag.stamp_pieces(len(first), extents, encode_slot(PAYLOAD),
                              tag.checksum_field(first, "exe"), base_slot=old)
    out = tag.apply_pieces(first, pieces)
    assert tag.read_slot(out, "exe") == PAYLOAD
    assert pe.parse(out).checksum == pe.pe_checksum(out)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_incremental_checksum_equals_a_full_pass(data):
    size = data.draw(st.integers(300, 3000))
    base = bytearray(b"MZ" + data.draw(st.binary(min_size=size, max_size=size)))
    field = data.draw(st.integers(2, 40))
    base[field:field + 4] = pe.pe_checksum(bytes(base), field).to_bytes(4, "little")
    starts = sorted(data.draw(st.sets(st.integers(50, len(base) - 20), min_size=1, max_size=4)))
    extents, previous_end = [], 0
    for start in starts:
        if start >= previous_end:
            length = data.draw(st.integers(1, 19))
            extents.append((start, length))
            previous_end = start + length
    total = sum(n for _, n in extents)
    slot = data.draw(st.binary(min_size=total, max_size=total))
    old = b"".join(bytes(base[o:o + n]) for o, n in extents)
    checksum = tag.ChecksumField(field, int.from_bytes(base[field:field + 4], "little"))
    out = tag.apply_pieces(bytes(base), tag.stamp_pieces(len(base), extents, slot, checksum, old))
    assert int.from_bytes(out[field:field + 4], "little") == pe.pe_checksum(out, field)
    assert b"".join(out[o:o + n] for o, n in extents) == slot


def test_msi_slot_spread_over_sectors_is_stamped_in_order():
    base = signed_msi(interleave=True)
    extents = tag.slot_extents(base, "msi")
    assert len(extents) > 1
    assert tag.checksum_field(base, "msi") is None
    out = stamp(base, "msi", PAYLOAD)
    assert len(out) == len(base)
    assert tag.read_slot(out, "msi") == PAYLOAD
    with olefile.OleFileIO(io.BytesIO(out)) as stamped, olefile.OleFileIO(io.BytesIO(base)) as orig:
        for name in orig.listdir():
            if name != [tag.SIGNATURE_STREAM]:
                assert stamped.openstream(name).read() == orig.openstream(name).read()
        signature = stamped.openstream(tag.SIGNATURE_STREAM).read()
    assert encode_slot(PAYLOAD) in signature


def test_msi_small_signature_in_the_mini_stream():
    base = signed_msi(size=256)
    assert len(tag.slot_extents(base, "msi")) == 1
    assert tag.read_slot(stamp(base, "msi", b'{"g": 1}'), "msi") == b'{"g": 1}'


def test_msi_with_4096_byte_sectors():
    base = signed_msi(shift=12, interleave=True)
    assert tag.read_slot(stamp(base, "msi", PAYLOAD), "msi") == PAYLOAD


def test_unknown_kind_is_a_usage_error():
    for function in (tag.slot_extents, tag.read_slot, tag.checksum_field):
        with pytest.raises(UsageError):
            function(signed_exe(), "dmg")


@pytest.mark.parametrize("kind, maker", [("exe", signed_msi), ("msi", signed_exe)])
def test_wrong_format_raises_format_error(kind, maker):
    with pytest.raises(FormatError):
        tag.slot_extents(maker(), kind)


@pytest.mark.parametrize("kind, maker", [("exe", signed_exe), ("msi", signed_msi)])
def test_truncated_file_raises_format_error(kind, maker):
    base = maker()
    for cut in (10, len(base) // 2, len(base) - 1):
        with pytest.raises(FormatError):
            tag.slot_extents(base[:cut], kind)


def test_signature_without_slot_raises_slot_error():
    unslotted = PE.make_pe(certs=PE.win_certificate(P7.TIMESTAMPED))
    with pytest.raises(SlotError):
        tag.slot_extents(unslotted, "exe")


def test_payload_too_big_raises_slot_error():
    with pytest.raises(SlotError, match="larger slot"):
        encode_slot(os.urandom(SLOT_SIZE), SLOT_SIZE)


def test_stamp_of_the_wrong_size_raises_slot_error():
    base = signed_exe()
    extents = tag.slot_extents(base, "exe")
    with pytest.raises(SlotError):
        tag.stamp_pieces(len(base), extents, encode_slot(b"x", 4096))


def test_extents_outside_the_base_raise_slot_error():
    with pytest.raises(SlotError):
        tag.stamp_pieces(100, [(90, 20)], bytes(20))
    with pytest.raises(SlotError):
        tag.stamp_pieces(100, [(10, 20), (20, 20)], bytes(40))


def test_damaged_slot_raises_format_error():
    base = bytearray(signed_exe())
    (offset, _), = tag.slot_extents(bytes(base), "exe")
    base[offset] ^= 0xFF
    with pytest.raises(FormatError, match="magic"):
        tag.read_slot(bytes(base), "exe")
