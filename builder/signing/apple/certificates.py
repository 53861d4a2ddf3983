"""What a Developer ID certificate looks like and which CAs Apple ships: the Developer ID marks
(critical extensions and EKUs), the kind of a leaf, a readable description of one for error
messages, and Apple's roots and intermediates bundled in builder/resources/apple/."""

from __future__ import annotations

import functools
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# How Apple marks Developer ID certificates (seen in genuine ones): each leaf carries its kind's
# marker as a critical certificate extension (value NULL), never as an EKU, beside the EKU that
# says what it signs; its issuer carries the Developer ID CA marker.
OID_DEVID_APPLICATION = x509.ObjectIdentifier("1.2.840.113635.100.6.1.13")
OID_DEVID_INSTALLER = x509.ObjectIdentifier("1.2.840.113635.100.6.1.14")
OID_EKU_PACKAGE_SIGNING = x509.ObjectIdentifier("1.2.840.113635.100.4.13")
OID_DEVID_CA = x509.ObjectIdentifier("1.2.840.113635.100.6.2.6")
APPLICATION = "Developer ID Application"
INSTALLER = "Developer ID Installer"
# kind -> (critical marker extension, required EKU)
_KIND_MARKS = {APPLICATION: (OID_DEVID_APPLICATION, ExtendedKeyUsageOID.CODE_SIGNING),
               INSTALLER: (OID_DEVID_INSTALLER, OID_EKU_PACKAGE_SIGNING)}
EXPECTED_SHAPE = (f"expected a '{APPLICATION}' (EKU codeSigning + critical extension "
                  f"{OID_DEVID_APPLICATION.dotted_string}) or '{INSTALLER}' (EKU "
                  f"{OID_EKU_PACKAGE_SIGNING.dotted_string} + critical extension "
                  f"{OID_DEVID_INSTALLER.dotted_string}) certificate with its key")
# Critical extensions a chain may carry: what `cryptography` parses and this module checks, plus
# Apple's markers. Any other critical extension stops the chain, as RFC 5280 asks (and as
# OpenSSL does, which is why openssl needs -ignore_critical for Apple's own certificates).
KNOWN_CRITICAL = {x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid,
                  x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid,
                  x509.CertificatePolicies.oid, x509.SubjectAlternativeName.oid,
                  OID_DEVID_APPLICATION, OID_DEVID_INSTALLER, OID_DEVID_CA}
APPLE_RESOURCES = Path(__file__).resolve().parents[2] / "resources" / "apple"


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def developer_id_kind(cert: x509.Certificate) -> str | None:
    """APPLICATION or INSTALLER when `cert` is a Developer ID leaf as Apple issues it, else None.

    Application: EKU codeSigning + critical extension 1.2.840.113635.100.6.1.13. Installer: EKU
    1.2.840.113635.100.4.13 + critical extension 1.2.840.113635.100.6.1.14. Exactly one marker;
    not a CA. The common name is not looked at: anyone can name a certificate "Developer ID".
    """
    if is_ca(cert):
        return None
    ekus = _ekus(cert) or []
    extensions = {ext.oid: ext for ext in cert.extensions}
    marked = [kind for kind, (mark, _) in _KIND_MARKS.items() if mark in extensions]
    if len(marked) != 1:
        return None
    kind = marked[0]
    mark, eku = _KIND_MARKS[kind]
    return kind if extensions[mark].critical and eku in ekus else None


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = getattr(oid, "_name", "Unknown OID")
    return oid.dotted_string if name == "Unknown OID" else name


def describe_certificate(cert: x509.Certificate) -> str:
    """What makes or unmakes a Developer ID identity, as found in `cert`: for error messages."""
    parts = []
    if is_ca(cert):
        parts.append("a CA certificate")
    ekus = _ekus(cert)
    marks = {OID_DEVID_APPLICATION, OID_DEVID_INSTALLER}
    if ekus is None:
        parts.append("no EKU")
    else:
        parts.append("EKU " + ", ".join(_oid_name(e) for e in ekus if e not in marks) if any(e not in marks for e in ekus)
                     else "no EKU")
        misplaced = [e.dotted_string for e in ekus if e in marks]
        if misplaced:
            parts.append(f"the Developer ID OID {', '.join(misplaced)} in the EKU (Apple puts it in its own "
                         "critical extension)")
    found = [f"extension {ext.oid.dotted_string} ({'critical' if ext.critical else 'not critical'})"
             for ext in cert.extensions if ext.oid in marks]
    parts.append("; ".join(found) if found else "no Developer ID extension")
    return "; ".join(parts)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


@functools.lru_cache(maxsize=1)
def _apple_certificates() -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
    """(Apple's roots, Apple's Developer ID and timestamp intermediates) shipped with builder
    (builder/resources/apple/README.md says where each came from)."""
    roots, intermediates = [], []
    for path in sorted(APPLE_RESOURCES.glob("*.cer")):
        cert = x509.load_der_x509_certificate(path.read_bytes())
        (roots if cert.subject == cert.issuer else intermediates).append(cert)
    return tuple(roots), tuple(intermediates)


def apple_roots() -> tuple[x509.Certificate, ...]:
    return _apple_certificates()[0]


def apple_intermediates() -> tuple[x509.Certificate, ...]:
    return _apple_certificates()[1]
