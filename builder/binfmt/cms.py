"""Byte-level pieces of a CMS SignedData (RFC 5652) that its users share: the signed attributes
as they are signed, the time in an RFC 3161 timestamp token, and replacing a SignerInfo's signed
attributes and signature in place. No keys, no policy: builder/signing/apple/cms.py signs and
checks with them."""

from __future__ import annotations

from asn1crypto import cms as asn1_cms


def attrs_as_signed(attrs_der: bytes) -> bytes:
    """The signed attributes as the signature covers them: a SET OF (tag 0x31), not the [0]
    IMPLICIT field they are stored as."""
    return b"\x31" + attrs_der[1:]


def timestamp_time(token_der: bytes) -> str:
    """The time of an RFC 3161 token (reported, not verified: Apple's TSA root is not here)."""
    try:
        token = asn1_cms.ContentInfo.load(token_der)
        tst = token["content"]["encap_content_info"]["content"].parsed
        return str(tst["gen_time"].native)
    except (ValueError, TypeError, KeyError, AttributeError):
        return "present (unreadable)"


def replace_signer_bytes(data: bytes, der: bytes, old_attrs: bytes, new_attrs: bytes,
                         old_signature: bytes, new_signature: bytes) -> bytes | None:
    """`data` (starting with the SignedData `der`, possibly followed by padding) with a
    SignerInfo's signed attributes and signature replaced by new bytes of the same lengths; None
    when they are not found exactly once each, the attributes before the signature."""
    at_attrs, at_signature = der.find(old_attrs), der.find(old_signature)
    if (der.count(old_attrs) != 1 or der.count(old_signature) != 1
            or at_attrs + len(old_attrs) > at_signature):  # SignerInfo: signedAttrs, ..., signature
        return None
    patched = bytearray(data)
    patched[at_attrs:at_attrs + len(new_attrs)] = new_attrs
    patched[at_signature:at_signature + len(new_signature)] = new_signature
    return bytes(patched)
