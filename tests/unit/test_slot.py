import pytest

from builder.binfmt.slot import MAGIC, SLOT_SIZE, capacity, decode_slot, empty_slot, encode_slot
from builder.errors import FormatError, SlotError


def test_layout_is_magic_length_payload_padding():
    slot = encode_slot(b"abc", 32)
    assert slot == MAGIC + b"\x03\x00\x00\x00" + b"abc" + bytes(17)
    assert len(slot) == 32


def test_default_size_fits_the_largest_signed_enrollment():
    assert SLOT_SIZE == 12288
    assert len(empty_slot()) == SLOT_SIZE == len(encode_slot(b"x"))


def test_round_trip():
    payload = b'{"group": "g1"}' * 300
    assert decode_slot(encode_slot(payload, SLOT_SIZE)) == payload


def test_empty_slot_decodes_to_none():
    assert empty_slot(64) == MAGIC + bytes(56)
    assert decode_slot(empty_slot(64)) is None


def test_payload_of_exactly_capacity_fits():
    payload = b"x" * capacity(100)
    assert decode_slot(encode_slot(payload, 100)) == payload


def test_payload_over_capacity_says_by_how_much():
    with pytest.raises(SlotError) as caught:
        encode_slot(b"x" * (capacity(100) + 5), 100)
    assert "5 over" in str(caught.value)
    assert "larger slot" in str(caught.value)


def test_size_smaller_than_header_is_refused():
    with pytest.raises(SlotError):
        empty_slot(11)


@pytest.mark.parametrize("buf", [
    b"",
    MAGIC,
    b"ENRSLOT2" + bytes(24),
    MAGIC + (25).to_bytes(4, "little") + bytes(20),  # claims more than it holds
])
def test_malformed_slots_raise_format_error(buf):
    with pytest.raises(FormatError):
        decode_slot(buf)
