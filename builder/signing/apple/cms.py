"""CMS SignedData as Apple's signatures use it: checking a detached signature (flat package
<x-signature>, the code signature's CMS blob) and giving a flat package's signature a fixed
signing time without changing its length."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from builder import log
from builder.binfmt import cms as binfmt_cms
from builder.errors import FormatError, SigningError

_OID_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"
_OID_CDHASHES_PLIST = "1.2.840.113635.100.9.1"
_OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
HASH_BY_NAME = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
                "sha512": hashes.SHA512}


@dataclass(frozen=True)
class CmsSignature:
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    signing_time: str | None
    timestamp: str | None
    cdhashes_plist: bytes | None


def verify_cms(der: bytes, content: bytes, what: str) -> CmsSignature:
    """Check a detached CMS SignedData over `content`; FormatError/InvalidSignature with a reason."""
    try:
        info = asn1_cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise FormatError(f"{what}: CMS content type is {info['content_type'].native}, not signed data")
        signed = info["content"]
        certs = tuple(x509.load_der_x509_certificate(c.chosen.dump()) for c in signed["certificates"]
                      if c.name == "certificate")
        signer_infos = list(signed["signer_infos"])
        if len(signer_infos) != 1:
            raise FormatError(f"{what}: CMS has {len(signer_infos)} signers, one expected")
        signer_info = signer_infos[0]
        sid = signer_info["sid"]
        if sid.name == "issuer_and_serial_number":
            serial = sid.chosen["serial_number"].native
            issuer = sid.chosen["issuer"].dump()
            matches = [c for c in certs if c.serial_number == serial and
                       c.issuer.public_bytes() == issuer]
        else:
            ski = sid.chosen.native
            matches = [c for c in certs if _ski(c) == ski]
        if not matches:
            raise FormatError(f"{what}: the CMS signer's certificate is not in the signature")
        cert = matches[0]
        digest_name = signer_info["digest_algorithm"]["algorithm"].native
        if digest_name not in HASH_BY_NAME:
            raise FormatError(f"{what}: CMS digest algorithm {digest_name} is not supported")
        attrs = signer_info["signed_attrs"]
        signing_time = cdhashes = None
        if len(attrs):
            by_type = {a["type"].dotted: a for a in attrs}
            digest = by_type.get("1.2.840.113549.1.9.4")
            if digest is None:
                raise FormatError(f"{what}: CMS signed attributes lack a message digest")
            expected = hashlib.new(digest_name, content).digest()
            if digest["values"][0].native != expected:
                raise InvalidSignature(f"{what}: CMS message digest does not match the signed content")
            if "1.2.840.113549.1.9.5" in by_type:
                signing_time = str(by_type["1.2.840.113549.1.9.5"]["values"][0].native)
            if _OID_CDHASHES_PLIST in by_type:
                cdhashes = asn1_core.OctetString.load(by_type[_OID_CDHASHES_PLIST]["values"][0].dump()).native
            signed_bytes = binfmt_cms.attrs_as_signed(attrs.dump())
        else:
            signed_bytes = content
        signature = signer_info["signature"].native
        algo = signer_info["signature_algorithm"].signature_algo
        public_key = cert.public_key()
        hash_cls = HASH_BY_NAME[digest_name]
        if isinstance(public_key, rsa.RSAPublicKey) and algo == "rsassa_pkcs1v15":
            public_key.verify(signature, signed_bytes, padding.PKCS1v15(), hash_cls())
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and algo == "ecdsa":
            public_key.verify(signature, signed_bytes, ec.ECDSA(hash_cls()))
        else:
            raise FormatError(f"{what}: CMS signature algorithm {algo} is not supported here")
        timestamp = None
        unsigned = signer_info["unsigned_attrs"]
        if len(unsigned):
            for attr in unsigned:
                if attr["type"].dotted == _OID_TIMESTAMP_TOKEN:
                    timestamp = binfmt_cms.timestamp_time(attr["values"][0].dump())
        return CmsSignature(cert, certs, signing_time, timestamp, cdhashes)
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{what}: CMS signature does not parse ({exc})") from None


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def cms_with_signing_time(data: bytes, when: dt.datetime, private_key: object, what: str) -> bytes:
    """`data` (a DER CMS SignedData, possibly followed by padding) with its one signer's
    signingTime set to `when` and the signed attributes signed again with `private_key`.

    The result has the same length as `data`, so it can replace it in a file that records
    where it sits; a time whose encoding has another length is a SigningError. RSA PKCS#1 v1.5
    is deterministic, so equal inputs give equal bytes. Returned unchanged: no signed attributes
    or no signingTime (nothing to fix), and a signature with an RFC 3161 timestamp, whose token
    stamps the old signature (and whose own time differs per run anyway).
    """
    try:
        info = asn1_cms.ContentInfo.load(data)
        der = info.dump()  # the parsed value's own bytes, without the padding
        signer_infos = list(info["content"]["signer_infos"]) if info["content_type"].native == "signed_data" else []
        if len(signer_infos) != 1:
            raise SigningError(f"{what}: the CMS signature is not a SignedData with one signer",
                               "sign with apple-platform-py's flat package signer")
        signer_info = signer_infos[0]
        attrs = signer_info["signed_attrs"]
        times = [a for a in attrs if a["type"].dotted == _OID_SIGNING_TIME] if len(attrs) else []
        if not times:
            return data
        unsigned = signer_info["unsigned_attrs"]
        if len(unsigned) and any(a["type"].dotted == _OID_TIMESTAMP_TOKEN for a in unsigned):
            log.debug(f"{what}: the CMS signature has a secure timestamp; its signing time is kept")
            return data
        if len(times) != 1 or len(times[0]["values"]) != 1:
            raise SigningError(f"{what}: the CMS signature has more than one signing time",
                               "sign with apple-platform-py's flat package signer")
        digest_name = signer_info["digest_algorithm"]["algorithm"].native
        algorithm = signer_info["signature_algorithm"].signature_algo
        old_attrs = attrs.dump()
        old_attr = times[0].dump()
        old_time = times[0]["values"][0].dump()
        old_signature = signer_info["signature"].native
    except (ValueError, TypeError, KeyError) as exc:
        raise SigningError(f"{what}: the CMS signature does not parse ({exc})",
                           "sign with apple-platform-py's flat package signer") from None
    # RFC 5652: UTCTime for 1950 to 2049, GeneralizedTime otherwise.
    choice = "utc_time" if 1950 <= when.year <= 2049 else "generalized_time"
    new_time = asn1_cms.Time({choice: when}).dump()
    if len(new_time) != len(old_time):
        raise SigningError(f"{what}: signing time {when:%Y-%m-%dT%H:%M:%SZ} needs {len(new_time)} bytes "
                           f"of DER, the signature has room for {len(old_time)}",
                           "use a signing time between 1950 and 2049 (SOURCE_DATE_EPOCH)")
    if new_time == old_time:
        return data
    if not isinstance(private_key, rsa.RSAPrivateKey) or algorithm != "rsassa_pkcs1v15":
        raise SigningError(f"{what}: a fixed signing time needs an RSA PKCS#1 v1.5 signature, "
                           f"this one is {algorithm}", "use an RSA Developer ID identity")
    if digest_name not in HASH_BY_NAME:
        raise SigningError(f"{what}: CMS digest algorithm {digest_name} is not supported",
                           "sign with apple-platform-py's flat package signer")
    # The value is the last thing in its attribute; only its bytes change, no length does.
    if not old_attr.endswith(old_time) or old_attrs.count(old_attr) != 1:
        raise SigningError(f"{what}: the CMS signing time is not where it was expected",
                           "sign with apple-platform-py's flat package signer")
    new_attrs = old_attrs.replace(old_attr, old_attr[:-len(old_time)] + new_time)
    signature = private_key.sign(binfmt_cms.attrs_as_signed(new_attrs), padding.PKCS1v15(),
                                 HASH_BY_NAME[digest_name]())
    if len(signature) != len(old_signature):
        raise SigningError(f"{what}: the new CMS signature is {len(signature)} bytes, the old one "
                           f"{len(old_signature)}", "use the identity the package was signed with")
    patched = binfmt_cms.replace_signer_bytes(data, der, old_attrs, new_attrs, old_signature, signature)
    if patched is None:
        raise SigningError(f"{what}: the CMS signed attributes are not where they were expected",
                           "sign with apple-platform-py's flat package signer")
    return patched
