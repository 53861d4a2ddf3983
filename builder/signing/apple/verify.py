"""Verifying Apple signatures without Apple's tools: flat packages, Mach-O files and .app bundles,
DMGs.

Verification does its own cryptography (`cryptography` + `asn1crypto`): TOC and member
checksums, the RSA signature, the CMS signatures, CodeDirectory page and special-slot hashes, the
bundle's resource seal, and the certificate chain up to Apple Root CA (shipped in
builder/resources/apple/, with the Developer ID intermediates) or a CA file given by the caller.
A chain that reaches neither is reported as not checked, never as trusted. apple-platform-py's own
readers (`verify_macho`, `read_signature`) run too, as a second opinion. The byte-level parsers
(Mach-O, SuperBlob, CodeDirectory, koly) are in builder.binfmt.macho.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import plistlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from builder.binfmt import xar
from builder.binfmt.macho import (
    CMS_SLOT,
    CS_RUNTIME,
    KOLY_SIZE,
    SPECIAL_NAMES,
    code_directories,
    koly_code_signature,
    koly_for_hash,
    macho_code_signature,
    macho_slices,
    parse_code_directory,
    special_blobs,
    superblob_entries,
)
from builder.errors import FormatError, UsageError
from builder.signing.apple.certificates import (
    APPLICATION,
    INSTALLER,
    KNOWN_CRITICAL,
    OID_DEVID_CA,
    apple_intermediates,
    apple_roots,
    common_name,
    describe_certificate,
    developer_id_kind,
    is_ca,
    issued_by,
)
from builder.signing.apple.cms import HASH_BY_NAME, verify_cms
from builder.signing.apple.native import ap, ap_errors, require_library

@dataclass
class Report:
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


def check_chain(report: Report, leaf: x509.Certificate, pool: list[x509.Certificate],
                 ca: Path | None, expected_kind: str, *, now: dt.datetime | None = None) -> None:
    """Leaf kind, validity at `now` (default: the clock), critical extensions, and the chain
    through `pool` (and Apple's bundled intermediates) up to a certificate of `ca` or Apple Root
    CA (bundled)."""
    report.signer = common_name(leaf)
    kind = developer_id_kind(leaf)
    if kind != expected_kind:
        report.problems.append(f"signed by '{common_name(leaf)}', which is "
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
            report.problems.append(f"certificate '{common_name(current)}' is valid only from "
                                   f"{current.not_valid_before_utc:%Y-%m-%d} to {current.not_valid_after_utc:%Y-%m-%d}")
        if any(current == root for root in roots):
            anchor = current
            break
        root = next((r for r in roots if issued_by(current, r)), None)
        if root is not None:
            chain.append(root)
            anchor = root
            break
        parent = next((c for c in pool if c not in chain and issued_by(current, c)), None)
        if parent is None or parent == current:
            break
        if not is_ca(parent):
            report.problems.append(f"'{common_name(parent)}' issued '{common_name(current)}' but is not a CA")
            break
        chain.append(parent)
        current = parent
    for cert in chain:
        unknown = [ext.oid.dotted_string for ext in cert.extensions
                   if ext.critical and ext.oid not in KNOWN_CRITICAL]
        if unknown:
            report.problems.append(f"certificate '{common_name(cert)}' has an unknown critical extension "
                                   f"{', '.join(unknown)}: no verifier may accept it")
    if len(chain) > 1:
        if any(ext.oid == OID_DEVID_CA for ext in chain[1].extensions):
            report.checked.append("issued by a Developer ID Certification Authority")
        else:
            report.not_checked.append(f"the issuer '{common_name(chain[1])}' is not a Developer ID "
                                      f"Certification Authority (extension {OID_DEVID_CA.dotted_string}): "
                                      "Gatekeeper accepts only Apple's")
    report.chain = [c.subject.rfc4514_string() for c in chain]
    if anchor is not None:
        report.trusted = True
        source = (f"from {Path(ca).name}" if any(anchor == r for r in given)
                  else "(Apple's, bundled with builder)")
        report.checked.append(f"chain to {common_name(anchor)} {source}")
    elif ca is None:
        report.trusted = None
        report.not_checked.append(f"chain not checked: it ends at '{common_name(chain[-1])}', not Apple Root CA, "
                                  "and no --ca was given")
    else:
        report.trusted = False
        report.extra["root_missing"] = True
        report.problems.append(f"certificate chain ends at '{common_name(chain[-1])}', which is not "
                               f"issued by a certificate in {ca} or by Apple Root CA")


def bundle_main_executable(bundle: Path) -> Path:
    info = bundle / "Contents" / "Info.plist"
    try:
        plist = plistlib.loads(info.read_bytes())
        name = plist["CFBundleExecutable"]
    except (OSError, plistlib.InvalidFileException, KeyError, ValueError):
        raise FormatError(f"{bundle}: Contents/Info.plist is missing or has no CFBundleExecutable",
                          "a .app needs Contents/Info.plist naming its executable") from None
    return bundle / "Contents" / "MacOS" / name


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
    report = Report()
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
        scheme = verify_toc_signature(leaf, signature, archive.stored_toc_checksum, style)
        if scheme is None:
            report.problems.append(f"RSA signature does not verify with '{common_name(leaf)}''s key")
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
                cms = verify_cms(archive.signature_bytes("x-signature"), archive.stored_toc_checksum,
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
        check_chain(report, leaf, pool, ca, INSTALLER)
    return report.as_dict()


APPLE_SCHEME = "PKCS#1 v1.5, SHA-1 DigestInfo of the TOC checksum (Apple xar, productsign)"
RCODESIGN_SCHEME = "PKCS#1 v1.5 over SHA-256 of the TOC checksum (rcodesign)"


def verify_toc_signature(cert: x509.Certificate, signature: bytes, checksum: bytes, style: str) -> str | None:
    """Which convention the RSA signature of the TOC checksum follows, or None if neither."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return None
    attempts = []
    if style in HASH_BY_NAME and HASH_BY_NAME[style]().digest_size == len(checksum):
        scheme = APPLE_SCHEME if style == "sha1" else f"PKCS#1 v1.5, {style.upper()} DigestInfo of the TOC checksum (xar)"
        attempts.append((scheme, utils.Prehashed(HASH_BY_NAME[style]())))
    attempts.append((RCODESIGN_SCHEME, hashes.SHA256()))
    for name, algorithm in attempts:
        try:
            key.verify(signature, checksum, padding.PKCS1v15(), algorithm)
            return name
        except InvalidSignature:
            continue
    return None


def verify_code(path: Path, ca: Path | None) -> dict:
    """Check the code signature of a Mach-O file or a .app bundle.

    Own checks: every CodeDirectory's page hashes and special slots (requirements, entitlements,
    Info.plist, CodeResources), the CMS signature over the CodeDirectory, the cdhashes it signs,
    the bundle's resource seal (every file hashed or omitted by a rule, nested code by cdhash),
    and the chain up to `ca`. Second opinion: apple-platform's `verify_macho` and the
    `signature_verifies` it reads. Not checked: designated requirements, and everything
    Gatekeeper asks Apple about (notarization, revocation).
    """
    require_library()
    path = Path(path)
    report = Report()
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


def _second_opinion_macho(path: Path, report: Report) -> None:
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


def _verify_bundle(bundle: Path, report: Report, ca: Path | None) -> None:
    try:
        main = bundle_main_executable(bundle)
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
    verify_resource_seal(contents, main, context[3], report)


def _rule_for(rel: str, rules: dict) -> dict:
    best, best_weight = {}, -1.0
    for pattern, rule in rules.items():
        if re.search(pattern, rel):
            rule = rule if isinstance(rule, dict) else {}
            weight = float(rule.get("weight", 1))
            if weight > best_weight:
                best, best_weight = rule, weight
    return best


def verify_resource_seal(contents: Path, main: Path, resources_xml: bytes, report: Report, *,
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
            sub = Report()
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


def _verify_macho_file(data: bytes, name: str, report: Report, ca: Path | None,
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
                  report: Report, ca: Path | None, special: dict[int, bytes] | None,
                  expected: str, rep_specific: bytes | None = None) -> list[bytes]:
    """CodeDirectories, their slots, the CMS over them, and the chain. Returns the cdhashes."""
    cds = code_directories(blobs)
    if not cds:
        report.problems.append(f"{label}: the signature has no CodeDirectory")
        return []
    special = {**(special or {}), **special_blobs(blobs)}
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
                    report.problems.append(f"{label}: {SPECIAL_NAMES.get(number, number)} does not match its hash")
            elif not zero:
                report.not_checked.append(f"{label}: special slot {SPECIAL_NAMES.get(number, number)}")
        if slot == 0:
            report.extra.setdefault("identifier", cd.identifier)
            report.extra.setdefault("team_id", cd.team_id)
            report.extra.setdefault("hardened_runtime", bool(cd.flags & CS_RUNTIME))
    if len(report.problems) == problems_before:
        report.checked.append(f"{label}: CodeDirectory hashes ({', '.join(_code_dir_names(cds, label))})")
    if CMS_SLOT not in blobs:
        report.problems.append(f"{label}: ad-hoc signature (no CMS), not a Developer ID signature")
        return cdhashes
    primary = cds[0][1]
    try:
        cms = verify_cms(blobs[CMS_SLOT], primary, f"{label} CMS")
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
        check_chain(report, cms.signer, [c for c in cms.certificates if c != cms.signer], ca, expected)
    return cdhashes


def _code_dir_names(cds, label) -> list[str]:
    return [parse_code_directory(blob, label).hash_name for _, blob in cds]


def verify_dmg(path: Path, ca: Path | None) -> dict:
    """Check a signed UDIF image: the CodeDirectory hash of the image up to the signature, the
    koly trailer hash (rep-specific slot), the CMS signature and the chain up to `ca`; plus
    apple-platform's reading of the signature. The code hash covers the whole image up to the
    signature, so any change to the volume shows; a pkg inside still carries (and needs
    verifying for) its own signature."""
    require_library()
    path = Path(path)
    report = Report()
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
