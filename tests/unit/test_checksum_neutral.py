"""A stamp that keeps the PE CheckSum valid without touching the CheckSum field."""

import os

import pytest

from builder.binfmt import pe, slot, tag
from builder.errors import SlotError


@pytest.mark.parametrize("offset", [7, 1000, 1001, 4096])
@pytest.mark.parametrize("payload_len", [0, 1, 500, 1024 - 12 - 3])
def test_word_sum_is_unchanged(offset, payload_len):
    rnd = os.urandom
    base = bytearray(rnd(20000))
    empty = slot.empty_slot(1024)
    base[offset:offset + 1024] = empty
    before = pe.words_sum(bytes(base))
    new = slot.encode_slot(rnd(payload_len), 1024)
    balanced = tag.checksum_neutral(new, empty, offset)
    assert slot.decode_slot(balanced) == slot.decode_slot(new)
    base[offset:offset + 1024] = balanced
    assert pe.words_sum(bytes(base)) == before


def test_a_full_slot_is_refused():
    empty = slot.empty_slot(1024)
    full = slot.encode_slot(b"x" * (1024 - 12), 1024)
    with pytest.raises(SlotError, match="checksum word"):
        tag.checksum_neutral(full, empty, 0)
