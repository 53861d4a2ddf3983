"""A checker of a flat package's <signature> the way Apple's xar checks it, written from the xar
format (header, zlib TOC, heap) and PKCS#1 v1.5, not from builder's writer or reader.

xar's signature check (xar/lib/signature.c, as productsign writes it): the TOC checksum (style
sha1: SHA-1 of the compressed TOC, stored at heap offset <checksum><offset>) is the value that
is signed; the <signature style="RSA"> bytes are RSA PKCS#1 v1.5 over a DigestInfo naming SHA-1
and holding those 20 bytes (the checksum is taken as the already computed SHA-1 hash). The
certificates in <KeyInfo><X509Data> are leaf first, then each issuer in turn.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

SHA1_DIGEST_INFO_PREFIX = bytes.fromhex("3021300906052b0e03021a05000414")


@dataclass(frozen=True)
class AppleSignatureCheck:
    checksum: bytes
    signature: bytes
    certificates: list[x509.Certificate]
    digest_info: bytes  # what the RSA block holds, recovered with the leaf's public key

    @property
    def ok(self) -> bool:
        return self.digest_info == SHA1_DIGEST_INFO_PREFIX + self.checksum

    @property
    def chain_in_order(self) -> bool:
        """Leaf first, each following certificate the issuer of the one before."""
        certs = self.certificates
        return all(certs[i].issuer == certs[i + 1].subject for i in range(len(certs) - 1))


def check(data: bytes) -> AppleSignatureCheck:
    magic, header_size, version, toc_length, toc_plain, algorithm = struct.unpack(">4sHHQQI", data[:28])
    if magic != b"xar!" or version != 1:
        raise ValueError("not a xar")
    if algorithm != 1:
        raise ValueError(f"checksum algorithm {algorithm}, productsign writes 1 (sha1)")
    compressed = data[header_size:header_size + toc_length]
    plain = zlib.decompress(compressed)
    if len(plain) != toc_plain:
        raise ValueError("TOC size mismatch")
    heap = header_size + toc_length
    toc = ET.fromstring(plain).find("toc")
    cksum = toc.find("checksum")
    if cksum.get("style") != "sha1":
        raise ValueError(f"checksum style {cksum.get('style')}")
    offset, size = int(cksum.findtext("offset")), int(cksum.findtext("size"))
    checksum = data[heap + offset:heap + offset + size]
    if checksum != hashlib.sha1(compressed).digest():
        raise ValueError("TOC checksum does not match the compressed TOC")
    sig = toc.find("signature")
    if sig is None or sig.get("style") != "RSA":
        raise ValueError("no <signature style='RSA'>")
    offset, size = int(sig.findtext("offset")), int(sig.findtext("size"))
    signature = data[heap + offset:heap + offset + size]
    certificates = [x509.load_der_x509_certificate(base64.b64decode("".join((e.text or "").split())))
                    for e in sig.iter() if e.tag.rpartition("}")[2] == "X509Certificate"]
    public_key = certificates[0].public_key()
    try:
        # The raw PKCS#1 v1.5 block, unpadded with the public key: the DigestInfo, whatever it names.
        digest_info = public_key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    except Exception:  # noqa: BLE001 - a signature that is no PKCS#1 v1.5 block at all
        digest_info = b""
    return AppleSignatureCheck(checksum, signature, certificates, digest_info)
