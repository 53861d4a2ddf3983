"""A test PKI built to Apple's published certificate layout, written apart from builder's devca.

Apple Root CA -> Developer ID Certification Authority (G2) -> Developer ID Application /
Developer ID Installer, with the names, key usages, EKUs and Apple extensions of the genuine
certificates (Apple PKI, "Developer ID" certificate profile; the genuine root and G2
intermediate are shipped in builder/resources/apple/ and were compared field by field):

- root: CN=Apple Root CA, OU=Apple Certification Authority, O=Apple Inc., C=US; basicConstraints
  critical CA; keyUsage critical keyCertSign+cRLSign; SKI; AKI.
- intermediate: CN=Developer ID Certification Authority, OU=G2, O=Apple Inc., C=US;
  basicConstraints critical CA pathlen 0; keyUsage critical keyCertSign+cRLSign; extension
  1.2.840.113635.100.6.2.6 (NULL, not critical).
- Application leaf: UID=team, CN="Developer ID Application: <name> (<team>)", OU=team, O=name,
  C=US; basicConstraints critical CA:false; keyUsage critical digitalSignature; EKU critical
  codeSigning; extension 1.2.840.113635.100.6.1.13 critical NULL; 1.2.840.113635.100.6.1.33
  (Developer ID date, not critical).
- Installer leaf: the same with EKU critical 1.2.840.113635.100.4.13 (package signing) and
  extension 1.2.840.113635.100.6.1.14 critical NULL.

Nothing here imports builder: the keys are made only with `cryptography`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DER_NULL = b"\x05\x00"
OID_APPLICATION_MARK = x509.ObjectIdentifier("1.2.840.113635.100.6.1.13")
OID_INSTALLER_MARK = x509.ObjectIdentifier("1.2.840.113635.100.6.1.14")
OID_PACKAGE_SIGNING_EKU = x509.ObjectIdentifier("1.2.840.113635.100.4.13")
OID_DEVELOPER_ID_CA = x509.ObjectIdentifier("1.2.840.113635.100.6.2.6")
OID_DEVELOPER_ID_DATE = x509.ObjectIdentifier("1.2.840.113635.100.6.1.33")
OID_USER_ID = x509.ObjectIdentifier("0.9.2342.19200300.100.1.1")
TEAM = "TESTTEAM42"
PASSWORD = b"apple-test-pki"


def _name(*pairs) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


ROOT_NAME = _name((NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "Apple Inc."),
                  (NameOID.ORGANIZATIONAL_UNIT_NAME, "Apple Certification Authority"),
                  (NameOID.COMMON_NAME, "Apple Root CA"))
DEVID_CA_NAME = _name((NameOID.COMMON_NAME, "Developer ID Certification Authority"),
                      (NameOID.ORGANIZATIONAL_UNIT_NAME, "G2"), (NameOID.ORGANIZATION_NAME, "Apple Inc."),
                      (NameOID.COUNTRY_NAME, "US"))


def leaf_name(kind: str, person: str = "Example Support Inc") -> x509.Name:
    return _name((OID_USER_ID, TEAM), (NameOID.COMMON_NAME, f"{kind}: {person} ({TEAM})"),
                 (NameOID.ORGANIZATIONAL_UNIT_NAME, TEAM), (NameOID.ORGANIZATION_NAME, person),
                 (NameOID.COUNTRY_NAME, "US"))


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _base(subject, issuer, public_key, issuer_key, start, days):
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False))


@dataclass(frozen=True)
class ApplePKI:
    folder: Path
    root_key: rsa.RSAPrivateKey
    root: x509.Certificate
    ca_key: rsa.RSAPrivateKey
    ca: x509.Certificate

    @property
    def root_pem(self) -> Path:
        return self.folder / "apple-root.pem"

    def leaf(self, kind: str, *, eku=None, marks=None, critical_marks: bool = True,
             start: dt.datetime | None = None) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
        """A Developer ID leaf of `kind` ("Developer ID Application" / "Developer ID Installer")
        as Apple issues it; `eku` and `marks` override the EKU list and the marker extensions,
        to build the near misses a classifier must refuse."""
        key = _key()
        start = start or dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
        application = kind == "Developer ID Application"
        if eku is None:
            eku = [ExtendedKeyUsageOID.CODE_SIGNING] if application else [OID_PACKAGE_SIGNING_EKU]
        if marks is None:
            marks = [OID_APPLICATION_MARK if application else OID_INSTALLER_MARK]
        builder = (_base(leaf_name(kind), self.ca.subject, key.public_key(), self.ca_key, start, 1825)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_leaf_usage(), critical=True)
                   .add_extension(x509.CertificatePolicies([x509.PolicyInformation(
                       x509.ObjectIdentifier("1.2.840.113635.100.5.1"),
                       ["https://www.apple.com/certificateauthority/"])]), critical=False))
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=True)
        for mark in marks:
            builder = builder.add_extension(x509.UnrecognizedExtension(mark, DER_NULL), critical=critical_marks)
        builder = builder.add_extension(x509.UnrecognizedExtension(OID_DEVELOPER_ID_DATE, b"\x0c\x0f20200101000000Z"),
                                        critical=False)
        return key, builder.sign(self.ca_key, hashes.SHA256())

    def p12(self, kind: str, name: str | None = None, **overrides) -> Path:
        """A PKCS#12 as Keychain Access exports it: key, leaf, and the CA chain (root first, as
        exports often list it: the signer must put them in Apple's order itself)."""
        key, cert = self.leaf(kind, **overrides)
        path = self.folder / (name or (kind.split()[-1].lower() + ".p12"))
        path.write_bytes(pkcs12.serialize_key_and_certificates(
            b"developer-id", key, cert, [self.root, self.ca], serialization.BestAvailableEncryption(PASSWORD)))
        return path


def create(folder: Path) -> ApplePKI:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = dt.datetime(2006, 4, 25, 21, 40, 36, tzinfo=dt.timezone.utc)  # Apple Root CA's own start
    root_key = _key()
    root = (_base(ROOT_NAME, ROOT_NAME, root_key.public_key(), root_key, start, 365 * 29)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    ca_key = _key()
    ca = (_base(DEVID_CA_NAME, ROOT_NAME, ca_key.public_key(), root_key, dt.datetime(2012, 2, 1, tzinfo=dt.timezone.utc), 365 * 19)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(_ca_usage(), critical=True)
          .add_extension(x509.UnrecognizedExtension(OID_DEVELOPER_ID_CA, DER_NULL), critical=False)
          .sign(root_key, hashes.SHA256()))
    pki = ApplePKI(folder, root_key, root, ca_key, ca)
    pki.root_pem.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return pki
