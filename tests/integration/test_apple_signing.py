"""Apple signing from Linux with the development identities: flat pkg, Mach-O, .app, DMG.

Signatures are checked three ways: builder's own verifier, apple-platform's readers, and the
openssl CLI on bytes pulled out of the signed xar (independent of both). No network is used:
development identities get no timestamp, and notarization failures are provoked locally.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import os
import plistlib
import shutil
import subprocess
import time
from pathlib import Path

import apple_platform as ap
import pyapplebom
import pytest
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from builder.binfmt import bom, cpio, udif, xar
from builder.enrollment import Secret
from builder.errors import FormatError, NotarizationError, SigningError
from builder.signing.signers import AppleKey
from builder.signing import apple, devca
from builder.signing.apple import certificates, identity, notarization
from builder.signing.apple import cms as apple_cms
from builder.signing.apple import verify as apple_verify
from tests.support import applepki, xarcheck

PASSWORD = Secret("development")
CHAIN_NOT_CHECKED = "not Apple Root CA, and no --ca was given"


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def app_key(dev_keys) -> AppleKey:
    return AppleKey(pkcs12=dev_keys.mac_app_pkcs12, password=PASSWORD)


@pytest.fixture(scope="module")
def installer_key(dev_keys) -> AppleKey:
    return AppleKey(pkcs12=dev_keys.mac_installer_pkcs12, password=PASSWORD)


@pytest.fixture(scope="module")
def apple_pki(tmp_path_factory) -> applepki.ApplePKI:
    """Certificates in Apple's layout from a test PKI that is not builder's devca."""
    return applepki.create(tmp_path_factory.mktemp("apple-pki"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """A second development CA that issued none of the signing certificates."""
    return devca.create(tmp_path_factory.mktemp("other-ca")).ca_cert


def _p12(path: Path, key, cert, cas=()) -> Path:
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"test", key, cert, list(cas), serialization.BestAvailableEncryption(b"development")))
    return path


@pytest.fixture(scope="module")
def tls_p12(dev_keys, tmp_path_factory) -> Path:
    """A PKCS#12 of the development TLS certificate (serverAuth only)."""
    from cryptography import x509

    key = serialization.load_pem_private_key(dev_keys.no_eku_key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(dev_keys.no_eku_cert.read_bytes())
    return _p12(tmp_path_factory.mktemp("tls") / "tls.p12", key, cert)


def _unsigned_pkg(folder: Path) -> Path:
    """A small distribution pkg: Distribution + agent.pkg/{PackageInfo,Bom,Payload}, real BOM and cpio."""
    root = folder / "payload-root"
    (root / "Library/Agent").mkdir(parents=True)
    (root / "Library/Agent/agent").write_bytes(b"\x7fagent binary stand-in\n" * 40)
    (root / "Library/Agent/agent").chmod(0o755)
    (root / "Library/Agent/enroll.json").write_text("{}\n")
    cpio_bytes = io.BytesIO()
    stats = cpio.write_cpio(root, cpio_bytes, mtime=0)
    payload = gzip.compress(cpio_bytes.getvalue(), mtime=0)
    package_info = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<pkg-info format-version="2" identifier="com.example.agent" version="1.0" '
        'install-location="/" auth="root">'
        f'<payload numberOfFiles="{stats.number_of_files}" installKBytes="{stats.install_kbytes}"/>'
        "</pkg-info>\n").encode()
    distribution = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<installer-gui-script minSpecVersion="2"><title>Agent</title>'
        '<domains enable_anywhere="false" enable_currentUserHome="false" enable_localSystem="true"/>'
        '<choices-outline><line choice="default"><line choice="com.example.agent"/></line></choices-outline>'
        '<choice id="default"/><choice id="com.example.agent" visible="false">'
        '<pkg-ref id="com.example.agent"/></choice>'
        '<pkg-ref id="com.example.agent" version="1.0" onConclusion="none">#agent.pkg</pkg-ref>'
        "</installer-gui-script>\n").encode()
    members = [
        ("Distribution", distribution),
        ("agent.pkg/PackageInfo", package_info),
        ("agent.pkg/Bom", bom.build_bom(root, mtime=0)),
        ("agent.pkg/Payload", payload),
    ]
    out = folder / "unsigned.pkg"
    out.write_bytes(xar.build_xar(members, epoch=0))
    return out


@pytest.fixture(scope="module")
def signed_pkg(tmp_path_factory, installer_key) -> Path:
    folder = tmp_path_factory.mktemp("pkg")
    src = _unsigned_pkg(folder)
    dst = folder / "agent.pkg"
    apple.sign_flat_package(installer_key, src, dst)
    return dst


def _macho(path: Path, arch: str = "x86_64") -> Path:
    path.write_bytes(ap.macho.create_synthetic(arch))
    path.chmod(0o755)
    return path


def _app(folder: Path, main_exe: bytes | None = None) -> Path:
    bundle = folder / "Agent.app"
    (bundle / "Contents/MacOS").mkdir(parents=True)
    (bundle / "Contents/Resources").mkdir()
    (bundle / "Contents/Info.plist").write_bytes(plistlib.dumps({
        "CFBundleIdentifier": "com.example.agent", "CFBundleExecutable": "agent",
        "CFBundleName": "Agent", "CFBundlePackageType": "APPL", "CFBundleVersion": "1.0"}))
    exe = bundle / "Contents/MacOS/agent"
    if main_exe is None:
        _macho(exe, "aarch64")
    else:
        exe.write_bytes(main_exe)
        exe.chmod(0o755)
    _macho(bundle / "Contents/MacOS/helper", "x86_64")
    (bundle / "Contents/Resources/enroll.json").write_text('{"group": "g"}\n')
    return bundle


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# Identities


def test_classify_identities_in_any_order(app_key, installer_key):
    assert apple.classify_identities([installer_key, app_key]) == (app_key, installer_key)
    assert apple.classify_identities([installer_key]) == (None, installer_key)
    assert apple.classify_identities([app_key]) == (app_key, None)


def test_wrong_password_names_the_file_and_the_variable(dev_keys, tmp_path, installer_key):
    bad = AppleKey(pkcs12=dev_keys.mac_installer_pkcs12, password=Secret("not-the-password"))
    with pytest.raises(SigningError) as info:
        apple.classify_identities([bad])
    assert str(info.value) == (f"wrong password for --mac-sign-pkcs12 {dev_keys.mac_installer_pkcs12}: "
                               "check BUILDER_MAC_SIGN_PASSWORD")
    assert "not-the-password" not in str(info.value)
    src = _unsigned_pkg(tmp_path)
    with pytest.raises(SigningError, match="wrong password"):
        apple.sign_flat_package(bad, src, tmp_path / "out.pkg")
    assert not (tmp_path / "out.pkg").exists()


def test_a_file_that_is_not_pkcs12_is_named(dev_keys):
    with pytest.raises(SigningError) as info:
        apple.classify_identities([AppleKey(pkcs12=dev_keys.ca_cert, password=PASSWORD)])
    assert f"--mac-sign-pkcs12 {dev_keys.ca_cert} is not a PKCS#12" in str(info.value)


def test_a_tls_certificate_is_not_a_developer_id(tls_p12, dev_keys):
    for path in (tls_p12, dev_keys.sign_pkcs12):  # TLS, and a plain (Windows) code-signing cert
        with pytest.raises(SigningError) as info:
            apple.classify_identities([AppleKey(pkcs12=path, password=PASSWORD)])
        message = str(info.value)
        assert str(path) in message and "not a Developer ID identity" in message
        assert "'Developer ID Application'" in message and "'Developer ID Installer'" in message


def test_two_installer_identities_say_what_was_expected(dev_keys, tmp_path, installer_key):
    copy = shutil.copy(dev_keys.mac_installer_pkcs12, tmp_path / "second.p12")
    with pytest.raises(SigningError) as info:
        apple.classify_identities([installer_key, AppleKey(pkcs12=Path(copy), password=PASSWORD)])
    assert "both 'Developer ID Installer' identities" in str(info.value)
    assert "expected to be a 'Developer ID Application' identity" in str(info.value)


def test_the_wrong_kind_signs_nothing(tmp_path, app_key, installer_key):
    src = _unsigned_pkg(tmp_path)
    with pytest.raises(SigningError, match="needs a 'Developer ID Installer' identity"):
        apple.sign_flat_package(app_key, src, tmp_path / "out.pkg")
    assert not (tmp_path / "out.pkg").exists()
    tool = _macho(tmp_path / "tool")
    before = tool.read_bytes()
    with pytest.raises(SigningError, match="needs a 'Developer ID Application' identity"):
        apple.sign_code(installer_key, tool)
    assert tool.read_bytes() == before
    assert _no_leftovers(tmp_path) == []


def test_an_unreachable_timestamp_server_is_a_signing_error(tmp_path, installer_key):
    src = _unsigned_pkg(tmp_path)
    started = time.monotonic()
    with pytest.raises(SigningError, match=r"timestamp server http://127\.0\.0\.1:9/ts did not answer"):
        apple.sign_flat_package(installer_key, src, tmp_path / "out.pkg", timestamp_url="http://127.0.0.1:9/ts")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out.pkg").exists() and _no_leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Flat package


def _signature_parts(pkg: Path, folder: Path) -> dict[str, Path]:
    """Signature, CMS, TOC checksum and leaf certificate of a signed xar, as files for openssl."""
    with xar.read_xar(pkg) as archive:
        parts = {
            "sig": archive.signature_bytes("signature"),
            "cms": archive.signature_bytes("x-signature"),
            "checksum": archive.stored_toc_checksum,
            "leaf": archive.signature.certificates_der[0],
        }
    out = {}
    for name, data in parts.items():
        out[name] = folder / f"{name}.bin"
        out[name].write_bytes(data)
    pub = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", out["leaf"], "-pubkey", "-noout"],
                         check=True, capture_output=True).stdout
    out["pub"] = folder / "pub.pem"
    out["pub"].write_bytes(pub)
    return out


def _openssl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=False)


def test_openssl_verifies_the_pkg_signature_independently(signed_pkg, tmp_path, dev_keys, other_ca):
    parts = _signature_parts(signed_pkg, tmp_path)
    checksum = parts["checksum"].read_bytes()
    # productsign's convention: the 20-byte TOC checksum is the SHA-1 hash that is signed
    # (PKCS#1 v1.5 with a SHA-1 DigestInfo holding it), as `openssl pkeyutl -verify` with
    # digest sha1 checks it.
    pkeyutl = ["pkeyutl", "-verify", "-pubin", "-inkey", parts["pub"], "-sigfile", parts["sig"],
               "-pkeyopt", "digest:sha1", "-in"]
    verified = _openssl(*pkeyutl, parts["checksum"])
    assert verified.returncode == 0 and b"Signature Verified Successfully" in verified.stdout
    # Not SHA-256 of the checksum (rcodesign's own convention, which Apple's checkers reject).
    assert _openssl("dgst", "-sha256", "-verify", parts["pub"], "-signature", parts["sig"],
                    parts["checksum"]).returncode != 0
    # The raw RSA block: a PKCS#1 DigestInfo naming SHA-1, holding the checksum itself.
    recovered = tmp_path / "recovered.der"
    assert _openssl("pkeyutl", "-verifyrecover", "-pubin", "-inkey", parts["pub"], "-in", parts["sig"],
                    "-out", recovered).returncode == 0
    asn1 = _openssl("asn1parse", "-inform", "DER", "-in", recovered).stdout.decode()
    assert ":sha1" in asn1 and checksum.hex().upper() in asn1
    # A different checksum does not verify.
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(bytes([checksum[0] ^ 1]) + checksum[1:])
    assert _openssl(*pkeyutl, wrong).returncode != 0
    # The CMS <x-signature> is a detached signature of the same checksum, chaining to our CA.
    # -purpose any: openssl's default S/MIME purpose rejects the Installer-only EKU;
    # -ignore_critical: OpenSSL stops at Apple's critical marker extension otherwise.
    cms = ["cms", "-verify", "-inform", "DER", "-in", parts["cms"], "-binary", "-purpose", "any",
           "-ignore_critical", "-out", "/dev/null"]
    assert _openssl(*cms, "-content", parts["checksum"], "-CAfile", dev_keys.ca_cert).returncode == 0
    assert _openssl(*cms, "-content", wrong, "-CAfile", dev_keys.ca_cert).returncode != 0
    assert _openssl(*cms, "-content", parts["checksum"], "-CAfile", other_ca).returncode != 0
    strict = _openssl(*[a for a in cms if a != "-ignore_critical"], "-content", parts["checksum"],
                      "-CAfile", dev_keys.ca_cert)
    assert strict.returncode != 0 and b"unhandled critical extension" in strict.stderr
    # And the TOC checksum really is SHA-1 of the compressed TOC.
    with xar.read_xar(signed_pkg) as archive:
        assert hashlib.sha1(archive.toc_compressed).digest() == checksum


def test_the_signature_checks_the_apple_way_with_apples_certificate_order(tmp_path, apple_pki):
    """Signed with an Apple-shaped identity from a PKCS#12 that lists the root before the
    intermediate: the TOC's <X509Data> is still leaf, Developer ID CA, root (productsign's order)."""
    key = AppleKey(pkcs12=apple_pki.p12("Developer ID Installer"), password=Secret(applepki.PASSWORD.decode()))
    src = _unsigned_pkg(tmp_path)
    apple.sign_flat_package(key, src, tmp_path / "signed.pkg")
    checked = xarcheck.check((tmp_path / "signed.pkg").read_bytes())
    assert checked.ok, checked.digest_info.hex()
    assert [c.subject for c in checked.certificates] == [
        checked.certificates[0].subject, apple_pki.ca.subject, apple_pki.root.subject]
    assert checked.chain_in_order
    result = apple.verify_flat_package(tmp_path / "signed.pkg", apple_pki.root_pem)
    assert result["ok"] and result["trusted"] is True, result["detail"]
    assert "Apple xar" in result["scheme"]
    assert "issued by a Developer ID Certification Authority" in result["checked"]
    # The checker can fail: one changed byte of the signature and it says so.
    data = bytearray((tmp_path / "signed.pkg").read_bytes())
    with xar.read_xar(tmp_path / "signed.pkg") as archive:
        data[archive.heap_start + archive.signature.offset + 5] ^= 1
    assert not xarcheck.check(bytes(data)).ok


def test_an_rcodesign_style_signature_is_reported_not_accepted(signed_pkg, tmp_path, installer_key):
    """SHA-256 of the checksum (what rcodesign writes on its own) is not what Apple's checkers
    verify: verify names the convention instead of calling it ok."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    changed = tmp_path / "rcodesign-style.pkg"
    shutil.copy(signed_pkg, changed)
    with xar.read_xar(changed) as archive:
        at = archive.heap_start + archive.signature.offset
        checksum = archive.stored_toc_checksum
    private_key = apple.open_identity(installer_key).private_key
    data = bytearray(changed.read_bytes())
    signature = private_key.sign(checksum, padding.PKCS1v15(), hashes.SHA256())
    data[at:at + len(signature)] = signature
    changed.write_bytes(bytes(data))
    assert not xarcheck.check(bytes(data)).ok
    result = apple.verify_flat_package(changed, None)
    assert not result["ok"] and "SHA-256 of the TOC checksum (rcodesign" in result["detail"]


def test_verify_flat_package(signed_pkg, dev_keys):
    result = apple.verify_flat_package(signed_pkg, dev_keys.ca_cert)
    assert result["ok"], result["detail"]
    assert result["signer"] == "Developer ID Installer: Builder Dev (DEVTEAM01)"
    assert result["trusted"] is True
    assert [s.split("CN=")[1].split(",")[0] for s in result["chain"]] == [
        "Developer ID Installer: Builder Dev (DEVTEAM01)", "Developer ID Certification Authority",
        "Builder Development Root CA (DEVELOPMENT)"]
    assert result["scheme"] == apple_verify.APPLE_SCHEME and "CMS signature" in result["checked"]


def test_verify_flat_package_without_ca_does_not_claim_trust(signed_pkg):
    result = apple.verify_flat_package(signed_pkg, None)
    assert result["ok"] and result["trusted"] is None
    assert CHAIN_NOT_CHECKED in result["detail"]


def test_verify_flat_package_with_another_ca_fails(signed_pkg, other_ca):
    result = apple.verify_flat_package(signed_pkg, other_ca)
    assert not result["ok"] and result["trusted"] is False
    assert "not issued by a certificate in" in result["detail"]


def _verify_with_a_flipped_bit(signed_pkg: Path, tmp_path: Path, ca: Path, offset: int) -> dict:
    changed = tmp_path / "changed.pkg"
    shutil.copy(signed_pkg, changed)
    _flip(changed, offset)
    return apple.verify_flat_package(changed, ca)


def test_a_changed_member_byte_fails_verification(signed_pkg, tmp_path, dev_keys):
    with xar.read_xar(signed_pkg) as archive:
        payload = archive.member("agent.pkg/Payload")
        offset = archive.heap_start + payload.offset + payload.length // 2
    result = _verify_with_a_flipped_bit(signed_pkg, tmp_path, dev_keys.ca_cert, offset)
    assert not result["ok"]
    assert "'agent.pkg/Payload': archived-checksum mismatch" in result["detail"]


def test_a_changed_toc_fails_verification(signed_pkg, tmp_path, dev_keys):
    result = _verify_with_a_flipped_bit(signed_pkg, tmp_path, dev_keys.ca_cert, xar.HEADER_SIZE + 40)  # in the compressed TOC
    assert not result["ok"]
    assert "TOC" in result["detail"]


def test_a_changed_signature_fails_verification(signed_pkg, tmp_path, dev_keys):
    with xar.read_xar(signed_pkg) as archive:
        offset = archive.heap_start + archive.signature.offset + 7
    result = _verify_with_a_flipped_bit(signed_pkg, tmp_path, dev_keys.ca_cert, offset)
    assert not result["ok"] and "RSA signature does not verify" in result["detail"]


def test_a_cms_signature_from_another_pkg_fails_verification(signed_pkg, tmp_path, installer_key, dev_keys):
    """A validly signed CMS over some other package's checksum: only its message digest gives it away."""
    (tmp_path / "other.pkg").write_bytes(xar.build_xar([("Distribution", b"<other/>")], epoch=0))
    apple.sign_flat_package(installer_key, tmp_path / "other.pkg", tmp_path / "other-signed.pkg")
    with xar.read_xar(tmp_path / "other-signed.pkg") as other:
        foreign = other.signature_bytes("x-signature")
    changed = tmp_path / "changed.pkg"
    shutil.copy(signed_pkg, changed)
    with xar.read_xar(changed) as archive:
        assert archive.x_signature.size == len(foreign)
        offset = archive.heap_start + archive.x_signature.offset
    data = bytearray(changed.read_bytes())
    data[offset:offset + len(foreign)] = foreign
    changed.write_bytes(bytes(data))
    result = apple.verify_flat_package(changed, dev_keys.ca_cert)
    assert not result["ok"] and "CMS message digest does not match" in result["detail"]


def test_an_unsigned_pkg_is_not_ok(tmp_path, dev_keys):
    result = apple.verify_flat_package(_unsigned_pkg(tmp_path), dev_keys.ca_cert)
    assert not result["ok"] and "not signed" in result["detail"]
    with pytest.raises(FormatError, match="not a flat package"):
        apple.verify_flat_package(dev_keys.ca_cert, dev_keys.ca_cert)


def test_the_signed_pkg_still_reads_everywhere(signed_pkg):
    names = ["Distribution", "agent.pkg", "agent.pkg/PackageInfo", "agent.pkg/Bom", "agent.pkg/Payload"]
    listing = subprocess.run(["7z", "l", signed_pkg], check=True, capture_output=True, text=True).stdout
    for name in names:
        assert name in listing
    bsdtar = subprocess.run(["bsdtar", "-tf", signed_pkg], check=True, capture_output=True, text=True).stdout
    assert bsdtar.split() == names
    info = ap.packaging.pkg_info(signed_pkg)
    assert [c["package_info"]["identifier"] for c in info["components"]] == ["com.example.agent"]
    bom_bytes = ap.packaging.pkg_extract_member(signed_pkg, "agent.pkg/Bom")
    parsed = pyapplebom.parse_bom_bytes(bom_bytes)
    assert "./Library/Agent/enroll.json" in str(parsed)
    assert ap.path_type(signed_pkg) == "xar"


# --------------------------------------------------------------------------------------------
# Reproducible flat package signatures


def _within_validity(key: AppleKey, hours: int) -> dt.datetime:
    """A whole-second time inside the development certificate's validity (made this session)."""
    start = apple.open_identity(key).certificate.not_valid_before_utc.replace(microsecond=0)
    return start + dt.timedelta(hours=hours)


def _cms_signing_time(pkg: Path) -> dt.datetime:
    with xar.read_xar(pkg) as archive:
        signer = asn1_cms.ContentInfo.load(archive.signature_bytes("x-signature"))["content"]["signer_infos"][0]
    return next(a["values"][0].native for a in signer["signed_attrs"] if a["type"].native == "signing_time")


def test_a_fixed_signing_time_gives_identical_signed_pkgs(tmp_path, installer_key, dev_keys):
    src = _unsigned_pkg(tmp_path)
    when, later = _within_validity(installer_key, 1), _within_validity(installer_key, 2)
    first, second, other = tmp_path / "first.pkg", tmp_path / "second.pkg", tmp_path / "other.pkg"
    apple.sign_flat_package(installer_key, src, first, signing_time=when)
    time.sleep(1.1)  # the library writes the wall clock: a second later it differs
    apple.sign_flat_package(installer_key, src, second, signing_time=when)
    apple.sign_flat_package(installer_key, src, other, signing_time=later)
    assert first.read_bytes() == second.read_bytes()
    assert _cms_signing_time(first) == when and _cms_signing_time(other) == later

    a, b = first.read_bytes(), other.read_bytes()
    assert len(a) == len(b) and a != b
    with xar.read_xar(first) as x, xar.read_xar(other) as y:
        # The TOC (which records where the signatures sit), its checksum and the RSA signature of
        # that checksum are all unchanged: only the CMS bytes are new.
        assert x.toc_compressed == y.toc_compressed and x.stored_toc_checksum == y.stored_toc_checksum
        assert x.signature_bytes("signature") == y.signature_bytes("signature")
        start = x.heap_start + x.x_signature.offset
        end = start + x.x_signature.size
    differing = [i for i in range(len(a)) if a[i] != b[i]]
    assert start <= differing[0] and differing[-1] < end

    for pkg in (first, other):
        result = apple.verify_flat_package(pkg, dev_keys.ca_cert)
        assert result["ok"] and result["trusted"] is True, result["detail"]
        (tmp_path / pkg.stem).mkdir()
        parts = _signature_parts(pkg, tmp_path / pkg.stem)
        verified = _openssl("cms", "-verify", "-binary", "-purpose", "any", "-ignore_critical", "-content", parts["checksum"],
                            "-inform", "DER", "-in", parts["cms"], "-CAfile", dev_keys.ca_cert, "-out", "/dev/null")
        assert verified.returncode == 0, verified.stderr


def test_a_signing_time_that_changes_the_cms_length_signs_nothing(tmp_path, installer_key):
    src = _unsigned_pkg(tmp_path)
    dst = tmp_path / "out.pkg"
    # 2051 is a GeneralizedTime (17 bytes with tag and length); the wall-clock UTCTime is 15.
    when = dt.datetime(2051, 1, 1, tzinfo=dt.timezone.utc)
    with pytest.raises(SigningError, match="2051-01-01T00:00:00Z needs 17 bytes of DER, the signature has room for 15"):
        apple.sign_flat_package(installer_key, src, dst, signing_time=when)
    assert not dst.exists() and _no_leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="timezone-aware"):
        apple.sign_flat_package(installer_key, src, dst, signing_time=dt.datetime(2030, 1, 1))
    assert not dst.exists() and _no_leftovers(tmp_path) == []


def test_a_timestamped_cms_keeps_its_signing_time(signed_pkg, installer_key):
    """A secure timestamp stamps the signature itself: re-signing would break it, so it is left."""
    with xar.read_xar(signed_pkg) as archive:
        info = asn1_cms.ContentInfo.load(archive.signature_bytes("x-signature"))
    info["content"]["signer_infos"][0]["unsigned_attrs"] = [{
        "type": "signature_time_stamp_token",
        "values": [asn1_cms.ContentInfo({"content_type": "data", "content": b"token"})]}]
    stamped = info.dump(force=True)
    key = apple.open_identity(installer_key).private_key
    when = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    assert apple_cms.cms_with_signing_time(stamped, when, key, "test") == stamped
    info["content"]["signer_infos"][0]["unsigned_attrs"] = None
    plain = info.dump(force=True)
    assert apple_cms.cms_with_signing_time(plain, when, key, "test") != plain


def test_identities_are_opened_once_per_file_version(installer_key, tmp_path, monkeypatch):
    copy = Path(shutil.copy(installer_key.pkcs12, tmp_path / "installer.p12"))
    loads = []
    real = identity._load_identity

    def counting(*args):
        loads.append(args[0])
        return real(*args)

    monkeypatch.setattr(identity, "_identity_cache", {})
    monkeypatch.setattr(identity, "_load_identity", counting)
    key, same = AppleKey(pkcs12=copy, password=PASSWORD), AppleKey(pkcs12=copy, password=Secret("development"))
    apple.open_identity(key)
    assert apple.open_identity(same).key is same and len(loads) == 1
    with pytest.raises(SigningError, match="wrong password"):  # the password is part of the cache key
        apple.open_identity(AppleKey(pkcs12=copy, password=Secret("not-the-password")))
    assert len(loads) == 2
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a replaced file is opened again
    apple.open_identity(key)
    assert len(loads) == 3
    assert all(PASSWORD.reveal().encode() not in part for k in identity._identity_cache
               for part in (k[-1], repr(k).encode()))


# --------------------------------------------------------------------------------------------
# Mach-O and .app


def test_sign_and_verify_a_macho_in_place(tmp_path, app_key, dev_keys, other_ca):
    tool = _macho(tmp_path / "tool")
    unsigned = tool.read_bytes()
    apple.sign_code(app_key, tool, identifier="com.example.tool")
    assert tool.read_bytes() != unsigned and tool.stat().st_mode & 0o111
    assert ap.verify_macho(tool) == []
    result = apple.verify_code(tool, dev_keys.ca_cert)
    assert result["ok"], result["detail"]
    assert result["identifier"] == "com.example.tool" and result["hardened_runtime"] is True
    assert result["signer"] == "Developer ID Application: Builder Dev (DEVTEAM01)"
    assert not apple.verify_code(tool, other_ca)["ok"]
    assert CHAIN_NOT_CHECKED in apple.verify_code(tool, None)["detail"]
    _flip(tool, 200)  # inside __TEXT: covered by page 0's hash
    changed = apple.verify_code(tool, dev_keys.ca_cert)
    assert not changed["ok"] and "page 0" in changed["detail"]


def test_an_unsigned_macho_is_not_ok(tmp_path, dev_keys):
    result = apple.verify_code(_macho(tmp_path / "tool"), dev_keys.ca_cert)
    assert not result["ok"] and "not signed" in result["detail"]


def test_sign_and_verify_an_app_bundle(tmp_path, app_key, dev_keys):
    bundle = _app(tmp_path)
    apple.sign_code(app_key, bundle)
    assert (bundle / "Contents/_CodeSignature/CodeResources").is_file()
    assert _no_leftovers(tmp_path) == []
    result = apple.verify_code(bundle, dev_keys.ca_cert)
    assert result["ok"], result["detail"]
    assert result["identifier"] == "com.example.agent"
    assert any(c.startswith("resource seal") for c in result["checked"])
    # Every executable got the hardened runtime, the nested one included.
    helper = apple.verify_code(bundle / "Contents/MacOS/helper", dev_keys.ca_cert)
    assert helper["ok"] and helper["hardened_runtime"] is True

    (bundle / "Contents/Resources/enroll.json").write_text('{"group": "other"}\n')
    assert "enroll.json changed after signing" in apple.verify_code(bundle, dev_keys.ca_cert)["detail"]


def test_an_added_file_breaks_the_seal(tmp_path, app_key, dev_keys):
    bundle = _app(tmp_path)
    apple.sign_code(app_key, bundle)
    (bundle / "Contents/Resources/extra.txt").write_text("x")
    result = apple.verify_code(bundle, dev_keys.ca_cert)
    assert not result["ok"] and "Resources/extra.txt is not sealed" in result["detail"]


def test_a_script_in_macos_is_refused_not_dropped(tmp_path, app_key, dev_keys):
    """rcodesign signs only Mach-O: it leaves a script in Contents/MacOS out of the seal (and
    drops it when signing into a new folder). sign_code refuses; the bundle stays as it was."""
    bundle = _app(tmp_path)
    (bundle / "Contents/MacOS/run.sh").write_text("#!/bin/sh\n")
    with pytest.raises(SigningError, match="MacOS/run.sh is not sealed"):
        apple.sign_code(app_key, bundle)
    assert (bundle / "Contents/MacOS/run.sh").is_file()
    assert not (bundle / "Contents/_CodeSignature").exists()
    assert _no_leftovers(tmp_path) == []
    # Signed some other way, the verifier catches the same hole.
    (bundle / "Contents/MacOS/run.sh").rename(tmp_path / "run.sh")
    apple.sign_code(app_key, bundle)
    shutil.move(tmp_path / "run.sh", bundle / "Contents/MacOS/run.sh")
    result = apple.verify_code(bundle, dev_keys.ca_cert)
    assert not result["ok"] and "MacOS/run.sh is not sealed" in result["detail"]


def test_an_app_whose_main_executable_is_a_script_is_refused_untouched(tmp_path, app_key):
    bundle = _app(tmp_path, main_exe=b"#!/bin/sh\necho agent\n")
    before = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*"))
    with pytest.raises(SigningError, match="Invalid magic"):
        apple.sign_code(app_key, bundle)
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == before
    assert _no_leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# DMG


@pytest.fixture(scope="module")
def unsigned_dmg(tmp_path_factory, signed_pkg) -> Path:
    from builder.tools import xorriso

    folder = tmp_path_factory.mktemp("dmg")
    (folder / "src").mkdir()
    shutil.copy(signed_pkg, folder / "src" / "Agent.pkg")
    xorriso.hfsplus_image(folder / "src", folder / "raw.img", "Agent", 0)
    udif.write(folder / "raw.img", folder / "unsigned.dmg")
    return folder / "unsigned.dmg"


def test_sign_and_verify_a_dmg(unsigned_dmg, tmp_path, app_key, installer_key, dev_keys, other_ca):
    dst = tmp_path / "Agent.dmg"
    with pytest.raises(SigningError, match="needs a 'Developer ID Application' identity"):
        apple.sign_dmg(installer_key, unsigned_dmg, dst)
    assert not dst.exists()
    apple.sign_dmg(app_key, unsigned_dmg, dst)
    result = apple.verify_dmg(dst, dev_keys.ca_cert)
    assert result["ok"], result["detail"]
    assert result["signer"] == "Developer ID Application: Builder Dev (DEVTEAM01)"
    assert ap.packaging.dmg_info(dst)["has_code_signature"]
    # Still a UDIF image whose disk is unchanged: the signature sits before the koly trailer.
    raw = unsigned_dmg.parent / "raw.img"
    assert udif.unpack(dst) == raw.read_bytes()
    assert "5.hfs" in subprocess.run(["7z", "l", dst], check=True, capture_output=True, text=True).stdout
    assert not apple.verify_dmg(dst, other_ca)["ok"]
    assert not apple.verify_dmg(unsigned_dmg, dev_keys.ca_cert)["ok"]
    _flip(dst, 10)  # inside the first zlib chunk
    changed = apple.verify_dmg(dst, dev_keys.ca_cert)
    assert not changed["ok"] and "changed after signing" in changed["detail"]


# --------------------------------------------------------------------------------------------
# Notarization (no network here: the failures are provoked locally)


def test_without_credentials_not_notarized_and_warned_once(signed_pkg, monkeypatch):
    warnings = []
    monkeypatch.setattr(notarization.log, "warning", warnings.append)
    monkeypatch.setattr(notarization, "_warned", set())
    first = apple.notarize(signed_pkg, None)
    second = apple.notarize(signed_pkg, None)
    assert first == second
    assert first.notarized is False and first.reason == "no App Store Connect credentials"
    assert first.as_dict()["notarized"] is False
    assert len(warnings) == 1 and "no App Store Connect credentials" in warnings[0]


def _notary(key_text: str, url: str = "http://127.0.0.1:9") -> "notary.Notary":
    from builder.signing import notary

    credentials = notary.NotaryCredentials(issuer_id="00000000-0000-0000-0000-000000000000", key_id="TESTKEY42",
                                           private_key=Secret(key_text))
    return notary.Notary(credentials=credentials, service=notary.NotaryService.local(url))


def test_a_key_that_is_not_an_app_store_connect_key_fails_before_any_network(signed_pkg):
    """Refused before any request: the service URL given is unreachable, so a request would
    fail differently. (The whole path against a stand-in is in test_notarization.py.)"""
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(NotarizationError, match="is not an EC P-256 key"):
        apple.notarize(signed_pkg, _notary(rsa_pem))
    with pytest.raises(NotarizationError, match="not a PEM or base64 PKCS#8 key"):
        apple.notarize(signed_pkg, _notary("not a key"))


# --------------------------------------------------------------------------------------------
# Apple's roots bundled: trusted without --ca


def test_openssl_chains_the_bundled_intermediates_to_the_bundled_root(tmp_path):
    pem = tmp_path / "root.pem"
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", certificates.APPLE_RESOURCES / "AppleRootCA.cer", "-out", pem], check=True)
    for name in ("DeveloperIDCA.cer", "DeveloperIDG2CA.cer"):
        out = subprocess.run(["openssl", "verify", "-CAfile", pem, "-attime", "1767225600",
                              certificates.APPLE_RESOURCES / name], capture_output=True, text=True)
        assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr


def test_a_chain_to_a_bundled_root_is_trusted_without_ca(tmp_path, apple_pki, monkeypatch):
    """The genuine root cannot sign a test certificate, so the bundled folder is pointed at the
    Apple-layout test PKI's root and intermediate: the same code path as a genuine chain."""
    key = AppleKey(pkcs12=apple_pki.p12("Developer ID Installer", "bundled.p12"),
                   password=Secret(applepki.PASSWORD.decode()))
    src = _unsigned_pkg(tmp_path)
    apple.sign_flat_package(key, src, tmp_path / "signed.pkg")
    assert apple.open_identity(key).apple_issued is False  # Apple's names, not Apple's keys
    untrusted = apple.verify_flat_package(tmp_path / "signed.pkg", None)
    assert untrusted["ok"] and untrusted["trusted"] is None

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "AppleRootCA.cer").write_bytes(apple_pki.root.public_bytes(serialization.Encoding.DER))
    (bundled / "DeveloperIDG2CA.cer").write_bytes(apple_pki.ca.public_bytes(serialization.Encoding.DER))
    monkeypatch.setattr(certificates, "APPLE_RESOURCES", bundled)
    certificates._apple_certificates.cache_clear()
    try:
        result = apple.verify_flat_package(tmp_path / "signed.pkg", None)
        assert result["ok"] and result["trusted"] is True, result["detail"]
        assert "chain to Apple Root CA (Apple's, bundled with builder)" in result["checked"]
        assert apple.open_identity(key).apple_issued is True
    finally:
        certificates._apple_certificates.cache_clear()
