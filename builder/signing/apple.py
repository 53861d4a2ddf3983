"""Apple code signing from Linux: Developer ID identities, flat packages, DMGs, Mach-O and .app
bundles, their verification, and optional notarization.

Signing goes through apple-platform-py (bindings to apple-platform-rs, the `rcodesign` code).
Two of its quirks shape this module:

- it cannot open a PKCS#12 encrypted the modern way (PBES2/AES, what `cryptography` and OpenSSL 3
  write by default): it reports "incorrect password". And from a PKCS#12 that also holds the CA
  it takes the CA's certificate as the signer's. So every signing call gets a private copy of the
  identity: the leaf certificate and key only, 3DES-encrypted under a random one-time password,
  in a 0700 temporary folder that is removed afterwards; the other certificates of the PKCS#12 go
  in as DER files and end up in the signature's chain. The user's password is only ever handed
  to `cryptography`.
- a flat package's RSA <signature> is PKCS#1 v1.5 over SHA-256 *of* the 20-byte TOC checksum,
  where Apple's productsign signs the checksum itself as a SHA-1 DigestInfo (and xar-style
  checkers verify exactly that). So the RSA bytes are written again here, Apple's way, before the
  package is moved into place; the verifier accepts only Apple's convention and names the other.

Verification does its own cryptography (`cryptography` + `asn1crypto`): TOC and member
checksums, the RSA signature, the CMS signatures, CodeDirectory page and special-slot hashes, the
bundle's resource seal, and the certificate chain up to Apple Root CA (shipped in
builder/resources/apple/, with the Developer ID intermediates) or a CA file given by the caller.
A chain that reaches neither is reported as not checked, never as trusted. apple-platform-py's own readers (`verify_macho`, `read_signature`) run
too, as a second opinion.

The byte-level parsers (Mach-O LC_CODE_SIGNATURE, code-signature SuperBlob, CodeDirectory, the
UDIF koly code-signature fields) are pure functions near the end of this module; they could move
to `builder/binfmt/` unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import json
import os
import plistlib
import re
import secrets
import shutil
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from asn1crypto import pkcs12 as asn1_pkcs12
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from builder import log
from builder.binfmt import xar
from builder.binfmt.macho import (
    KOLY_SIZE,
    _CMS_SLOT,
    _CS_RUNTIME,
    _FAT_MAGIC,
    _FAT_MAGIC_64,
    _MH_EXECUTE,
    _SPECIAL_NAMES,
    koly_code_signature,
    koly_for_hash,
    macho_code_signature,
    macho_slices,
    parse_code_directory,
    superblob_entries,
)
from builder.errors import FormatError, NotarizationError, SigningError, UsageError
from builder.signing.signers import AppleKey

try:  # the native library is large; a machine that never signs for macOS need not load it
    import apple_platform as ap
    from apple_platform import errors as ap_errors
except ImportError:  # pragma: no cover - the project depends on apple-platform-py
    ap = None
    ap_errors = None

APPLE_TIMESTAMP_URL = "http://timestamp.apple.com/ts01"
# `timestamp_url=AUTO`: Apple's server for an Apple-issued identity, none for a development one
# (Apple's server would stamp it, but nothing trusts the signature anyway).
AUTO = "auto"

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
_EXPECTED_SHAPE = (f"expected a '{APPLICATION}' (EKU codeSigning + critical extension "
                   f"{OID_DEVID_APPLICATION.dotted_string}) or '{INSTALLER}' (EKU "
                   f"{OID_EKU_PACKAGE_SIGNING.dotted_string} + critical extension "
                   f"{OID_DEVID_INSTALLER.dotted_string}) certificate with its key")
# Critical extensions a chain may carry: what `cryptography` parses and this module checks, plus
# Apple's markers. Any other critical extension stops the chain, as RFC 5280 asks (and as
# OpenSSL does, which is why openssl needs -ignore_critical for Apple's own certificates).
_KNOWN_CRITICAL = {x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid,
                   x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid,
                   x509.CertificatePolicies.oid, x509.SubjectAlternativeName.oid,
                   OID_DEVID_APPLICATION, OID_DEVID_INSTALLER, OID_DEVID_CA}
APPLE_RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "apple"
_OID_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"
_OID_CDHASHES_PLIST = "1.2.840.113635.100.9.1"
_PASSWORD_HINT = "check BUILDER_MAC_SIGN_PASSWORD"


def _require_library() -> None:
    if ap is None:  # pragma: no cover
        raise SigningError("apple-platform-py is not installed", "pip install apple-platform-py")


# ------------------------------------------------------------------------------------------
# Identities


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
        return _common_name(self.certificate)

    @property
    def apple_issued(self) -> bool:
        """Issued by Apple's Developer ID CA: the only case where Apple's timestamp and notary
        matter. Decided by the issuer's key (the bundled genuine intermediates), not its name: a
        test PKI may copy Apple's names. An intermediate of Apple's name that is not bundled (a
        newer generation) counts as Apple's."""
        issuer = self.certificate.issuer
        same_name = [c for c in apple_intermediates() if c.subject == issuer]
        if any(_issued_by(self.certificate, c) for c in same_name):
            return True
        orgs = issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return not same_name and any(attr.value == "Apple Inc." for attr in orgs)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier] | None:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def _is_ca_cert(cert: x509.Certificate) -> bool:
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
    if _is_ca_cert(cert):
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
    if _is_ca_cert(cert):
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
        raise SigningError(f"{label}: '{_common_name(cert)}' is valid only from "
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
        raise SigningError(f"wrong password for {label}", _PASSWORD_HINT)
    if private_key is None or cert is None:
        raise SigningError(f"{label} holds no private key with its certificate",
                           "export the identity (certificate and private key), not the certificate alone")
    if private_key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise SigningError(f"{label}: the private key does not belong to the certificate",
                           "re-export the identity from the keychain that holds it")
    kind = developer_id_kind(cert)
    if kind is None:
        raise SigningError(
            f"{label} holds '{_common_name(cert)}' ({describe_certificate(cert)}), which is not a "
            "Developer ID identity", _EXPECTED_SHAPE)
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


def _open_for(key: AppleKey, kind: str, what: str) -> Identity:
    identity = open_identity(key)
    if identity.kind != kind:
        raise SigningError(f"{what} needs a '{kind}' identity; {key.pkcs12} holds '{identity.subject}'",
                           f"pass the '{kind}' PKCS#12")
    return identity


# ------------------------------------------------------------------------------------------
# Signing


@contextlib.contextmanager
def _library_signer(identity: Identity) -> Iterator[object]:
    """The identity as apple-platform-py can read it (see the module docstring), for one call."""
    _require_library()
    one_time = secrets.token_urlsafe(24)
    log.register_secret(one_time)
    encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                  .kdf_rounds(10000)
                  .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                  .hmac_hash(hashes.SHA1())
                  .build(one_time.encode()))
    with tempfile.TemporaryDirectory(prefix="builder-apple-") as tmp:  # mkdtemp: mode 0700
        folder = Path(tmp)
        p12 = folder / "identity.p12"
        _write_private(p12, pkcs12.serialize_key_and_certificates(
            b"signer", identity.private_key, identity.certificate, None, encryption))
        ders = []
        # In issuing order (productsign's <X509Data>: leaf, intermediate, root), whatever order
        # the PKCS#12 lists them in: the library writes them as given.
        for number, cert in enumerate(issuing_order(identity.certificate, identity.chain)):
            der = folder / f"chain-{number}.der"
            der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
            ders.append(str(der))
        yield ap.Signer(p12=ap.P12Key(path=str(p12), password=one_time),
                        certificate_der=ap.CertificateDerKey(paths=ders) if ders else None)


def issuing_order(leaf: x509.Certificate, others) -> list[x509.Certificate]:
    """`others` as the path up from `leaf` (issuer first, root last), then whatever is not on it."""
    remaining = list(others)
    path: list[x509.Certificate] = []
    current = leaf
    while True:
        parent = next((c for c in remaining if c.subject == current.issuer and c != current), None)
        if parent is None:
            break
        path.append(parent)
        remaining.remove(parent)
        if parent.subject == parent.issuer:
            break
        current = parent
    return path + remaining


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _timestamp(identity: Identity, timestamp_url: str | None) -> str:
    """The request's timestamp_url: a URL, or "none"."""
    if timestamp_url == AUTO:
        return APPLE_TIMESTAMP_URL if identity.apple_issued else "none"
    return timestamp_url or "none"


def _library_failure(exc: Exception, what: str, timestamp_url: str) -> SigningError:
    chain = [str(exc), *getattr(exc, "source", [])]
    text = " / ".join(dict.fromkeys(c for c in chain if c))
    if isinstance(exc, ap_errors.TimestampError) or "Time-Stamp" in text:
        return SigningError(f"signing {what}: the timestamp server {timestamp_url} did not answer ({text})",
                            "check the network, or pass no timestamp for a development build")
    if isinstance(exc, ap_errors.PrivateKeyError):
        return SigningError(f"signing {what}: the signing key could not be used ({text})", _PASSWORD_HINT)
    return SigningError(f"signing {what} failed: {text}", "run with -v for apple-platform's log")


def _sign_settings(identity: Identity, timestamp_url: str | None, signing_time: dt.datetime | None) -> dict:
    url = _timestamp(identity, timestamp_url)
    settings: dict = {"timestamp_url": url}
    if signing_time is not None:
        settings["signing_time"] = signing_time
    if identity.apple_issued and url != "none":
        # The library's own pre-flight check of what Apple's notary requires (secure timestamp,
        # Apple-issued identity). It refuses a development identity, so only for real ones.
        settings["for_notarization"] = True
    return settings


def _library_sign(identity: Identity, src: Path, out: Path | None, what: str, *, timestamp_url,
                  signing_time, **extra) -> None:
    """One apple-platform sign call: into `out`, or in place when `out` is None."""
    settings = _sign_settings(identity, timestamp_url, signing_time)
    with _library_signer(identity) as signer:
        try:
            ap.sign(src, out, signer=signer, **settings, **extra)
        except ap_errors.ApplePlatformError as exc:
            raise _library_failure(exc, what, settings["timestamp_url"]) from None


def _sign_to(identity: Identity, src: Path, dst: Path, what: str, *, timestamp_url, signing_time,
             finish: Callable[[Path], None] | None = None, **extra) -> None:
    """Sign `src` into `dst` through a private folder beside it: `dst` appears complete or not
    at all, and whatever the library leaves behind on failure (it writes `<output>.tmp`) goes
    with the folder. `finish` edits the signed file before it becomes `dst`."""
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.signing-", dir=dst.parent))
    try:
        out = work / dst.name
        _library_sign(identity, src, out, what, timestamp_url=timestamp_url,
                      signing_time=signing_time, **extra)
        if finish is not None:
            finish(out)
        os.replace(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_input(path: Path, expected: tuple[str, ...], what: str) -> str:
    if not path.exists():
        raise FormatError(f"{path}: no such file", "build it first")
    kind = ap.path_type(path)
    if kind not in expected:
        raise FormatError(f"{path} is not a {what} (apple-platform sees a '{kind}')",
                          f"give a {what}")
    return kind


def sign_flat_package(key: AppleKey, src: Path, dst: Path, *, timestamp_url: str | None = AUTO,
                      signing_time: dt.datetime | None = None) -> None:
    """productsign: write `src` (an unsigned flat .pkg) signed with a Developer ID Installer
    identity to `dst`. Adds the RSA <signature> and the CMS <x-signature> with the chain.

    `timestamp_url`: AUTO (Apple's server for an Apple-issued identity, none otherwise), a URL,
    or None. `signing_time` (timezone-aware; whole seconds count) fixes the CMS signing time, so
    the same `src` and `signing_time` give the same bytes; None signs with the current time.
    """
    _require_library()
    src, dst = Path(src), Path(dst)
    when = _whole_seconds_utc(signing_time) if signing_time is not None else None
    identity = _open_for(key, INSTALLER, f"signing {src.name}")
    _check_input(src, ("xar",), "flat package (xar)")
    # apple-platform-py writes rcodesign's RSA <signature> and ignores signing_time for flat
    # packages (the CMS gets the wall clock): both are written again before the package is
    # moved into place.

    def finish(out: Path) -> None:
        _set_apple_toc_signature(identity, out, src.name)
        if when is not None:
            _set_pkg_signing_time(identity, out, when, src.name)

    with log.step(f"Signing {dst.name} ({identity.subject})"):
        _sign_to(identity, src, dst, src.name, timestamp_url=timestamp_url, signing_time=when,
                 finish=finish)


def _whole_seconds_utc(when: dt.datetime) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"signing_time must be a timezone-aware datetime, got {when!r}")
    return when.astimezone(dt.timezone.utc).replace(microsecond=0)


def apple_toc_signature(private_key: object, checksum: bytes, style: str = "sha1") -> bytes:
    """productsign's <signature style="RSA">: PKCS#1 v1.5 over a DigestInfo naming `style` that
    holds the TOC checksum itself (the checksum is signed as an already computed hash)."""
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise SigningError("a flat package's <signature style=\"RSA\"> needs an RSA key",
                           "use an RSA Developer ID Installer identity (Apple issues RSA ones)")
    return private_key.sign(checksum, padding.PKCS1v15(), utils.Prehashed(_HASH_BY_NAME[style]()))


def _set_apple_toc_signature(identity: Identity, pkg: Path, what: str) -> None:
    """Replace the RSA <signature> bytes of the signed `pkg` with Apple's convention, in place.

    The same key gives a signature of the same length, and the TOC records only where it sits,
    so the TOC, its checksum and the CMS <x-signature> stay as they are. Checked against the
    leaf's public key before it is written."""
    with xar.read_xar(pkg) as archive:
        if archive.signature is None or archive.signature.style != "RSA":
            raise SigningError(f"signing {what}: the library wrote no RSA <signature>",
                               "report this: the package was not written")
        position = archive.heap_start + archive.signature.offset
        old = archive.signature_bytes("signature")
        checksum, style = archive.stored_toc_checksum, archive.checksum_style
    if style not in _HASH_BY_NAME or _HASH_BY_NAME[style]().digest_size != len(checksum):
        raise SigningError(f"signing {what}: TOC checksum style {style} cannot be signed Apple's way",
                           "report this: the package was not written")
    signature = apple_toc_signature(identity.private_key, checksum, style)
    if len(signature) != len(old) or _verify_toc_signature(identity.certificate, signature, checksum, style) != APPLE_SCHEME:
        raise SigningError(f"signing {what}: the RSA <signature> could not be written Apple's way",
                           "report this: the package was not written")
    with open(pkg, "r+b") as fh:
        fh.seek(position)
        fh.write(signature)


def _set_pkg_signing_time(identity: Identity, pkg: Path, when: dt.datetime, what: str) -> None:
    """Give the CMS <x-signature> of the signed flat package `pkg` the signing time `when`, in place.

    The TOC records only the offset and size of the signature bytes and the TOC checksum covers
    only the compressed TOC, so new bytes of the same length leave the TOC, its checksum and the
    RSA <signature> (over that checksum) valid. The result is checked with `_verify_cms` before
    it is written.
    """
    with xar.read_xar(pkg) as archive:
        if archive.x_signature is None:
            return
        position = archive.heap_start + archive.x_signature.offset
        stored = archive.signature_bytes("x-signature")
        checksum = archive.stored_toc_checksum
    patched = cms_with_signing_time(stored, when, identity.private_key, f"signing {what}")
    if patched == stored:
        return
    try:
        checked = _verify_cms(patched, checksum, f"signing {what}: the re-signed <x-signature>")
    except InvalidSignature as exc:
        raise SigningError(str(exc), "report this: the package was not written") from None
    except FormatError as exc:
        raise SigningError(exc.message, "report this: the package was not written") from None
    if checked.signer != identity.certificate or checked.signing_time != str(when):
        raise SigningError(f"signing {what}: the re-signed <x-signature> names '{_common_name(checked.signer)}' "
                           f"at {checked.signing_time}, not '{identity.subject}' at {when}",
                           "report this: the package was not written")
    with open(pkg, "r+b") as fh:
        fh.seek(position)
        fh.write(patched)


_OID_SIGNING_TIME = "1.2.840.113549.1.9.5"


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
    if digest_name not in _HASH_BY_NAME:
        raise SigningError(f"{what}: CMS digest algorithm {digest_name} is not supported",
                           "sign with apple-platform-py's flat package signer")
    # The value is the last thing in its attribute; only its bytes change, no length does.
    if not old_attr.endswith(old_time) or old_attrs.count(old_attr) != 1:
        raise SigningError(f"{what}: the CMS signing time is not where it was expected",
                           "sign with apple-platform-py's flat package signer")
    new_attrs = old_attrs.replace(old_attr, old_attr[:-len(old_time)] + new_time)
    # What is signed is the attributes as a SET OF (tag 0x31), not as the [0] IMPLICIT field.
    signature = private_key.sign(b"1" + new_attrs[1:], padding.PKCS1v15(), _HASH_BY_NAME[digest_name]())
    if len(signature) != len(old_signature):
        raise SigningError(f"{what}: the new CMS signature is {len(signature)} bytes, the old one "
                           f"{len(old_signature)}", "use the identity the package was signed with")
    at_attrs, at_signature = der.find(old_attrs), der.find(old_signature)
    if (der.count(old_attrs) != 1 or der.count(old_signature) != 1
            or at_attrs + len(old_attrs) > at_signature):  # SignerInfo: signedAttrs, ..., signature
        raise SigningError(f"{what}: the CMS signed attributes are not where they were expected",
                           "sign with apple-platform-py's flat package signer")
    patched = bytearray(data)
    patched[at_attrs:at_attrs + len(new_attrs)] = new_attrs
    patched[at_signature:at_signature + len(signature)] = signature
    return bytes(patched)


def sign_dmg(key: AppleKey, src: Path, dst: Path, *, timestamp_url: str | None = AUTO,
             signing_time: dt.datetime | None = None, identifier: str | None = None) -> None:
    """codesign a UDIF disk image with a Developer ID Application identity, into `dst`.

    The signature is appended before the koly trailer, which records where it is. `identifier`
    defaults to the file name without extension (what codesign does).
    """
    _require_library()
    src, dst = Path(src), Path(dst)
    identity = _open_for(key, APPLICATION, f"signing {src.name}")
    _check_input(src, ("dmg",), "UDIF disk image (.dmg)")
    extra = {"binary_identifier": identifier} if identifier else {}
    with log.step(f"Signing {dst.name} ({identity.subject})"):
        _sign_to(identity, src, dst, src.name, timestamp_url=timestamp_url, signing_time=signing_time,
                 **extra)


def sign_code(key: AppleKey, path: Path, *, identifier: str | None = None,
              entitlements: Path | None = None, hardened_runtime: bool = True,
              timestamp_url: str | None = AUTO, signing_time: dt.datetime | None = None) -> None:
    """codesign a Mach-O file or a .app bundle IN PLACE, with a Developer ID Application identity.

    The work happens on a copy beside `path`, swapped in only when complete: on failure `path`
    is untouched. A bundle's nested Mach-O files are signed too and sealed in CodeResources.
    Only Mach-O can carry a signature: rcodesign leaves any other file in a code folder
    (Contents/MacOS, Frameworks, ...) out of the seal (and drops it when signing into a new
    folder), so such a bundle is refused with the file named; keep scripts and data in
    Contents/Resources. `hardened_runtime` (needed for notarization) is set on the main
    executable and on every nested executable.
    """
    _require_library()
    path = Path(path)
    identity = _open_for(key, APPLICATION, f"signing {path.name}")
    kind = _check_input(path, ("macho", "bundle"), "Mach-O file or .app bundle")
    flags = ["runtime"] if hardened_runtime else []
    main = ap.PathSettings(code_signature_flags=list(flags),
                           entitlements_xml_file=str(entitlements) if entitlements else None)
    if identifier:
        main.binary_identifier = identifier
    scopes: dict[str, object] = {"@main": main}
    if kind == "bundle" and hardened_runtime:
        main_exe = _bundle_main_executable(path)
        for file in sorted(path.rglob("*")):
            if file.is_file() and not file.is_symlink() and file != main_exe and _is_macho_executable(file):
                scopes[file.relative_to(path).as_posix()] = ap.PathSettings(code_signature_flags=list(flags))
    with log.step(f"Signing {path.name} ({identity.subject})"):
        if kind == "macho":
            mode = stat.S_IMODE(path.stat().st_mode)
            _sign_to(identity, path, path, path.name, timestamp_url=timestamp_url,
                     signing_time=signing_time, paths=scopes)
            os.chmod(path, mode)
            return
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.signing-", dir=path.parent))
        try:
            copy = work / path.name
            # Signed in place on a copy: signing into a new folder would drop unsealable files
            # silently; in place they stay, and the seal check below names them.
            shutil.copytree(path, copy, symlinks=True)
            _library_sign(identity, copy, None, path.name, timestamp_url=timestamp_url,
                          signing_time=signing_time, paths=scopes)
            seal = _Report()
            _verify_resource_seal(copy / "Contents", _bundle_main_executable(copy),
                                  (copy / "Contents/_CodeSignature/CodeResources").read_bytes(), seal,
                                  nested=False)
            if seal.problems:
                raise SigningError(f"signing {path.name}: " + "; ".join(seal.problems),
                                   "only Mach-O files can live in Contents/MacOS and other code "
                                   "folders; move scripts and data to Contents/Resources")
            os.rename(path, work / "unsigned")
            try:
                os.rename(copy, path)
            except OSError:
                os.rename(work / "unsigned", path)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _bundle_main_executable(bundle: Path) -> Path:
    info = bundle / "Contents" / "Info.plist"
    try:
        plist = plistlib.loads(info.read_bytes())
        name = plist["CFBundleExecutable"]
    except (OSError, plistlib.InvalidFileException, KeyError, ValueError):
        raise FormatError(f"{bundle}: Contents/Info.plist is missing or has no CFBundleExecutable",
                          "a .app needs Contents/Info.plist naming its executable") from None
    return bundle / "Contents" / "MacOS" / name


def _is_macho_executable(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 16:
        return False
    for magic, endian in ((b"\xcf\xfa\xed\xfe", "<"), (b"\xce\xfa\xed\xfe", "<"),
                          (b"\xfe\xed\xfa\xcf", ">"), (b"\xfe\xed\xfa\xce", ">")):
        if head[:4] == magic:
            return struct.unpack_from(endian + "I", head, 12)[0] == _MH_EXECUTE
    if head[:4] in (_FAT_MAGIC, _FAT_MAGIC_64):
        return True  # universal binaries are executables in practice; the flag is harmless otherwise
    return False


# ------------------------------------------------------------------------------------------
# Verification: shared pieces


@dataclass
class _Report:
    """What one verification found; `as_dict` is what callers get."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    signer: str | None = None
    chain: list[str] = field(default_factory=list)
    trusted: bool | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        ok = not self.problems
        if ok:
            detail = "signature ok: " + ", ".join(self.checked)
            if self.not_checked:
                detail += "; NOT checked: " + "; ".join(self.not_checked)
        else:
            detail = "; ".join(self.problems)
        return {"ok": ok, "signer": self.signer, "detail": detail, "chain": self.chain,
                "trusted": self.trusted, "checked": list(self.checked),
                "not_checked": list(self.not_checked), **self.extra}


def _load_ca(ca: Path) -> list[x509.Certificate]:
    try:
        data = Path(ca).read_bytes()
    except OSError as exc:
        raise UsageError(f"--ca {ca}: cannot read it ({exc.strerror})", "check the path") from None
    try:
        return x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise UsageError(f"--ca {ca} holds no PEM or DER certificate", "give the root CA certificate") from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
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


def _check_chain(report: _Report, leaf: x509.Certificate, pool: list[x509.Certificate],
                 ca: Path | None, expected_kind: str, *, now: dt.datetime | None = None) -> None:
    """Leaf kind, validity at `now` (default: the clock), critical extensions, and the chain
    through `pool` (and Apple's bundled intermediates) up to a certificate of `ca` or Apple Root
    CA (bundled)."""
    report.signer = _common_name(leaf)
    kind = developer_id_kind(leaf)
    if kind != expected_kind:
        report.problems.append(f"signed by '{_common_name(leaf)}', which is "
                               f"{'a ' + repr(kind) if kind else 'not a Developer ID'} identity "
                               f"({describe_certificate(leaf)}); '{expected_kind}' expected")
    else:
        report.checked.append(f"signer is a {expected_kind} identity")
    now = now or dt.datetime.now(dt.timezone.utc)
    chain = [leaf]
    given = _load_ca(ca) if ca is not None else []
    bundled = list(apple_roots())
    roots = given + bundled
    pool = list(pool) + [c for c in apple_intermediates() if c not in pool]
    anchor = None
    current = leaf
    for _ in range(10):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            report.problems.append(f"certificate '{_common_name(current)}' is valid only from "
                                   f"{current.not_valid_before_utc:%Y-%m-%d} to {current.not_valid_after_utc:%Y-%m-%d}")
        if any(current == root for root in roots):
            anchor = current
            break
        root = next((r for r in roots if _issued_by(current, r)), None)
        if root is not None:
            chain.append(root)
            anchor = root
            break
        parent = next((c for c in pool if c not in chain and _issued_by(current, c)), None)
        if parent is None or parent == current:
            break
        if not _is_ca(parent):
            report.problems.append(f"'{_common_name(parent)}' issued '{_common_name(current)}' but is not a CA")
            break
        chain.append(parent)
        current = parent
    for cert in chain:
        unknown = [ext.oid.dotted_string for ext in cert.extensions
                   if ext.critical and ext.oid not in _KNOWN_CRITICAL]
        if unknown:
            report.problems.append(f"certificate '{_common_name(cert)}' has an unknown critical extension "
                                   f"{', '.join(unknown)}: no verifier may accept it")
    if len(chain) > 1:
        if any(ext.oid == OID_DEVID_CA for ext in chain[1].extensions):
            report.checked.append("issued by a Developer ID Certification Authority")
        else:
            report.not_checked.append(f"the issuer '{_common_name(chain[1])}' is not a Developer ID "
                                      f"Certification Authority (extension {OID_DEVID_CA.dotted_string}): "
                                      "Gatekeeper accepts only Apple's")
    report.chain = [c.subject.rfc4514_string() for c in chain]
    if anchor is not None:
        report.trusted = True
        source = (f"from {Path(ca).name}" if any(anchor == r for r in given)
                  else "(Apple's, bundled with builder)")
        report.checked.append(f"chain to {_common_name(anchor)} {source}")
    elif ca is None:
        report.trusted = None
        report.not_checked.append(f"chain not checked: it ends at '{_common_name(chain[-1])}', not Apple Root CA, "
                                  "and no --ca was given")
    else:
        report.trusted = False
        report.extra["root_missing"] = True
        report.problems.append(f"certificate chain ends at '{_common_name(chain[-1])}', which is not "
                               f"issued by a certificate in {ca} or by Apple Root CA")


_HASH_BY_NAME = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
                 "sha512": hashes.SHA512}


@dataclass(frozen=True)
class _Cms:
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    signing_time: str | None
    timestamp: str | None
    cdhashes_plist: bytes | None


def _verify_cms(der: bytes, content: bytes, what: str) -> _Cms:
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
        if digest_name not in _HASH_BY_NAME:
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
            signed_bytes = b"\x31" + attrs.dump()[1:]  # [0] IMPLICIT -> SET OF, as it was signed
        else:
            signed_bytes = content
        signature = signer_info["signature"].native
        algo = signer_info["signature_algorithm"].signature_algo
        public_key = cert.public_key()
        hash_cls = _HASH_BY_NAME[digest_name]
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
                    timestamp = _timestamp_time(attr["values"][0].dump())
        return _Cms(cert, certs, signing_time, timestamp, cdhashes)
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{what}: CMS signature does not parse ({exc})") from None


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _timestamp_time(token_der: bytes) -> str:
    """The time of an RFC 3161 token (reported, not verified: Apple's TSA root is not here)."""
    try:
        token = asn1_cms.ContentInfo.load(token_der)
        tst = token["content"]["encap_content_info"]["content"].parsed
        return str(tst["gen_time"].native)
    except (ValueError, TypeError, KeyError, AttributeError):
        return "present (unreadable)"


# ------------------------------------------------------------------------------------------
# Verification: flat packages


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


def verify_flat_package(path: Path, ca: Path | None) -> dict:
    """Check a signed flat package without apple-platform: TOC checksum, member checksums, the
    RSA <signature>, the CMS <x-signature> if present, and the chain up to `ca`.

    Returns {"ok", "signer", "detail", "chain", "trusted", "checked", "not_checked", "scheme"}.
    FormatError only when `path` is not a xar at all.
    """
    path = Path(path)
    report = _Report()
    with open(path, "rb") as fh:
        if fh.read(4) != xar.MAGIC:
            raise FormatError(f"{path} is not a flat package (no xar header)", "give a .pkg")
    try:
        archive = xar.read_xar(path)
    except FormatError as exc:  # checksum mismatch, truncation: a damaged or altered package
        report.problems.append(exc.message)
        return report.as_dict()
    with archive:
        style = archive.checksum_style
        if style == "none":
            report.problems.append("the TOC has no checksum, so nothing can be signed")
            return report.as_dict()
        computed = hashlib.new(style, archive.toc_compressed).digest()
        if computed != archive.stored_toc_checksum:
            report.problems.append("TOC checksum mismatch: the table of contents was altered")
        else:
            report.checked.append(f"TOC {style} checksum")
        stored = [m for m in archive.members if m.offset is not None]
        member_problems = []
        for member in stored:
            if member.archived_checksum is None and member.extracted_checksum is None:
                member_problems.append(f"member {member.name!r} has no checksum: the signature does not cover it")
                continue
            try:
                archive.extract(member.name, _Sink())
            except FormatError as exc:
                member_problems.append(exc.message)
        report.problems.extend(member_problems)
        if not member_problems:
            report.checked.append(f"{len(stored)} member checksums")
        if archive.signature is None:
            report.problems.append("not signed (no <signature> in the TOC)")
            return report.as_dict()
        if archive.signature.style != "RSA":
            report.problems.append(f"<signature style={archive.signature.style!r}>: only RSA is known")
            return report.as_dict()
        try:
            certs = [x509.load_der_x509_certificate(der) for der in archive.signature.certificates_der]
        except ValueError:
            certs = []
        if not certs:
            report.problems.append("the <signature> carries no readable certificate")
            return report.as_dict()
        leaf = certs[0]
        try:
            signature = archive.signature_bytes("signature")
        except FormatError as exc:
            report.problems.append(exc.message)
            return report.as_dict()
        scheme = _verify_toc_signature(leaf, signature, archive.stored_toc_checksum, style)
        if scheme is None:
            report.problems.append(f"RSA signature does not verify with '{_common_name(leaf)}''s key")
        elif scheme == RCODESIGN_SCHEME:
            report.problems.append(f"the RSA <signature> is {scheme}, not a SHA-1 DigestInfo of the "
                                   "checksum as productsign writes it: Apple's and xar-style checkers "
                                   "reject it (sign it again with this builder)")
            report.extra["scheme"] = scheme
        else:
            report.checked.append(f"RSA signature ({scheme})")
            report.extra["scheme"] = scheme
        pool = certs[1:]
        if archive.x_signature is not None:
            try:
                cms = _verify_cms(archive.signature_bytes("x-signature"), archive.stored_toc_checksum,
                                  "<x-signature>")
                if cms.signer != leaf:
                    report.problems.append("the CMS <x-signature> and the RSA <signature> name different signers")
                else:
                    report.checked.append("CMS signature")
                pool += [c for c in cms.certificates if c not in pool]
                report.extra["timestamp"] = cms.timestamp
                if cms.timestamp:
                    report.not_checked.append("timestamp token (read, not verified)")
                else:
                    report.not_checked.append("no secure timestamp")
            except InvalidSignature as exc:
                report.problems.append(str(exc) or "CMS <x-signature> does not verify")
            except FormatError as exc:
                report.problems.append(exc.message)
        else:
            report.not_checked.append("no CMS <x-signature> (productsign writes one)")
        _check_chain(report, leaf, pool, ca, INSTALLER)
    return report.as_dict()


APPLE_SCHEME = "PKCS#1 v1.5, SHA-1 DigestInfo of the TOC checksum (Apple xar, productsign)"
RCODESIGN_SCHEME = "PKCS#1 v1.5 over SHA-256 of the TOC checksum (rcodesign)"


def _verify_toc_signature(cert: x509.Certificate, signature: bytes, checksum: bytes, style: str) -> str | None:
    """Which convention the RSA signature of the TOC checksum follows, or None if neither."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    attempts = []
    if style in _HASH_BY_NAME and _HASH_BY_NAME[style]().digest_size == len(checksum):
        scheme = APPLE_SCHEME if style == "sha1" else f"PKCS#1 v1.5, {style.upper()} DigestInfo of the TOC checksum (xar)"
        attempts.append((scheme, utils.Prehashed(_HASH_BY_NAME[style]())))
    attempts.append((RCODESIGN_SCHEME, hashes.SHA256()))
    for name, algorithm in attempts:
        try:
            key.verify(signature, checksum, padding.PKCS1v15(), algorithm)
            return name
        except InvalidSignature:
            continue
    return None


# ------------------------------------------------------------------------------------------
# Verification: Mach-O, bundles, DMGs


def verify_code(path: Path, ca: Path | None) -> dict:
    """Check the code signature of a Mach-O file or a .app bundle.

    Own checks: every CodeDirectory's page hashes and special slots (requirements, entitlements,
    Info.plist, CodeResources), the CMS signature over the CodeDirectory, the cdhashes it signs,
    the bundle's resource seal (every file hashed or omitted by a rule, nested code by cdhash),
    and the chain up to `ca`. Second opinion: apple-platform's `verify_macho` and the
    `signature_verifies` it reads. Not checked: designated requirements, and everything
    Gatekeeper asks Apple about (notarization, revocation).
    """
    _require_library()
    path = Path(path)
    report = _Report()
    if path.is_dir():
        _verify_bundle(path, report, ca)
    else:
        try:
            data = path.read_bytes()
            _verify_macho_file(data, path.name, report, ca, bundle=None)
        except FormatError as exc:
            report.problems.append(exc.message)
        _second_opinion_macho(path, report)
    report.not_checked.append("designated requirement")
    return report.as_dict()


def _second_opinion_macho(path: Path, report: _Report) -> None:
    try:
        problems = ap.verify_macho(path)
        verifies = ap.reading.find_values(ap.read_signature(path), "signature_verifies")
    except ap_errors.ApplePlatformError as exc:
        report.problems.append(f"apple-platform cannot read {path.name}: {exc}")
        return
    if problems:
        report.problems.append("apple-platform verify_macho: " +
                               "; ".join(p.get("description", str(p)) for p in problems))
    elif verifies and all(verifies):
        report.checked.append("apple-platform verify_macho")
    else:
        report.problems.append(f"apple-platform finds no verifying CMS signature in {path.name}")


def _verify_bundle(bundle: Path, report: _Report, ca: Path | None) -> None:
    try:
        main = _bundle_main_executable(bundle)
    except FormatError as exc:
        report.problems.append(exc.message)
        return
    contents = bundle / "Contents"
    resources = contents / "_CodeSignature" / "CodeResources"
    if not main.is_file():
        report.problems.append(f"main executable Contents/MacOS/{main.name} is missing")
        return
    if not resources.is_file():
        report.problems.append("no Contents/_CodeSignature/CodeResources: the bundle is not signed")
        return
    context = {1: (contents / "Info.plist").read_bytes(), 3: resources.read_bytes()}
    try:
        _verify_macho_file(main.read_bytes(), f"Contents/MacOS/{main.name}", report, ca, bundle=context)
    except FormatError as exc:
        report.problems.append(exc.message)
    _second_opinion_macho(main, report)
    _verify_resource_seal(contents, main, context[3], report)


def _rule_for(rel: str, rules: dict) -> dict:
    best, best_weight = {}, -1.0
    for pattern, rule in rules.items():
        if re.search(pattern, rel):
            rule = rule if isinstance(rule, dict) else {}
            weight = float(rule.get("weight", 1))
            if weight > best_weight:
                best, best_weight = rule, weight
    return best


def _verify_resource_seal(contents: Path, main: Path, resources_xml: bytes, report: _Report, *,
                          nested: bool = True) -> None:
    """Every file of the bundle hashed in CodeResources (or omitted by a rule), and no other.
    `nested`: also verify nested code's signatures (off for the quick check after signing)."""
    try:
        seal = plistlib.loads(resources_xml)
        files = seal["files2"]
        rules = seal.get("rules2", {})
    except (plistlib.InvalidFileException, KeyError, ValueError, TypeError):
        report.problems.append("CodeResources is not a plist with files2")
        return
    bad_before = len(report.problems)
    for rel, entry in files.items():
        target = contents / rel
        entry = entry if isinstance(entry, dict) else {"hash": entry}
        if "symlink" in entry:
            if not target.is_symlink() or os.readlink(target) != entry["symlink"]:
                report.problems.append(f"sealed symlink {rel} changed")
            continue
        if not target.is_file():
            if not entry.get("optional"):
                report.problems.append(f"sealed file {rel} is missing")
            continue
        if "cdhash" in entry:  # nested code: sealed by its CodeDirectory hash
            if not nested:
                continue
            sub = _Report()
            try:
                cdhashes = _verify_macho_file(target.read_bytes(), rel, sub, None, bundle=None)
                if entry["cdhash"] not in cdhashes:
                    report.problems.append(f"nested code {rel}: its CodeDirectory hash is not the sealed one")
                report.problems.extend(f"nested code {rel}: {p}" for p in sub.problems)
            except FormatError as exc:
                report.problems.append(f"nested code {rel}: {exc.message}")
            continue
        data = target.read_bytes()
        if "hash2" in entry:
            good = hashlib.sha256(data).digest() == entry["hash2"]
        elif "hash" in entry:
            good = hashlib.sha1(data).digest() == entry["hash"]
        else:
            good = False
        if not good:
            report.problems.append(f"sealed file {rel} changed after signing")
    for file in sorted(contents.rglob("*")):
        if file.is_dir() and not file.is_symlink():
            continue
        rel = file.relative_to(contents).as_posix()
        if rel in files or file == main or rel.startswith("_CodeSignature/"):
            continue
        if _rule_for(rel, rules).get("omit"):
            continue
        report.problems.append(f"{rel} is not sealed by the signature"
                               + (" (only Mach-O can be signed in Contents/MacOS: move it to Contents/Resources)"
                                  if rel.startswith("MacOS/") else ""))
    if len(report.problems) == bad_before:
        report.checked.append(f"resource seal ({len(files)} files)")


def _verify_macho_file(data: bytes, name: str, report: _Report, ca: Path | None,
                       bundle: dict[int, bytes] | None) -> list[bytes]:
    """Verify every slice of a Mach-O; returns the cdhashes of all its CodeDirectories (a
    bundle's CodeResources seals nested code by one of them, the best hash's)."""
    slices = macho_slices(data, name)
    cdhashes: list[bytes] = []
    for index, (offset, size) in enumerate(slices):
        label = name if len(slices) == 1 else f"{name} slice {index}"
        sl = memoryview(data)[offset:offset + size]
        sig = macho_code_signature(sl, label)
        if sig is None:
            report.problems.append(f"{label} is not signed (no LC_CODE_SIGNATURE)")
            continue
        dataoff, datasize = sig
        blobs = superblob_entries(bytes(sl[dataoff:dataoff + datasize]), label)
        cdhashes += _verify_blobs(blobs, sl, dataoff, label, report, ca, bundle, expected=APPLICATION)
    return cdhashes


def _verify_blobs(blobs: dict[int, bytes], signed: memoryview, code_end: int, label: str,
                  report: _Report, ca: Path | None, special: dict[int, bytes] | None,
                  expected: str, rep_specific: bytes | None = None) -> list[bytes]:
    """CodeDirectories, their slots, the CMS over them, and the chain. Returns the cdhashes."""
    cds = [(slot, blobs[slot]) for slot in sorted(blobs) if slot == 0 or 0x1000 <= slot < 0x1005]
    if not cds:
        report.problems.append(f"{label}: the signature has no CodeDirectory")
        return []
    special = dict(special or {})
    for slot, blob_type in ((2, 2), (5, 5), (7, 7)):
        if blob_type in blobs:
            special[slot] = blobs[blob_type]
    if rep_specific is not None:
        special[6] = rep_specific
    cdhashes = []
    problems_before = len(report.problems)
    for slot, blob in cds:
        cd = parse_code_directory(blob, label)
        cdhashes.append(cd.hash(blob)[:20])
        if cd.code_limit != code_end:
            report.problems.append(f"{label}: the CodeDirectory covers {cd.code_limit} bytes, "
                                   f"the code runs to {code_end}")
        for page, (start, end) in enumerate(cd.pages()):
            if cd.hash(signed[start:end])[:cd.hash_size] != cd.code_slot(page):
                report.problems.append(f"{label}: page {page} (bytes {start}-{end}) changed after signing")
                break
        for number in range(1, cd.special_slots + 1):
            stored = cd.special_slot(number)
            zero = stored == bytes(len(stored))
            if number in special:
                if cd.hash(special[number])[:cd.hash_size] != stored:
                    report.problems.append(f"{label}: {_SPECIAL_NAMES.get(number, number)} does not match its hash")
            elif not zero:
                report.not_checked.append(f"{label}: special slot {_SPECIAL_NAMES.get(number, number)}")
        if slot == 0:
            report.extra.setdefault("identifier", cd.identifier)
            report.extra.setdefault("team_id", cd.team_id)
            report.extra.setdefault("hardened_runtime", bool(cd.flags & _CS_RUNTIME))
    if len(report.problems) == problems_before:
        report.checked.append(f"{label}: CodeDirectory hashes ({', '.join(_code_dir_names(cds, label))})")
    if _CMS_SLOT not in blobs:
        report.problems.append(f"{label}: ad-hoc signature (no CMS), not a Developer ID signature")
        return cdhashes
    primary = cds[0][1]
    try:
        cms = _verify_cms(blobs[_CMS_SLOT], primary, f"{label} CMS")
    except InvalidSignature as exc:
        report.problems.append(str(exc) or f"{label}: CMS signature does not verify")
        return cdhashes
    except FormatError as exc:
        report.problems.append(exc.message)
        return cdhashes
    report.checked.append(f"{label}: CMS signature")
    if cms.cdhashes_plist is not None:
        try:
            listed = plistlib.loads(cms.cdhashes_plist).get("cdhashes", [])
        except (plistlib.InvalidFileException, ValueError, AttributeError):
            listed = None
        if listed != cdhashes:
            report.problems.append(f"{label}: the signed cdhashes list does not match the CodeDirectories")
    report.extra.setdefault("timestamp", cms.timestamp)
    if cms.timestamp:
        report.not_checked.append("timestamp token (read, not verified)")
    elif "no secure timestamp (Apple's notary requires one)" not in report.not_checked:
        report.not_checked.append("no secure timestamp (Apple's notary requires one)")
    if not report.chain:
        _check_chain(report, cms.signer, [c for c in cms.certificates if c != cms.signer], ca, expected)
    return cdhashes


def _code_dir_names(cds, label) -> list[str]:
    return [parse_code_directory(blob, label).hash_name for _, blob in cds]


def verify_dmg(path: Path, ca: Path | None) -> dict:
    """Check a signed UDIF image: the CodeDirectory hash of the image up to the signature, the
    koly trailer hash (rep-specific slot), the CMS signature and the chain up to `ca`; plus
    apple-platform's reading of the signature. The code hash covers the whole image up to the
    signature, so any change to the volume shows; a pkg inside still carries (and needs
    verifying for) its own signature."""
    _require_library()
    path = Path(path)
    report = _Report()
    data = path.read_bytes()
    try:
        offset, size = koly_code_signature(data, path.name)
    except FormatError as exc:
        raise FormatError(exc.message, "give a .dmg") from None
    if size == 0:
        report.problems.append("not signed (the koly trailer records no code signature)")
        return report.as_dict()
    if offset + size > len(data) - KOLY_SIZE:
        report.problems.append("the code signature runs into the koly trailer: the image is damaged")
        return report.as_dict()
    if offset + size != len(data) - KOLY_SIZE:
        report.problems.append(f"{len(data) - KOLY_SIZE - offset - size} unsigned bytes between the "
                               "signature and the koly trailer")
    try:
        blobs = superblob_entries(data[offset:offset + size], path.name)
        _verify_blobs(blobs, memoryview(data), offset, path.name, report, ca, None, expected=APPLICATION,
                      rep_specific=koly_for_hash(data[-KOLY_SIZE:]))
    except FormatError as exc:
        report.problems.append(exc.message)
    try:
        verifies = ap.reading.find_values(ap.read_signature(path), "signature_verifies")
        if verifies and all(verifies):
            report.checked.append("apple-platform read_signature")
        else:
            report.problems.append("apple-platform finds no verifying CMS signature")
    except ap_errors.ApplePlatformError as exc:
        report.problems.append(f"apple-platform cannot read the image: {exc}")
    report.not_checked.append("designated requirement")
    return report.as_dict()


def stapled_ticket(path: Path) -> bool:
    """Whether a notarization ticket is stapled to `path`: read where Apple's stapler writes it
    (builder.binfmt.ticket), or, as a second opinion, anywhere apple-platform's reader sees one."""
    from builder.signing import notary

    if notary.stapled_ticket(path) is not None:
        return True
    if ap is None:
        return False
    try:
        found = ap.read_signature(str(path))
    except Exception:  # noqa: BLE001 - the library's own errors: nothing it can read, no ticket
        return False

    def walk(node) -> bool:
        if isinstance(node, dict):
            return any("ticket" in str(k).lower() or walk(v) for k, v in node.items())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return isinstance(node, str) and node.lower() in ("ticket", "notarizationticket")

    return walk(found)


def notarization_report(path: Path) -> dict:
    """The `notarized` fields of a verify report."""
    from builder.signing import notary

    ticket = notary.stapled_ticket(path)
    if ticket is not None:
        return {"notarized": True, "ticket_bytes": len(ticket),
                "notarization": f"a notarization ticket is stapled ({len(ticket)} bytes; Apple's signature "
                                "on it is checked by Gatekeeper, not here)"}
    if stapled_ticket(path):
        return {"notarized": True, "notarization": "a notarization ticket is stapled"}
    return {"notarized": False, "notarization": "no stapled ticket; Gatekeeper checks online or warns"}


# ------------------------------------------------------------------------------------------
# Notarization (builder.signing.notary does the talking)


NO_CREDENTIALS = "no App Store Connect credentials"
_warned: set[str] = set()


def notarize(path: Path, notary_settings, *, staple: bool = True):
    """Submit `path` (a signed pkg or dmg) to Apple's notary service, wait, and staple the ticket
    to `path` in place. `notary_settings` is a builder.signing.notary.Notary, or None: then a
    "not notarized" result and one warning per process. Any failure with credentials (network,
    bad key, rejection) is NotarizationError, exit 13."""
    from builder.signing import notary

    path = Path(path)
    if notary_settings is None:
        if NO_CREDENTIALS not in _warned:
            _warned.add(NO_CREDENTIALS)
            log.warning(f"not notarized: {NO_CREDENTIALS} (Gatekeeper will warn on first open)")
        return notary.NotaryResult(notarized=False, reason=NO_CREDENTIALS)
    return notary.notarize(path, notary_settings, staple_ticket=staple)
