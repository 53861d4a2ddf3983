"""A development CA and the keys `make demo` and the tests sign with.

Every certificate says DEVELOPMENT in its subject: nothing signed with these keys is fit to
ship. Made with `cryptography`, so no openssl configuration files are involved.
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
# Apple's EKUs for Developer ID certificates (codesign and productsign look for these).
OID_APPLE_DEVID_APPLICATION = x509.ObjectIdentifier("1.2.840.113635.100.6.1.13")
OID_APPLE_DEVID_INSTALLER = x509.ObjectIdentifier("1.2.840.113635.100.6.1.14")


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


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Builder " + DEV_LABEL),
        ]
    )


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject, issuer, pub, signer_key, *, ca: bool, ekus=(), not_before=None, days=3650, critical_eku=False):
    now = not_before or (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
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
    return builder.sign(signer_key, hashes.SHA256())


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_pkcs12(path: Path, name: str, key, cert, ca_cert, password: str) -> None:
    data = pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, [ca_cert], serialization.BestAvailableEncryption(password.encode())
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def create(folder: Path, pkcs12_password: str = "development") -> DevKeys:
    """Make (or reuse, when complete) a development CA and its signing keys in `folder`."""
    keys = DevKeys(Path(folder))
    if keys.mac_installer_pkcs12.exists():
        return keys
    keys.folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM

    ca_key = _key()
    ca_name = _name("Builder Development Root CA (DEVELOPMENT)")
    ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    keys.ca_cert.write_bytes(ca.public_bytes(pem))

    def leaf(cn, ekus, critical=False):
        k = _key()
        c = _cert(_name(cn), ca_name, k.public_key(), ca_key, ca=False, ekus=ekus, critical_eku=critical)
        return k, c

    k, c = leaf("Builder Development Code Signing (DEVELOPMENT)", [ExtendedKeyUsageOID.CODE_SIGNING])
    keys.sign_cert.write_bytes(c.public_bytes(pem))
    _write_key(keys.sign_key, k)
    _write_pkcs12(keys.sign_pkcs12, "codesign", k, c, ca, pkcs12_password)

    k, c = leaf("Builder Development TSA (DEVELOPMENT)", [ExtendedKeyUsageOID.TIME_STAMPING], critical=True)
    keys.tsa_cert.write_bytes(c.public_bytes(pem) + ca.public_bytes(pem))
    _write_key(keys.tsa_key, k)

    k, c = leaf("Builder Development TLS, no code signing", [ExtendedKeyUsageOID.SERVER_AUTH])
    keys.no_eku_cert.write_bytes(c.public_bytes(pem))
    _write_key(keys.no_eku_key, k)

    k, c = leaf("Developer ID Application: Builder Dev (DEVTEAM01)", [OID_APPLE_DEVID_APPLICATION, ExtendedKeyUsageOID.CODE_SIGNING])
    _write_pkcs12(keys.mac_app_pkcs12, "mac-app", k, c, ca, pkcs12_password)
    # Written last: its presence marks the folder as complete.
    k, c = leaf("Developer ID Installer: Builder Dev (DEVTEAM01)", [OID_APPLE_DEVID_INSTALLER])
    _write_pkcs12(keys.mac_installer_pkcs12, "mac-installer", k, c, ca, pkcs12_password)
    return keys
