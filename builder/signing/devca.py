"""A development CA and the keys `make demo` and the tests sign with.

Every certificate says DEVELOPMENT in its subject: nothing signed with these keys is fit to
ship. Made with `cryptography`, so no openssl configuration files are involved.

The macOS identities have the shape of Apple's
(builder.signing.apple.certificates.developer_id_kind): a root, a "Developer ID Certification
Authority" intermediate (extension 1.2.840.113635.100.6.2.6) and leaves with Apple's EKUs and
critical marker extensions, so every test signs with real-shaped identities. The root and the
test TSA are valid from 2000 on, so a timestamp at any SOURCE_DATE_EPOCH since then verifies.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEV_LABEL = "DEVELOPMENT ONLY - NOT FOR DISTRIBUTION"
# Apple's Developer ID markers: critical extensions (value DER NULL) of the leaf, never EKUs.
OID_APPLE_DEVID_APPLICATION = x509.ObjectIdentifier("1.2.840.113635.100.6.1.13")
OID_APPLE_DEVID_INSTALLER = x509.ObjectIdentifier("1.2.840.113635.100.6.1.14")
OID_APPLE_PACKAGE_SIGNING = x509.ObjectIdentifier("1.2.840.113635.100.4.13")  # the Installer's EKU
OID_APPLE_DEVID_CA = x509.ObjectIdentifier("1.2.840.113635.100.6.2.6")  # on the intermediate
OID_USER_ID = x509.ObjectIdentifier("0.9.2342.19200300.100.1.1")
DER_NULL = b"\x05\x00"
DEV_TEAM = "DEVTEAM01"
# Bumped when the shape of what create() makes changes: an older folder is made again.
VERSION = "2"
LONG_AGO = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class DevKeys:
    folder: Path

    ca_cert = property(lambda self: self.folder / "ca.pem")
    sign_cert = property(lambda self: self.folder / "codesign.pem")
    sign_key = property(lambda self: self.folder / "codesign.key")
    sign_pkcs12 = property(lambda self: self.folder / "codesign.p12")
    tsa_cert = property(lambda self: self.folder / "tsa.pem")
    tsa_key = property(lambda self: self.folder / "tsa.key")
    no_eku_cert = property(lambda self: self.folder / "no-codesign-eku.pem")
    no_eku_key = property(lambda self: self.folder / "no-codesign-eku.key")
    mac_app_pkcs12 = property(lambda self: self.folder / "mac-developer-id-application.p12")
    mac_installer_pkcs12 = property(lambda self: self.folder / "mac-developer-id-installer.p12")
    devid_ca_cert = property(lambda self: self.folder / "developer-id-ca.pem")
    version_file = property(lambda self: self.folder / "devca-version")


def _name(cn: str, *, uid: str | None = None, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(OID_USER_ID, uid)] if uid else []
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Builder " + DEV_LABEL))
    return x509.Name(attrs)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject, issuer, pub, signer_key, *, ca: bool, ekus=(), not_before=None, days=3650, critical_eku=False,
          path_length=None, marks=(), extra=()):
    """`marks`: Apple's marker OIDs, added as critical NULL extensions; `extra`: (oid, DER, critical)."""
    now = not_before or (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=critical_eku)
    for oid in marks:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, DER_NULL), critical=True)
    for oid, value, critical in extra:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=critical)
    return builder.sign(signer_key, hashes.SHA256())


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_pkcs12(path: Path, name: str, key, cert, ca_cert, password: str, *more) -> None:
    data = pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, [*more, ca_cert], serialization.BestAvailableEncryption(password.encode())
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def create(folder: Path, pkcs12_password: str = "development") -> DevKeys:
    """Make (or reuse, when complete and of this VERSION) a development CA and its keys in `folder`."""
    keys = DevKeys(Path(folder))
    if keys.version_file.is_file() and keys.version_file.read_text().strip() == VERSION:
        return keys
    keys.folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM

    ca_key = _key()
    ca_name = _name("Builder Development Root CA (DEVELOPMENT)")
    ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True, not_before=LONG_AGO, days=365 * 100)
    keys.ca_cert.write_bytes(ca.public_bytes(pem))

    def leaf(cn, ekus, critical=False, not_before=None):
        k = _key()
        c = _cert(_name(cn), ca_name, k.public_key(), ca_key, ca=False, ekus=ekus, critical_eku=critical,
                  not_before=not_before, days=365 * 60 if not_before else 3650)
        return k, c

    # Valid from 2000, like the TSA below: a timestamp at SOURCE_DATE_EPOCH must fall inside the
    # signer's validity too, or the timestamped signature does not verify.
    k, c = leaf("Builder Development Code Signing (DEVELOPMENT)", [ExtendedKeyUsageOID.CODE_SIGNING],
                not_before=LONG_AGO)
    keys.sign_cert.write_bytes(c.public_bytes(pem))
    _write_key(keys.sign_key, k)
    _write_pkcs12(keys.sign_pkcs12, "codesign", k, c, ca, pkcs12_password)

    # Valid from 2000: osslsigncode's test TSA stamps SOURCE_DATE_EPOCH, and a timestamp only
    # verifies when the TSA certificate covers its time.
    k, c = leaf("Builder Development TSA (DEVELOPMENT)", [ExtendedKeyUsageOID.TIME_STAMPING], critical=True,
                not_before=LONG_AGO)
    keys.tsa_cert.write_bytes(c.public_bytes(pem) + ca.public_bytes(pem))
    _write_key(keys.tsa_key, k)

    k, c = leaf("Builder Development TLS, no code signing", [ExtendedKeyUsageOID.SERVER_AUTH])
    keys.no_eku_cert.write_bytes(c.public_bytes(pem))
    _write_key(keys.no_eku_key, k)

    # Apple's shape: root -> "Developer ID Certification Authority" -> Application / Installer.
    devid_key = _key()
    devid_name = _name("Developer ID Certification Authority", ou="G2 (DEVELOPMENT)")
    devid = _cert(devid_name, ca_name, devid_key.public_key(), ca_key, ca=True, path_length=0,
                  not_before=LONG_AGO, days=365 * 100, extra=[(OID_APPLE_DEVID_CA, DER_NULL, False)])
    keys.devid_ca_cert.write_bytes(devid.public_bytes(pem))

    def developer_id(kind, eku, mark):
        k = _key()
        subject = _name(f"{kind}: Builder Dev ({DEV_TEAM})", uid=DEV_TEAM, ou=DEV_TEAM)
        c = _cert(subject, devid_name, k.public_key(), devid_key, ca=False, ekus=[eku], critical_eku=True,
                  marks=[mark])
        return k, c

    k, c = developer_id("Developer ID Application", ExtendedKeyUsageOID.CODE_SIGNING, OID_APPLE_DEVID_APPLICATION)
    _write_pkcs12(keys.mac_app_pkcs12, "mac-app", k, c, ca, pkcs12_password, devid)
    k, c = developer_id("Developer ID Installer", OID_APPLE_PACKAGE_SIGNING, OID_APPLE_DEVID_INSTALLER)
    _write_pkcs12(keys.mac_installer_pkcs12, "mac-installer", k, c, ca, pkcs12_password, devid)
    # Written last: its presence marks the folder as complete.
    keys.version_file.write_text(VERSION + "\n")
    return keys
