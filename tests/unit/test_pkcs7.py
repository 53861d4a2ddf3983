import pytest
from asn1crypto import cms, core
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.binfmt.pkcs7 import SLOT_OID, add_slot, element_size, find_slot, oid_der
from builder.binfmt.slot import empty_slot
from builder.errors import FormatError, SlotError, VerificationError
from builder.binfmt import pkcs7

TIMESTAMP_OID = "1.3.6.1.4.1.311.3.3.1"


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes([tag]) + der_len(len(body)) + body


def oid(dotted: str) -> bytes:
    return core.ObjectIdentifier(dotted).dump()  # an encoder independent of the module


def attribute(dotted: str, value: bytes) -> bytes:
    return tlv(0x30, oid(dotted), tlv(0x31, value))


SIGNED_ATTRS = tlv(0xA0, attribute("1.2.840.113549.1.9.3", oid("1.3.6.1.4.1.311.2.1.4")),
                   attribute("1.2.840.113549.1.9.4", tlv(0x04, bytes(range(32)))))
# Stands in for an RFC 3161 token (itself a ContentInfo).
TIMESTAMP = attribute(TIMESTAMP_OID, tlv(0x30, oid("1.2.840.113549.1.7.1"),
                                         tlv(0xA0, tlv(0x04, b"t" * 300))))


def signer_info(unsigned: bytes | None, signature: bytes = b"s" * 256) -> bytes:
    return tlv(0x30,
               tlv(0x02, b"\x01"),
               tlv(0x30, tlv(0x30), tlv(0x02, b"\x30\x39")),  # issuer and serial number
               tlv(0x30, oid("2.16.840.1.101.3.4.2.1"), b"\x05\x00"),
               SIGNED_ATTRS,
               tlv(0x30, oid("1.2.840.113549.1.1.1"), b"\x05\x00"),
               tlv(0x04, signature),
               *([tlv(0xA1, unsigned)] if unsigned is not None else []))


def signed_data(*signers: bytes, certificates: bool = True) -> bytes:
    return tlv(0x30, oid("1.2.840.113549.1.7.2"), tlv(0xA0, tlv(
        0x30,
        tlv(0x02, b"\x01"),
        tlv(0x31, tlv(0x30, oid("2.16.840.1.101.3.4.2.1"), b"\x05\x00")),
        tlv(0x30, oid("1.3.6.1.4.1.311.2.1.4"), tlv(0xA0, tlv(0x30, tlv(0x02, b"\x07")))),
        *([tlv(0xA0, tlv(0x30, b"c" * 200))] if certificates else []),
        tlv(0x31, *signers))))


TIMESTAMPED = signed_data(signer_info(TIMESTAMP))


def unsigned_attrs(der: bytes, index: int = 0) -> list:
    info = cms.ContentInfo.load(der)["content"]["signer_infos"][index]
    return list(info["unsigned_attrs"]) if info["unsigned_attrs"].native is not None else []


def test_oid_der_matches_asn1crypto():
    for dotted in (SLOT_OID, "1.2.840.113549.1.7.2", "2.999.1", "1.3.6.1.4.1.4294967295.1"):
        assert oid_der(dotted) == oid(dotted)


def test_slot_is_appended_after_the_timestamp_and_nothing_else_changes():
    out = add_slot(TIMESTAMPED, 8192)
    attrs = unsigned_attrs(out)
    assert [a["type"].dotted for a in attrs] == [TIMESTAMP_OID, SLOT_OID]
    assert attrs[0].dump() == TIMESTAMP
    assert attrs[1]["values"][0].parsed.native == empty_slot(8192)
    original = cms.ContentInfo.load(TIMESTAMPED)["content"]
    stamped = cms.ContentInfo.load(out)["content"]
    for field in ("version", "digest_algorithms", "encap_content_info", "certificates"):
        assert stamped[field].dump() == original[field].dump()
    for field in ("sid", "digest_algorithm", "signed_attrs", "signature_algorithm", "signature"):
        assert stamped["signer_infos"][0][field].dump() == original["signer_infos"][0][field].dump()
    # The signed attributes' exact bytes are what the signature covers.
    assert SIGNED_ATTRS[1:] in out


def test_unsigned_attributes_are_created_when_absent():
    der = signed_data(signer_info(None), certificates=False)
    out = add_slot(der, 100)
    assert [a["type"].dotted for a in unsigned_attrs(out)] == [SLOT_OID]


def test_only_the_first_signer_gets_the_slot():
    der = signed_data(signer_info(TIMESTAMP), signer_info(None, b"t" * 256))
    out = add_slot(der, 64)
    assert len(unsigned_attrs(out, 0)) == 2
    assert unsigned_attrs(out, 1) == []


@pytest.mark.parametrize("size", [12, 100, 200, 8192, 70000])
def test_find_slot_points_at_the_empty_slot(size):
    out = add_slot(TIMESTAMPED, size)
    offset, length = find_slot(out)
    assert length == size
    assert out[offset:offset + length] == empty_slot(size)
    assert element_size(out) == len(out)


def test_find_slot_works_on_a_memoryview_with_trailing_padding():
    out = add_slot(TIMESTAMPED, 256) + bytes(5)
    offset, length = find_slot(memoryview(out))
    assert out[offset:offset + length] == empty_slot(256)


def test_adding_a_second_slot_is_refused():
    with pytest.raises(SlotError):
        add_slot(add_slot(TIMESTAMPED, 64), 64)


def test_signature_without_slot_raises_slot_error():
    with pytest.raises(SlotError):
        find_slot(TIMESTAMPED)


@pytest.mark.parametrize("der", [
    b"",
    b"\x30",
    b"\x30\x00",
    b"\x02\x01\x00",
    tlv(0x30, oid("1.2.840.113549.1.7.1"), tlv(0xA0, tlv(0x04, b"data"))),  # pkcs7-data
    tlv(0x30, oid("1.2.840.113549.1.7.2"), tlv(0xA0, tlv(0x30, tlv(0x02, b"\x01")))),
    signed_data(),  # no SignerInfo
    b"\x30\x80" + TIMESTAMPED[4:] + b"\x00\x00",  # BER indefinite length
    TIMESTAMPED[:-1],
    TIMESTAMPED[:40],
])
def test_not_a_signed_data_raises_format_error(der):
    with pytest.raises(FormatError):
        add_slot(der, 64)
    with pytest.raises(FormatError):
        find_slot(der)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_input_raises_only_builder_errors(data):
    der = bytearray(add_slot(TIMESTAMPED, 64))
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(der)))
    try:
        offset, length = find_slot(bytes(der[:cut]))
    except (FormatError, SlotError):
        return
    assert 0 <= offset and offset + length <= cut


def test_a_second_slot_attribute_is_refused():
    # Two slots: which one would a reader take? Agents refuse the question, and so does builder.
    one = add_slot(TIMESTAMPED, 64)
    signer = pkcs7._signer_path(one)[-1]
    attrs = pkcs7._unsigned_attrs(one, signer)
    slot_attr = pkcs7._slot_attribute(one, attrs)
    extra = bytes(one[slot_attr.start:slot_attr.end])
    new_attrs = pkcs7._rewrap(one, attrs, one[attrs.header_end:attrs.end] + extra)
    new = pkcs7._rewrap(one, signer, one[signer.header_end:attrs.start] + new_attrs + one[attrs.end:signer.end])
    path = pkcs7._signer_path(one)
    replaced = signer
    for outer in reversed(path[:-1]):
        new = pkcs7._rewrap(one, outer, one[outer.header_end:replaced.start] + new + one[replaced.end:outer.end])
        replaced = outer
    with pytest.raises(VerificationError, match="2 enrollment slots"):
        find_slot(new)
