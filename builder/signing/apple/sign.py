"""Apple code signing from Linux: flat packages (productsign), DMGs and Mach-O files and .app
bundles (codesign), with a Developer ID identity.

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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs12

from builder import log
from builder.binfmt import macho, xar
from builder.errors import FormatError, SigningError
from builder.signing.apple.certificates import APPLICATION, INSTALLER, common_name
from builder.signing.apple.cms import HASH_BY_NAME, cms_with_signing_time, verify_cms
from builder.signing.apple.identity import PASSWORD_HINT, Identity, open_for
from builder.signing.apple.native import ap, ap_errors, require_library
from builder.signing.apple.verify import (
    APPLE_SCHEME,
    Report,
    bundle_main_executable,
    verify_resource_seal,
    verify_toc_signature,
)
from builder.signing.signers import AppleKey

APPLE_TIMESTAMP_URL = "http://timestamp.apple.com/ts01"
# `timestamp_url=AUTO`: Apple's server for an Apple-issued identity, none for a development one
# (Apple's server would stamp it, but nothing trusts the signature anyway).
AUTO = "auto"


@contextlib.contextmanager
def _library_signer(identity: Identity) -> Iterator[object]:
    """The identity as apple-platform-py can read it (see the module docstring), for one call."""
    require_library()
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
        return SigningError(f"signing {what}: the signing key could not be used ({text})", PASSWORD_HINT)
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
    require_library()
    src, dst = Path(src), Path(dst)
    when = _whole_seconds_utc(signing_time) if signing_time is not None else None
    identity = open_for(key, INSTALLER, f"signing {src.name}")
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
    return private_key.sign(checksum, padding.PKCS1v15(), utils.Prehashed(HASH_BY_NAME[style]()))


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
    if style not in HASH_BY_NAME or HASH_BY_NAME[style]().digest_size != len(checksum):
        raise SigningError(f"signing {what}: TOC checksum style {style} cannot be signed Apple's way",
                           "report this: the package was not written")
    signature = apple_toc_signature(identity.private_key, checksum, style)
    if len(signature) != len(old) or verify_toc_signature(identity.certificate, signature, checksum, style) != APPLE_SCHEME:
        raise SigningError(f"signing {what}: the RSA <signature> could not be written Apple's way",
                           "report this: the package was not written")
    with open(pkg, "r+b") as fh:
        fh.seek(position)
        fh.write(signature)


def _set_pkg_signing_time(identity: Identity, pkg: Path, when: dt.datetime, what: str) -> None:
    """Give the CMS <x-signature> of the signed flat package `pkg` the signing time `when`, in place.

    The TOC records only the offset and size of the signature bytes and the TOC checksum covers
    only the compressed TOC, so new bytes of the same length leave the TOC, its checksum and the
    RSA <signature> (over that checksum) valid. The result is checked with `verify_cms` before
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
        checked = verify_cms(patched, checksum, f"signing {what}: the re-signed <x-signature>")
    except InvalidSignature as exc:
        raise SigningError(str(exc), "report this: the package was not written") from None
    except FormatError as exc:
        raise SigningError(exc.message, "report this: the package was not written") from None
    if checked.signer != identity.certificate or checked.signing_time != str(when):
        raise SigningError(f"signing {what}: the re-signed <x-signature> names '{common_name(checked.signer)}' "
                           f"at {checked.signing_time}, not '{identity.subject}' at {when}",
                           "report this: the package was not written")
    with open(pkg, "r+b") as fh:
        fh.seek(position)
        fh.write(patched)


def sign_dmg(key: AppleKey, src: Path, dst: Path, *, timestamp_url: str | None = AUTO,
             signing_time: dt.datetime | None = None, identifier: str | None = None) -> None:
    """codesign a UDIF disk image with a Developer ID Application identity, into `dst`.

    The signature is appended before the koly trailer, which records where it is. `identifier`
    defaults to the file name without extension (what codesign does).
    """
    require_library()
    src, dst = Path(src), Path(dst)
    identity = open_for(key, APPLICATION, f"signing {src.name}")
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
    require_library()
    path = Path(path)
    identity = open_for(key, APPLICATION, f"signing {path.name}")
    kind = _check_input(path, ("macho", "bundle"), "Mach-O file or .app bundle")
    flags = ["runtime"] if hardened_runtime else []
    main = ap.PathSettings(code_signature_flags=list(flags),
                           entitlements_xml_file=str(entitlements) if entitlements else None)
    if identifier:
        main.binary_identifier = identifier
    scopes: dict[str, object] = {"@main": main}
    if kind == "bundle" and hardened_runtime:
        main_exe = bundle_main_executable(path)
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
            seal = Report()
            verify_resource_seal(copy / "Contents", bundle_main_executable(copy),
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


def _is_macho_executable(path: Path) -> bool:
    with open(path, "rb") as fh:
        return macho.is_executable(fh.read(16))
