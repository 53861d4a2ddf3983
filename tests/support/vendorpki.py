"""A code-signing PKI as a vendor's CA issues it, not `builder dev-keys`' DEVELOPMENT one: a CA,
a code-signing leaf and a TSA leaf, all made here with `cryptography`."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def make(d: Path, ca_name_text: str = "Slot Test CA", signer: str = "Slot Test Signer") -> SimpleNamespace:
    """ca.pem, cert.pem + key.pem (code signing), tsa.pem + tsa.key (time stamping) in `d`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name_text)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, critical: bool):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=29))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                             False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=critical)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key

    pem = ca.public_bytes(serialization.Encoding.PEM)
    sign_cert, sign_key = leaf(signer, ExtendedKeyUsageOID.CODE_SIGNING, False)
    tsa_cert, tsa_key = leaf("Slot Test TSA", ExtendedKeyUsageOID.TIME_STAMPING, True)
    (d / "ca.pem").write_bytes(pem)
    (d / "cert.pem").write_bytes(sign_cert)
    (d / "tsa.pem").write_bytes(tsa_cert + pem)
    return SimpleNamespace(ca=d / "ca.pem", cert=d / "cert.pem", tsa=d / "tsa.pem",
                           key=write_private(d / "key.pem", sign_key),
                           tsa_key=write_private(d / "tsa.key", tsa_key))
