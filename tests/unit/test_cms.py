"""The CMS byte pieces in builder.binfmt.cms, with bytes."""

from builder.binfmt import cms


def test_signed_attributes_are_signed_as_a_set_of():
    assert cms.attrs_as_signed(b"\xa0\x03abc") == b"\x31\x03abc"


def test_signer_bytes_are_replaced_in_place_and_the_padding_kept():
    der = b"<head>ATTRS<mid>SIGN<tail>"
    out = cms.replace_signer_bytes(der + bytes(4), der, b"ATTRS", b"attrs", b"SIGN", b"sign")
    assert out == b"<head>attrs<mid>sign<tail>" + bytes(4)


def test_signer_bytes_found_twice_or_out_of_order_are_not_replaced():
    twice = b"ATTRS ATTRS SIGN"
    assert cms.replace_signer_bytes(twice, twice, b"ATTRS", b"attrs", b"SIGN", b"sign") is None
    reversed_ = b"SIGN ATTRS"
    assert cms.replace_signer_bytes(reversed_, reversed_, b"ATTRS", b"attrs", b"SIGN", b"sign") is None


def test_an_unreadable_timestamp_token_is_reported_as_such():
    assert cms.timestamp_time(b"\x30\x00") == "present (unreadable)"
