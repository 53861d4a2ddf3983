"""Developer ID identities: a PKCS#12 opened with its password (and cached per file version),
classified as Application or Installer, and the signing time a reproducible build uses."""

from __future__ import annotations

import datetime as dt
import hmac
import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from asn1crypto import pkcs12 as asn1_pkcs12
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from builder import log
from builder.errors import SigningError
from builder.signing.apple.certificates import (
    APPLICATION,
    EXPECTED_SHAPE,
    INSTALLER,
    apple_intermediates,
    common_name,
    describe_certificate,
    developer_id_kind,
    issued_by,
)
from builder.signing.signers import AppleKey

PASSWORD_HINT = "check BUILDER_MAC_SIGN_PASSWORD"


@dataclass(frozen=True)
class Identity:
    """A Developer ID identity opened from its PKCS#12."""

    key: AppleKey
    kind: str  # APPLICATION or INSTALLER
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the PKCS#12's other certificates
    private_key: object = field(repr=False)

    @property
    def subject(self) -> str:
        return common_name(self.certificate)

    @property
    def apple_issued(self) -> bool:
        """Issued by Apple's Developer ID CA: the only case where Apple's timestamp and notary
        matter. Decided by the issuer's key (the bundled genuine intermediates), not its name: a
        test PKI may copy Apple's names. An intermediate of Apple's name that is not bundled (a
        newer generation) counts as Apple's."""
        issuer = self.certificate.issuer
        same_name = [c for c in apple_intermediates() if c.subject == issuer]
        if any(issued_by(self.certificate, c) for c in same_name):
            return True
        orgs = issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return not same_name and any(attr.value == "Apple Inc." for attr in orgs)


def _is_pkcs12(data: bytes) -> bool:
    """A DER PFX structure, whatever its encryption: tells "wrong password" from "not a PKCS#12"."""
    try:
        pfx = asn1_pkcs12.Pfx.load(data, strict=True)
        return pfx["version"].native == "v3" and pfx["auth_safe"]["content_type"].native == "data"
    except (ValueError, TypeError, KeyError):
        return False


# Opening a PKCS#12 costs ~0.2 s (its key derivation) and a build signs several times with the
# same file. Keyed by the file's version and an HMAC of the password under a key made per process,
# so the cache holds no digest of a password that could be tried offline; failures are not kept.
_IDENTITY_CACHE_SIZE = 8
_identity_cache: dict[tuple, Identity] = {}
_identity_cache_lock = threading.Lock()
_IDENTITY_CACHE_KEY = secrets.token_bytes(32)


def _file_version(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def open_identity(key: AppleKey) -> Identity:
    """Open `key` with its password and classify it; SigningError naming the file when it fails."""
    path = Path(key.pkcs12)
    label = f"--mac-sign-pkcs12 {path}"
    password = key.password.reveal() if key.password is not None else ""
    try:
        version = _file_version(path.stat())
    except OSError as exc:
        raise SigningError(f"{label}: cannot read it ({exc.strerror})", "check the path") from None
    cache_key = (os.path.abspath(path), version,
                 hmac.digest(_IDENTITY_CACHE_KEY, password.encode(), "sha256"))
    with _identity_cache_lock:
        cached = _identity_cache.get(cache_key)
    if cached is not None:
        identity = replace(cached, key=key)
    else:
        try:
            data = path.read_bytes()
            unchanged = _file_version(path.stat()) == version
        except OSError as exc:
            raise SigningError(f"{label}: cannot read it ({exc.strerror})", "check the path") from None
        identity = _load_identity(key, data, password, label)
        if unchanged:  # a file rewritten while it was read is opened again next time
            with _identity_cache_lock:
                if len(_identity_cache) >= _IDENTITY_CACHE_SIZE:
                    _identity_cache.pop(next(iter(_identity_cache)))
                _identity_cache[cache_key] = identity
    cert = identity.certificate
    now = dt.datetime.now(dt.timezone.utc)  # checked on every call: a long-lived worker outlives a certificate
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SigningError(f"{label}: '{common_name(cert)}' is valid only from "
                           f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}",
                           "renew the certificate in your Apple Developer account")
    return identity


def _load_identity(key: AppleKey, data: bytes, password: str, label: str) -> Identity:
    if not _is_pkcs12(data):
        raise SigningError(f"{label} is not a PKCS#12 (.p12) file",
                           "export the Developer ID certificate with its private key as .p12")
    candidates = [password.encode()] if password else [b"", None]
    for candidate in candidates:
        try:
            private_key, cert, extra = pkcs12.load_key_and_certificates(data, candidate)
            break
        except (ValueError, TypeError):
            continue
        except UnsupportedAlgorithm:
            raise SigningError(f"{label} uses an encryption this system cannot read",
                               "re-export it (Keychain Access > Export, .p12)") from None
    else:
        raise SigningError(f"wrong password for {label}", PASSWORD_HINT)
    if private_key is None or cert is None:
        raise SigningError(f"{label} holds no private key with its certificate",
                           "export the identity (certificate and private key), not the certificate alone")
    if private_key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise SigningError(f"{label}: the private key does not belong to the certificate",
                           "re-export the identity from the keychain that holds it")
    kind = developer_id_kind(cert)
    if kind is None:
        raise SigningError(
            f"{label} holds '{common_name(cert)}' ({describe_certificate(cert)}), which is not a "
            "Developer ID identity", EXPECTED_SHAPE)
    chain = tuple(c for c in extra if c.fingerprint(hashes.SHA256()) != cert.fingerprint(hashes.SHA256()))
    return Identity(key=key, kind=kind, certificate=cert, chain=chain, private_key=private_key)


def classify_identities(keys: list[AppleKey]) -> tuple[AppleKey | None, AppleKey | None]:
    """(Developer ID Application key, Developer ID Installer key) from the PKCS#12 files given.

    Each file must open and hold one of the two kinds; two of the same kind is an error, as the
    build could not tell which to use.
    """
    found: dict[str, Identity] = {}
    for key in keys:
        identity = open_identity(key)
        if identity.kind in found:
            other = found[identity.kind]
            missing = INSTALLER if identity.kind == APPLICATION else APPLICATION
            raise SigningError(
                f"--mac-sign-pkcs12 {other.key.pkcs12} and {key.pkcs12} are both '{identity.kind}' identities",
                f"give one '{APPLICATION}' (apps, DMGs) and one '{INSTALLER}' (pkgs); the other "
                f"file was expected to be a '{missing}' identity")
        found[identity.kind] = identity
        log.debug(f"{key.pkcs12}: {identity.kind} identity '{identity.subject}'")
    app = found.get(APPLICATION)
    installer = found.get(INSTALLER)
    return (app.key if app else None, installer.key if installer else None)


def identity_subject(key: AppleKey) -> str:
    """The signer's common name, for the build summary."""
    return open_identity(key).subject


def open_for(key: AppleKey, kind: str, what: str) -> Identity:
    identity = open_identity(key)
    if identity.kind != kind:
        raise SigningError(f"{what} needs a '{kind}' identity; {key.pkcs12} holds '{identity.subject}'",
                           f"pass the '{kind}' PKCS#12")
    return identity


def signing_time(epoch: int, key: AppleKey) -> dt.datetime:
    """The CMS signing time: SOURCE_DATE_EPOCH (reproducible signatures), moved into the signing
    certificate's validity when the epoch lies outside it."""
    cert = open_identity(key).certificate
    when = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return min(max(when, cert.not_valid_before_utc), cert.not_valid_after_utc)
