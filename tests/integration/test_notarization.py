"""Notarization end to end against a stand-in of Apple's notary service on 127.0.0.1
(tests/support/notary_standin.py), with identities from the Apple-layout test PKI: submit,
upload, wait, log, ticket lookup, staple, and `verify` seeing the stapled ticket. Live
notarization against Apple is not run here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import apple_platform as ap
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from builder.binfmt import ticket as ticketfmt
from builder.binfmt import udif, xar
from builder.enrollment import Secret
from builder.errors import NotarizationError
from builder.signing.signers import AppleKey
from builder.signing import apple, notary
from tests.support import applepki, xarcheck
from tests.support.notary_standin import NotaryStandIn

REPO = Path(__file__).resolve().parents[2]
ISSUER = "69a6de70-03db-47e3-e053-5b8c7c11a4d1"
KEY_ID = "TESTKEY042"
MAC_PASSWORD = applepki.PASSWORD.decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> applepki.ApplePKI:
    return applepki.create(tmp_path_factory.mktemp("apple-pki"))


@pytest.fixture(scope="module")
def keys(pki) -> dict[str, AppleKey]:
    return {kind: AppleKey(pkcs12=pki.p12(f"Developer ID {kind}"), password=Secret(MAC_PASSWORD))
            for kind in ("Application", "Installer")}


@pytest.fixture(scope="module")
def api_key(tmp_path_factory):
    """An App Store Connect API key as Apple hands it out: an EC P-256 AuthKey_<id>.p8."""
    key = ec.generate_private_key(ec.SECP256R1())
    folder = tmp_path_factory.mktemp("asc")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    (folder / f"AuthKey_{KEY_ID}.p8").write_text(pem)
    key_json = folder / "api-key.json"
    key_json.write_text(json.dumps({"issuer_id": ISSUER, "key_id": KEY_ID, "private_key": pem}))
    key_json.chmod(0o600)
    return key, pem, key_json


@pytest.fixture
def standin(api_key):
    server = NotaryStandIn(keys={KEY_ID: (ISSUER, api_key[0].public_key())}).start()
    yield server
    server.close()


def _notary(standin, pem) -> notary.Notary:
    credentials = notary.NotaryCredentials(issuer_id=ISSUER, key_id=KEY_ID, private_key=Secret(pem))
    return notary.Notary(credentials=credentials, service=notary.NotaryService.local(standin.url))


def _signed_pkg(folder: Path, key: AppleKey) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "unsigned.pkg").write_bytes(xar.build_xar([("Distribution", b"<installer-gui-script/>")], epoch=0))
    apple.sign_flat_package(key, folder / "unsigned.pkg", folder / "agent.pkg")
    return folder / "agent.pkg"


def _signed_dmg(folder: Path, key: AppleKey, pkg: Path) -> Path:
    from builder.tools import xorriso

    (folder / "src").mkdir(parents=True)
    shutil.copy(pkg, folder / "src" / "Agent.pkg")
    xorriso.hfsplus_image(folder / "src", folder / "raw.img", "Agent", 0)
    udif.write(folder / "raw.img", folder / "unsigned.dmg")
    apple.sign_dmg(key, folder / "unsigned.dmg", folder / "Agent.dmg")
    return folder / "Agent.dmg"


# --------------------------------------------------------------------------------------------


def test_the_jwt_is_es256_as_apple_documents(api_key, standin):
    token = notary.make_jwt(notary.NotaryCredentials(issuer_id=ISSUER, key_id=KEY_ID, private_key=Secret(api_key[1])))
    assert standin.check_jwt(f"Bearer {token}") is None
    claims = standin.jwt_claims[-1]
    assert claims["iss"] == ISSUER and claims["aud"] == "appstoreconnect-v1" and 0 < claims["exp"] - claims["iat"] <= 1200
    # Another key under the same key id is refused: the stand-in really checks the signature.
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    forged = notary.make_jwt(notary.NotaryCredentials(issuer_id=ISSUER, key_id=KEY_ID, private_key=Secret(other)))
    assert standin.check_jwt(f"Bearer {forged}") == "signature does not verify"


def test_a_pkg_is_notarized_stapled_and_verify_sees_the_ticket(tmp_path, keys, api_key, standin, pki):
    pkg = _signed_pkg(tmp_path, keys["Installer"])
    checksum_before = xarcheck.check(pkg.read_bytes()).checksum
    result = apple.notarize(pkg, _notary(standin, api_key[1]))
    assert result.notarized and result.stapled and result.status == "Accepted"
    assert result.submission_id in standin.submissions
    assert standin.submissions[result.submission_id].uploaded is not None
    # The ticket sits after the archive as Apple's stapler writes it: terminator, ticket, trailer.
    data = pkg.read_bytes()
    ticket = ticketfmt.xar_ticket(data)
    assert ticket is not None and ticket.startswith(b"s8ch")
    assert data[-16:-12] == b"t8lr" and int.from_bytes(data[-8:-4], "little") == len(ticket)
    # Still the same signed archive for every reader.
    checked = xarcheck.check(data)
    assert checked.ok and checked.checksum == checksum_before
    assert "Distribution" in subprocess.run(["bsdtar", "-tf", pkg], capture_output=True, text=True, check=True).stdout
    report = apple.verify_flat_package(pkg, pki.root_pem)
    assert report["ok"] and report["trusted"] is True, report["detail"]
    shown = apple.notarization_report(pkg)
    assert shown["notarized"] is True and shown["ticket_bytes"] == len(ticket)


def test_a_dmg_is_notarized_and_stapled_into_its_signature(tmp_path, keys, api_key, standin, pki):
    pkg = _signed_pkg(tmp_path / "pkg", keys["Installer"])
    dmg = _signed_dmg(tmp_path / "dmg", keys["Application"], pkg)
    raw_before = udif.unpack(dmg)
    result = apple.notarize(dmg, _notary(standin, api_key[1]))
    assert result.notarized and result.stapled
    ticket = ticketfmt.dmg_ticket(dmg.read_bytes(), "dmg")
    assert ticket is not None and ticket.startswith(b"s8ch")
    assert udif.unpack(dmg) == raw_before  # the disk is untouched
    report = apple.verify_dmg(dmg, pki.root_pem)
    assert report["ok"], report["detail"]
    assert apple.notarization_report(dmg)["notarized"] is True
    assert ap.packaging.dmg_info(dmg)["has_code_signature"]
    # apple-platform's own signature reader (rcodesign's) finds the ticket slot too.
    assert "Ticket (65538)" in json.dumps(ap.read_signature(dmg))


def test_a_rejection_is_exit_13_with_apples_log_summary(tmp_path, keys, api_key, standin):
    standin.reject = True
    pkg = _signed_pkg(tmp_path, keys["Installer"])
    before = pkg.read_bytes()
    with pytest.raises(NotarizationError) as info:
        apple.notarize(pkg, _notary(standin, api_key[1]))
    assert info.value.exit_code == 13
    message = str(info.value)
    assert "Apple says Invalid" in message and "Archive contains critical validation errors" in message
    assert "not signed with a valid Developer ID certificate" in message
    assert pkg.read_bytes() == before  # nothing stapled
    assert api_key[1] not in message


def test_a_wrong_key_and_an_unreachable_service_are_exit_13(tmp_path, keys, standin):
    pkg = _signed_pkg(tmp_path, keys["Installer"])
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(NotarizationError, match="answered 401") as info:
        apple.notarize(pkg, _notary(standin, other))
    assert info.value.exit_code == 13 and other not in str(info.value)
    unreachable = notary.Notary(credentials=notary.NotaryCredentials(issuer_id=ISSUER, key_id=KEY_ID, private_key=Secret(other)),
                                service=notary.NotaryService.local("http://127.0.0.1:9"))
    started = time.monotonic()
    with pytest.raises(NotarizationError, match="cannot reach 127.0.0.1:9"):
        apple.notarize(pkg, unreachable)
    assert time.monotonic() - started < 15


def test_credentials_from_file_and_environment(api_key, tmp_path):
    _, pem, key_json = api_key
    from_file = notary.credentials_from_file(key_json)
    assert (from_file.issuer_id, from_file.key_id) == (ISSUER, KEY_ID)
    assert pem not in repr(from_file)
    env = {"BUILDER_NOTARY_ISSUER": ISSUER, "BUILDER_NOTARY_KEY_ID": KEY_ID,
           "BUILDER_NOTARY_KEY": str(key_json.parent / f"AuthKey_{KEY_ID}.p8")}
    from_env = notary.credentials_from_env(env)
    assert from_env.key().public_key().public_numbers() == api_key[0].public_key().public_numbers()
    assert notary.credentials_from_env({}) is None
    from builder.errors import UsageError
    with pytest.raises(UsageError, match="BUILDER_NOTARY_KEY_ID"):
        notary.credentials_from_env({"BUILDER_NOTARY_ISSUER": ISSUER, "BUILDER_NOTARY_KEY": pem})


# --------------------------------------------------------------------------------------------
# The command line: build, release, stamp and verify, with the test PKI's identities


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "SOURCE_DATE_EPOCH": "1767225600",
            "BUILDER_MAC_SIGN_PASSWORD": MAC_PASSWORD, "TOK": "notary-cli-token", **(env or {})}
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=REPO)


def test_cli_build_release_stamp_notarize_and_verify(tmp_path, keys, api_key, standin, pki, test_payload, dev_keys):
    mac = ["--mac-sign-pkcs12", keys["Application"].pkcs12, "--mac-sign-pkcs12", keys["Installer"].pkcs12,
           "--ca", pki.root_pem]
    notarize = ["--notarize-key", api_key[2], "--notary-url", standin.url]
    enrollment = ["--account-id", "acct-1", "--group-id", "grp-1", "--token-env", "TOK",
                  "--console-url", "https://console.example.com", "--enrollment-key", dev_keys.folder / "enrollment.key"]
    proc = _cli("build", "--allow-example-identity", "--format", "pkg", "--format", "dmg", "--version", "1.0.0", *enrollment,
                "--payload", test_payload, "--out", tmp_path / "out", *mac, *notarize, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert api_key[1].splitlines()[1] not in proc.stdout + proc.stderr  # the key never shows
    doc = json.loads(proc.stdout)
    for installer in doc["installers"]:
        note = installer["details"]["notarization"]
        assert installer["notarized"] is True and note["status"] == "Accepted" and note["stapled"] is True
        assert note["submission_id"] in standin.submissions
    assert "waiting for Apple's verdict" in proc.stderr  # the progress line
    pkg = next((tmp_path / "out").glob("*.pkg"))
    dmg = next((tmp_path / "out").glob("*.dmg"))
    # The pkg's <signature> checks the Apple way with openssl.
    checked = xarcheck.check(pkg.read_bytes())
    (tmp_path / "checksum.bin").write_bytes(checked.checksum)
    (tmp_path / "sig.bin").write_bytes(checked.signature)
    (tmp_path / "pub.pem").write_bytes(checked.certificates[0].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pkeyutl = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", tmp_path / "pub.pem",
                              "-in", tmp_path / "checksum.bin", "-sigfile", tmp_path / "sig.bin",
                              "-pkeyopt", "digest:sha1"], capture_output=True, text=True)
    assert pkeyutl.returncode == 0, pkeyutl.stderr
    verified = _cli("verify", "--ca", pki.root_pem, pkg, dmg, "--json")
    assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
    reports = json.loads(verified.stdout)
    assert all(r["notarized"] is True and "stapled" in r["notarization"] for r in reports)
    said = " ".join(_cli("verify", "--ca", pki.root_pem, pkg).stdout.split())  # the result, on stdout
    assert "notarized: yes (a notarization ticket is stapled" in said

    proc = _cli("release", "--allow-example-identity", "--format", "pkg", "--format", "dmg", "--version", "1.0.0",
                "--payload", test_payload,
                "--out", tmp_path / "release", "--enrollment-key", dev_keys.folder / "enrollment.key", *mac, *notarize,
                "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "release" / "manifest.json").read_text())
    for fmt in ("pkg", "dmg"):
        entry = manifest["files"][fmt]
        assert entry["notarized"] is True and entry["notarization"]["status"] == "Accepted"
        assert entry["notarization"]["submission_id"] in standin.submissions

    proc = _cli("stamp", "--release", tmp_path / "release", "--format", "pkg", *enrollment,
                "--out", tmp_path / "group.pkg", *mac, *notarize, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stamped = json.loads(proc.stdout)
    assert stamped["notarization"]["status"] == "Accepted" and stamped["notarization"]["stapled"] is True
    assert apple.notarization_report(tmp_path / "group.pkg")["notarized"] is True
    assert standin.submissions[stamped["notarization"]["submission_id"]].name == "group.pkg"
    proc = _cli("stamp", "--release", tmp_path / "release", "--format", "dmg", *enrollment,
                "--out", tmp_path / "group.dmg", *mac, *notarize, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["notarization"]["status"] == "Accepted"
    verified = _cli("verify", "--ca", pki.root_pem, tmp_path / "group.dmg", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)[0]["notarized"] is True


def test_cli_rejection_exits_13_with_the_log_and_without_credentials_says_not_notarized(
        tmp_path, keys, api_key, standin, pki, test_payload, dev_keys):
    standin.reject = True
    mac = ["--mac-sign-pkcs12", keys["Application"].pkcs12, "--mac-sign-pkcs12", keys["Installer"].pkcs12,
           "--ca", pki.root_pem]
    args = ["build", "--allow-example-identity", "--format", "pkg", "--version", "1.0.0", "--account-id", "a", "--group-id", "g",
            "--token-env", "TOK", "--console-url", "https://console.example.com", "--payload", test_payload,
            "--enrollment-key", dev_keys.folder / "enrollment.key"]
    proc = _cli(*args, "--out", tmp_path / "rejected", *mac, "--notary-url", standin.url,
                env={"BUILDER_NOTARY_ISSUER": ISSUER, "BUILDER_NOTARY_KEY_ID": KEY_ID, "BUILDER_NOTARY_KEY": api_key[1]})
    assert proc.returncode == 13, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())
    assert "Apple says Invalid" in said and "not signed with a valid Developer ID certificate" in said
    assert not (tmp_path / "rejected").exists() or not any((tmp_path / "rejected").glob("*.pkg"))
    plain = _cli(*args, "--out", tmp_path / "plain", *mac, "--json")
    assert plain.returncode == 0, plain.stderr[-3000:]
    note = json.loads(plain.stdout)["installers"][0]["details"]["notarization"]
    assert note["notarized"] is False and note["reason"] == "no App Store Connect credentials"
    assert "not notarized" in plain.stderr
