"""The enrollment slot inside an Authenticode PKCS#7 SignedData.

The slot is an unauthenticated attribute of the first SignerInfo: Authenticode hashes the file
without its signature, and the signature covers only the authenticated attributes, so the
attribute's value can be rewritten in place without re-signing. Every other byte of the
PKCS#7 (content, certificates, authenticated attributes, a timestamp or nested signature
among the unauthenticated attributes) is carried over unchanged; only the enclosing lengths
grow.

A tiny DER walker is used rather than an ASN.1 library so that nothing is re-encoded: a
re-encoded SET OF or a normalised length inside the signed attributes would break the
signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.binfmt.slot import empty_slot
from builder.errors import FormatError, SlotError, VerificationError

# 1.3.6.1.4.1.32473 is the enterprise number IANA reserves for documentation (RFC 5612): a
# placeholder no third party owns. Put the organisation's own IANA PEN here before the first
# release: slots are found by this value, so it cannot change once releases exist.
SLOT_OID = "1.3.6.1.4.1.32473.1.1"

_SIGNED_DATA_OID = "1.2.840.113549.1.7.2"
_SEQUENCE, _SET, _OID, _OCTET_STRING = 0x30, 0x31, 0x06, 0x04
_CONTEXT_0, _CONTEXT_1 = 0xA0, 0xA1  # constructed [0] and [1]


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def oid_der(dotted: str) -> bytes:
    """The DER encoding (tag, length, value) of an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return bytes([_OID]) + _length(len(body)) + bytes(body)


_SLOT_OID_DER = oid_der(SLOT_OID)
_SIGNED_DATA_OID_DER = oid_der(_SIGNED_DATA_OID)


@dataclass(frozen=True)
class _Tlv:
    tag: int  # the first identifier octet
    start: int  # offset of the identifier
    header_end: int  # offset of the contents
    end: int  # offset just past the contents
    id_end: int  # offset just past the identifier octets (start of the length octets)


def _read(buf, pos: int, limit: int) -> _Tlv:
    start = pos
    if pos + 2 > limit:
        raise FormatError("the PKCS#7 signature is truncated (an element header runs past its end)")
    tag = buf[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number: base-128 continuation octets
        while pos < limit and buf[pos] & 0x80:
            pos += 1
        pos += 1
    id_end = pos
    if pos >= limit:
        raise FormatError("the PKCS#7 signature is truncated (an element header runs past its end)")
    first = buf[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise FormatError("the PKCS#7 signature uses BER indefinite lengths, which Authenticode "
                          "does not allow", hint="sign with a tool that writes DER")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > limit:
            raise FormatError("the PKCS#7 signature has an impossible element length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    if pos + length > limit:
        raise FormatError("the PKCS#7 signature is truncated (an element runs past its end)")
    return _Tlv(tag, start, pos, pos + length, id_end)


def _children(buf, parent: _Tlv) -> list[_Tlv]:
    out, pos = [], parent.header_end
    while pos < parent.end:
        child = _read(buf, pos, parent.end)
        out.append(child)
        pos = child.end
    return out


def _expect(tlv: _Tlv, tag: int, what: str) -> _Tlv:
    if tlv.tag != tag:
        raise FormatError(f"the input is not an Authenticode PKCS#7 SignedData ({what} has tag "
                          f"0x{tlv.tag:02x}, expected 0x{tag:02x})")
    return tlv


def element_size(buf, offset: int = 0) -> int:
    """Size in bytes of the DER element at `offset` (header and contents)."""
    tlv = _read(buf, offset, len(buf))
    return tlv.end - tlv.start


def _signer_path(der) -> list[_Tlv]:
    """[ContentInfo, [0], SignedData, SignerInfos, first SignerInfo]."""
    if not der:
        raise FormatError("the PKCS#7 signature is empty")
    content_info = _expect(_read(der, 0, len(der)), _SEQUENCE, "ContentInfo")
    parts = _children(der, content_info)
    if len(parts) < 2 or bytes(der[parts[0].start:parts[0].end]) != _SIGNED_DATA_OID_DER:
        raise FormatError("the input is not a PKCS#7 SignedData (wrong or missing content type)")
    explicit = _expect(parts[1], _CONTEXT_0, "ContentInfo content")
    inner = _children(der, explicit)
    if len(inner) != 1:
        raise FormatError("the input is not a PKCS#7 SignedData (malformed content)")
    signed_data = _expect(inner[0], _SEQUENCE, "SignedData")
    fields = _children(der, signed_data)
    if len(fields) < 4:
        raise FormatError("the PKCS#7 SignedData is missing fields")
    signer_infos = _expect(fields[-1], _SET, "SignerInfos")
    signers = _children(der, signer_infos)
    if not signers:
        raise FormatError("the PKCS#7 SignedData has no SignerInfo; the file is not signed")
    signer = _expect(signers[0], _SEQUENCE, "SignerInfo")
    return [content_info, explicit, signed_data, signer_infos, signer]


def _unsigned_attrs(der, signer: _Tlv) -> _Tlv | None:
    fields = _children(der, signer)
    if len(fields) < 5:
        raise FormatError("the PKCS#7 SignerInfo is missing fields")
    return fields[-1] if fields[-1].tag == _CONTEXT_1 else None


def _slot_attribute(der, attrs: _Tlv) -> _Tlv | None:
    found = []
    for attr in _children(der, attrs):
        _expect(attr, _SEQUENCE, "an unauthenticated attribute")
        kids = _children(der, attr)
        if kids and bytes(der[kids[0].start:kids[0].end]) == _SLOT_OID_DER:
            found.append(attr)
    if len(found) > 1:
        # Which one would a reader take? The agents refuse the question, and so do we.
        raise VerificationError(f"the signature has {len(found)} enrollment slots; a release has one",
                                hint="the file was altered after signing: do not use it")
    return found[0] if found else None


def add_slot(pkcs7_der: bytes, size: int) -> bytes:
    """`pkcs7_der` with an empty slot of `size` bytes added to its first SignerInfo."""
    der = bytes(pkcs7_der)
    path = _signer_path(der)
    signer = path[-1]
    attrs = _unsigned_attrs(der, signer)
    if attrs is not None and _slot_attribute(der, attrs) is not None:
        raise SlotError("the signature already has an enrollment slot",
                        hint="add the slot to a freshly signed file")
    value = empty_slot(size)
    octets = bytes([_OCTET_STRING]) + _length(len(value)) + value
    values = bytes([_SET]) + _length(len(octets)) + octets
    body = _SLOT_OID_DER + values
    attribute = bytes([_SEQUENCE]) + _length(len(body)) + body

    # Appended last: DER orders a SET OF by encoding, and the slot's long length sorts after
    # the usual timestamp or nested-signature attributes.
    if attrs is None:
        new = _rewrap(der, signer, der[signer.header_end:signer.end]
                      + bytes([_CONTEXT_1]) + _length(len(attribute)) + attribute)
    else:
        new_attrs = _rewrap(der, attrs, der[attrs.header_end:attrs.end] + attribute)
        new = _rewrap(der, signer, der[signer.header_end:attrs.start] + new_attrs
                      + der[attrs.end:signer.end])
    # Rebuild each enclosing element around its replaced child, innermost first.
    replaced = signer
    for outer in reversed(path[:-1]):
        new = _rewrap(der, outer, der[outer.header_end:replaced.start] + new
                      + der[replaced.end:outer.end])
        replaced = outer
    return new


def _rewrap(der: bytes, tlv: _Tlv, contents: bytes) -> bytes:
    return der[tlv.start:tlv.id_end] + _length(len(contents)) + contents


def find_slot(pkcs7_der) -> tuple[int, int]:
    """(offset, length) of the slot's bytes within `pkcs7_der`."""
    signer = _signer_path(pkcs7_der)[-1]
    attrs = _unsigned_attrs(pkcs7_der, signer)
    attr = _slot_attribute(pkcs7_der, attrs) if attrs is not None else None
    if attr is None:
        raise SlotError("the signature has no enrollment slot",
                        hint="build and sign the release with a slot before stamping it")
    kids = _children(pkcs7_der, attr)
    values = _expect(kids[1], _SET, "the slot attribute's values") if len(kids) == 2 else None
    octets = _children(pkcs7_der, values) if values else []
    if len(octets) != 1 or octets[0].tag != _OCTET_STRING:
        raise FormatError("the enrollment slot attribute is malformed (expected one OCTET STRING)")
    return octets[0].header_end, octets[0].end - octets[0].header_end
