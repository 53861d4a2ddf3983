"""The macOS .pkg, read back with readers this project did not write.

7z and bsdtar list and extract the product archive, pyapplebom reads the Bom, GNU cpio the
Payload, apple-platform-py the PackageInfo and Distribution, openssl checks the RSA signature
over the TOC checksum and the CMS x-signature. The postinstall is taken out of a built pkg
with bsdtar + gzip + cpio and run with dash and bash in a temporary root (the payload
extracted there by cpio, as Installer would), launchctl absent from PATH.

The enrollment token never appears in output: configs are compared by their SHA-256 only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import stat
import string
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pyapplebom
import pytest

from builder.config import load_product
from builder.enrollment import Enrollment, Secret
from builder.trust import SignedEnrollment, Trust, describe
from tests.support import signed as oracle
from tests.support.enrollkeys import KEY, new_key, trust_of
from builder.errors import FormatError, PayloadError, UsageError
from builder.formats import macos_postinstall, pkg_archive
from builder.formats.base import BuildRequest
from builder.signing.signers import AppleKey, Signers
from builder.formats.pkg import PkgFormat, sign_pkg

REPO = Path(__file__).resolve().parents[2]
MAKE_PAYLOAD = REPO / "payload" / "testagent-macos" / "make_payload.py"
EPOCH = 1767225600
PRODUCT = load_product()
INSTALL_DIR = PRODUCT.mac_install_folder
CONFIG = f"{INSTALL_DIR}/enrollment.json"
PLIST = f"/Library/LaunchDaemons/{PRODUCT.launchd_label}.plist"
NO_LAUNCHCTL_PATH = "/usr/bin:/bin"
TOKEN_CHARS = string.ascii_letters + string.digits + "-_+/.=~"


def make_token(length: int, seed: int, prefix: str = "") -> Secret:
    rng = random.Random(seed)
    return Secret(prefix + "".join(rng.choice(TOKEN_CHARS) for _ in range(length - len(prefix))))


# Every character the rules allow that a shell or printf would treat specially.
HOSTILE = [
    Enrollment(
        account_id="acct:7f3a@example.com",
        group_id="grp-1_2.3:x@y",
        console_url="https://console.example.com/e?a=1&b='x'$y;z(!)*%20&c=$(id)",
        token=make_token(4096, 1, prefix="~-n"),
    ),
    Enrollment(
        account_id="0",
        group_id="g.-_:@",
        console_url="https://h.example:8443/a/b;c=d,e+f*g!h$i&j'k'(l)~m?x=%s%n%%&y=$HOME#frag'",
        token=make_token(64, 2, prefix="=+/"),
    ),
    Enrollment(
        account_id="a" * 128,
        group_id="x",
        console_url="https://c.example/'''$$$(((!!!",
        token=Secret("-n-e--~.=+/"),  # printf and echo options, tilde
    ),
]


# The release's pins: the suite's enrollment key and the hosts of the enrollments above.
TRUST = trust_of(KEY, hosts=("console.example.com", "h.example:8443", "c.example"))
SIGNED = [KEY.sign(e, TRUST, issued_at=EPOCH) for e in HOSTILE]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_of(signed) -> bytes:
    """enrollment.json as the postinstall (and the agents) write it."""
    return json.dumps({"enrollment": signed.jws.reveal()}).encode()


# --------------------------------------------------------------------------------------------
# Fixtures and helpers (test_dmg.py imports them)


def make_mac_payload(root: Path, *, extra_bytes: int = 0) -> Path:
    """payload/<root>/macos with the TEST Agent.app, made by the script `make payload-test` runs."""
    subprocess.run([sys.executable, str(MAKE_PAYLOAD), "--out", str(root / "macos")], check=True, capture_output=True)
    if extra_bytes:
        data = random.Random(30).randbytes(extra_bytes)
        (root / "macos" / "Agent.app" / "Contents" / "Resources" / "data.bin").write_bytes(data)
    return root


@pytest.fixture(scope="session")
def mac_payload(tmp_path_factory) -> Path:
    return make_mac_payload(tmp_path_factory.mktemp("mac-payload"))


@pytest.fixture(scope="session")
def mac_signers(dev_keys) -> Signers:
    password = Secret("development")
    return Signers(
        apple_application=AppleKey(pkcs12=dev_keys.mac_app_pkcs12, password=password),
        apple_installer=AppleKey(pkcs12=dev_keys.mac_installer_pkcs12, password=password),
        verify_ca=dev_keys.ca_cert,
    )


def request(payload: Path, work: Path, enrollment: SignedEnrollment | None, signers: Signers, product=PRODUCT,
            epoch: int = EPOCH, trust: Trust = TRUST) -> BuildRequest:
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    return BuildRequest(product=product, version="1.2.3", payload=payload, enrollment=enrollment, trust=trust,
                        work=work, source_date_epoch=epoch, signers=signers)


def build_pkg(payload, work, enrollment, signers, **kw) -> Path:
    built = PkgFormat().build(request(payload, work, enrollment, signers, **kw))
    return built.path


@pytest.fixture(scope="session")
def signed_pkg(mac_payload, mac_signers, tmp_path_factory) -> Path:
    return build_pkg(mac_payload, tmp_path_factory.mktemp("pkg-baked"), SIGNED[0], mac_signers)


@pytest.fixture(scope="session")
def release_pkg(mac_payload, mac_signers, tmp_path_factory) -> Path:
    return build_pkg(mac_payload, tmp_path_factory.mktemp("pkg-release"), None, mac_signers)


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, **kw)


def bsdtar_extract(pkg: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run(["bsdtar", "-xf", pkg, "-C", dest])
    return dest


def gunzip_cpio(archive: Path, dest: Path) -> Path:
    """gzip -dc | cpio -idm: GNU cpio extracts, keeping mtimes (and owners, as root)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sh", "-c", 'gzip -dc "$1" | cpio -idm --quiet --no-absolute-filenames', "sh", str(archive)],
                   cwd=dest, check=True, capture_output=True)
    return dest


def install_like_installer(pkg: Path, root: Path, work: Path) -> Path:
    """The Payload extracted into `root` and the postinstall taken out of Scripts, both with
    bsdtar + gzip + cpio; returns the postinstall's path."""
    members = bsdtar_extract(pkg, work / "members")
    gunzip_cpio(members / "agent.pkg" / "Payload", root)
    scripts = gunzip_cpio(members / "agent.pkg" / "Scripts", work / "scripts")
    return scripts / "postinstall"


def run_postinstall(script: Path, root: Path, pkg_path: Path, *, shell: str = "sh", path: str = NO_LAUNCHCTL_PATH,
                    check: bool = True) -> subprocess.CompletedProcess:
    assert shutil.which("launchctl", path=path) is None or path != NO_LAUNCHCTL_PATH
    env = {"PATH": path, "BUILDER_INSTALL_ROOT": str(root), "LC_ALL": "C"}
    proc = subprocess.run([shell, str(script), str(pkg_path), "/", "/"], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def xar_parts(data: bytes) -> dict:
    """The TOC checksum, signatures and certificate, read with struct/zlib/ElementTree only."""
    magic, header_size, _version, toc_length, _toc_plain, algorithm = struct.unpack(">4sHHQQI", data[:28])
    assert magic == b"xar!" and algorithm == 1  # SHA-1
    toc_compressed = data[header_size:header_size + toc_length]
    heap = header_size + toc_length
    toc = ET.fromstring(zlib.decompress(toc_compressed)).find("toc")

    def region(element):
        offset, size = int(element.findtext("offset")), int(element.findtext("size"))
        return heap + offset, heap + offset + size

    start, end = region(toc.find("checksum"))
    parts = {"checksum": data[start:end], "computed": hashlib.sha1(toc_compressed).digest(), "toc": toc}
    signature = toc.find("signature")
    if signature is not None:
        start, end = region(signature)
        parts["signature"] = data[start:end]
        certs = [e.text for e in signature.iter() if e.tag.endswith("X509Certificate")]
        parts["certificates"] = [base64.b64decode("".join(c.split())) for c in certs]
        parts["certificate"] = parts["certificates"][0]
        x_start, x_end = region(toc.find("x-signature"))
        parts["cms"] = data[x_start:x_end]
        parts["cms_region"] = (x_start, x_end)
    return parts


# --------------------------------------------------------------------------------------------
# Structure


def test_7z_and_bsdtar_list_a_product_archive(signed_pkg):
    listing = run(["7z", "l", signed_pkg]).stdout.decode()
    for member in ("Distribution", "agent.pkg/Bom", "agent.pkg/Payload", "agent.pkg/Scripts", "agent.pkg/PackageInfo"):
        assert member in listing
    names = run(["bsdtar", "-tf", signed_pkg]).stdout.decode().split()
    assert set(names) >= {"Distribution", "agent.pkg", "agent.pkg/Bom", "agent.pkg/Payload", "agent.pkg/Scripts",
                          "agent.pkg/PackageInfo"}


def test_payload_owned_by_root_wheel_with_fixed_mtimes(signed_pkg, tmp_path):
    members = bsdtar_extract(signed_pkg, tmp_path / "m")
    payload = members / "agent.pkg" / "Payload"
    assert payload.read_bytes()[:2] == b"\x1f\x8b"
    listing = subprocess.run(["sh", "-c", 'gzip -dc "$1" | cpio -itvn --quiet', "sh", str(payload)],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(listing) > 5
    for line in listing:
        fields = line.split()
        assert (fields[2], fields[3]) == ("0", "0"), line  # numeric uid gid
    # bsdtar reads the gzip'd cpio too, and sets folder times after filling them (GNU cpio
    # leaves a folder with the time its last file was created).
    root = tmp_path / "root"
    root.mkdir()
    run(["bsdtar", "-xpf", payload, "-C", root])
    paths = [p for p in root.rglob("*")]
    assert all(p.lstat().st_mtime == EPOCH for p in paths)
    assert all((p.lstat().st_uid, p.lstat().st_gid) == (0, 0) for p in paths) or os.geteuid() != 0
    agent = under(root, INSTALL_DIR) / "Agent.app" / "Contents" / "MacOS" / "agent"
    plist_file = under(root, PLIST)
    assert stat.S_IMODE(agent.stat().st_mode) == 0o755
    assert stat.S_IMODE(plist_file.stat().st_mode) == 0o644
    assert not under(root, CONFIG).exists()  # written by postinstall, never in the payload

    import plistlib

    daemon = plistlib.loads(plist_file.read_bytes())
    assert daemon == {
        "Label": PRODUCT.launchd_label,
        "ProgramArguments": [f"{INSTALL_DIR}/Agent.app/Contents/MacOS/agent", "run", "--config", CONFIG],
        "RunAtLoad": True,
        "KeepAlive": True,
    }


def test_bom_describes_the_payload(signed_pkg, tmp_path):
    members = bsdtar_extract(signed_pkg, tmp_path / "m")
    parsed = pyapplebom.parse_bom_file(str(members / "agent.pkg" / "Bom"))
    assert parsed["parse_errors"] is None
    bom = {p["path"]: p for p in parsed["paths"]}
    root = gunzip_cpio(members / "agent.pkg" / "Payload", tmp_path / "root")
    on_disk = {"." : root, **{"./" + p.relative_to(root).as_posix(): p for p in root.rglob("*")}}
    assert set(bom) == set(on_disk)
    for name, path in on_disk.items():
        record = bom[name]
        assert (record["user_id"], record["group_id"], record["mtime"]) == (0, 0, EPOCH), name
        mode = stat.filemode(path.lstat().st_mode)
        assert record["symbolic_mode"] == mode, name
        if path.is_file():
            assert record["size"] == path.stat().st_size, name


def test_package_info_and_distribution(signed_pkg, tmp_path):
    import apple_platform as ap

    info = ap.packaging.pkg_info(str(signed_pkg))
    component = info["components"][0]["package_info"]
    assert component["identifier"] == PRODUCT.pkg_identifier and component["version"] == "1.2.3"
    assert component["install-location"] == "/" and component["auth"] == "root"
    assert component["scripts"]["$value"][0]["postinstall"]["file"] == "./postinstall"
    members = bsdtar_extract(signed_pkg, tmp_path / "m")
    count = subprocess.run(["sh", "-c", 'gzip -dc "$1" | cpio -it --quiet | wc -l', "sh",
                            str(members / "agent.pkg" / "Payload")], check=True, capture_output=True, text=True)
    assert component["payload"]["numberOfFiles"] == int(count.stdout)
    dist = ET.fromstring((members / "Distribution").read_bytes())
    assert dist.find("domains").attrib == {"enable_anywhere": "false", "enable_currentUserHome": "false",
                                           "enable_localSystem": "true"}
    assert [r.text for r in dist.findall("pkg-ref") if r.text] == ["#agent.pkg"]
    assert dist.find("title").text == PRODUCT.name


# --------------------------------------------------------------------------------------------
# Signatures


def test_openssl_checks_the_rsa_signature_and_the_cms(signed_pkg, dev_keys, tmp_path):
    parts = xar_parts(signed_pkg.read_bytes())
    assert parts["checksum"] == parts["computed"]
    (tmp_path / "checksum.bin").write_bytes(parts["checksum"])
    (tmp_path / "sig.bin").write_bytes(parts["signature"])
    (tmp_path / "cert.der").write_bytes(parts["certificate"])
    run(["openssl", "x509", "-inform", "DER", "-in", tmp_path / "cert.der", "-out", tmp_path / "cert.pem"])
    run(["openssl", "x509", "-in", tmp_path / "cert.pem", "-pubkey", "-noout", "-out", tmp_path / "pub.pem"])
    subject = run(["openssl", "x509", "-in", tmp_path / "cert.pem", "-noout", "-subject"]).stdout.decode()
    assert "Developer ID Installer" in subject
    # productsign's <signature>: PKCS#1 v1.5 with a SHA-1 DigestInfo of the 20-byte checksum.
    pkeyutl = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", tmp_path / "pub.pem", "-sigfile",
               tmp_path / "sig.bin", "-pkeyopt", "digest:sha1", "-in"]
    ok = run([*pkeyutl, tmp_path / "checksum.bin"])
    assert b"Signature Verified Successfully" in ok.stdout
    (tmp_path / "other.bin").write_bytes(bytes(20))
    bad = subprocess.run([str(a) for a in [*pkeyutl, tmp_path / "other.bin"]], capture_output=True)
    assert bad.returncode != 0
    # The certificates follow as Apple orders them: leaf, Developer ID CA, root. OpenSSL checks
    # the chain only when told to pass over Apple's critical marker extensions.
    (tmp_path / "intermediate.der").write_bytes(parts["certificates"][1])
    run(["openssl", "x509", "-inform", "DER", "-in", tmp_path / "intermediate.der", "-out", tmp_path / "intermediate.pem"])
    chain = ["openssl", "verify", "-CAfile", dev_keys.ca_cert, "-untrusted", tmp_path / "intermediate.pem"]
    run([*chain, "-ignore_critical", tmp_path / "cert.pem"])
    strict = subprocess.run([str(a) for a in [*chain, tmp_path / "cert.pem"]], capture_output=True)
    assert strict.returncode != 0 and b"unhandled critical extension" in strict.stdout + strict.stderr
    (tmp_path / "cms.der").write_bytes(parts["cms"])
    cms = run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", tmp_path / "cms.der", "-content",
               tmp_path / "checksum.bin", "-CAfile", dev_keys.ca_cert, "-purpose", "any", "-ignore_critical",
               "-out", os.devnull])
    assert b"Verification successful" in cms.stderr


def test_agent_code_is_signed_before_it_goes_into_the_payload(signed_pkg, dev_keys, tmp_path):
    from builder.signing import apple

    root = gunzip_cpio(bsdtar_extract(signed_pkg, tmp_path / "m") / "agent.pkg" / "Payload", tmp_path / "root")
    app = under(root, INSTALL_DIR) / "Agent.app"
    assert (app / "Contents" / "_CodeSignature" / "CodeResources").is_file()
    report = apple.verify_code(app, dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["signer"].startswith("Developer ID Application")


def test_verify_and_inspect_report_the_masked_enrollment(signed_pkg, dev_keys):
    report = PkgFormat().verify(signed_pkg, dev_keys.ca_cert)
    text = json.dumps(report)
    leaked = HOSTILE[0].token.reveal() in text or SIGNED[0].jws.reveal() in text  # never `assert token not in`
    assert not leaked
    assert report["ok"], report["detail"]
    assert report["signature"]["ok"] and report["signature"]["signer"].startswith("Developer ID Installer")
    assert report["enrollment"] == {"state": "valid", **SIGNED[0].public()}
    assert report["enrollment_source"] == "baked into the postinstall"
    assert report["pins"] == TRUST.as_dict()
    inspected = PkgFormat().inspect(signed_pkg)
    assert inspected["signature"] is None and inspected["enrollment"] == report["enrollment"]


def test_verify_rejects_a_tampered_payload(signed_pkg, dev_keys, tmp_path):
    data = bytearray(signed_pkg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the Payload
    bad = tmp_path / "tampered.pkg"
    bad.write_bytes(bytes(data))
    report = PkgFormat().verify(bad, dev_keys.ca_cert)
    assert not report["ok"]


def test_verify_with_another_ca_fails(signed_pkg, tmp_path):
    from builder.signing import devca

    other = devca.create(tmp_path / "other-ca")
    report = PkgFormat().verify(signed_pkg, other.ca_cert)
    assert not report["ok"]


# --------------------------------------------------------------------------------------------
# The postinstall, run from the built pkg


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_postinstall_writes_the_baked_enrollment_exactly(mac_payload, tmp_path, shell, index):
    enrollment = HOSTILE[index]
    pkg = build_pkg(mac_payload, tmp_path / "work", SIGNED[index], Signers(unsigned=True))
    root = tmp_path / "root"
    script = install_like_installer(pkg, root, tmp_path / "x")
    pkg_copy = root / "Volumes" / "Example Agent" / "Example Remote Access Agent.pkg"
    pkg_copy.parent.mkdir(parents=True)
    shutil.copyfile(pkg, pkg_copy)
    proc = run_postinstall(script, root, pkg_copy, shell=shell)
    leaked = enrollment.token.reveal() in proc.stdout + proc.stderr
    assert not leaked
    config = under(root, CONFIG)
    got, want = sha(config.read_bytes()), sha(config_of(SIGNED[index]))
    assert got == want
    assert under(root, f"{INSTALL_DIR}/trust.json").read_bytes() == TRUST.to_json_bytes()
    st = config.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert [p.name for p in config.parent.iterdir() if p.name.startswith(".enrollment")] == []  # no temp left


def test_baked_enrollment_wins_over_a_sidecar(signed_pkg, tmp_path):
    root = tmp_path / "root"
    script = install_like_installer(signed_pkg, root, tmp_path / "x")
    pkg_copy = root / "dmg" / "agent.pkg"
    pkg_copy.parent.mkdir()
    shutil.copyfile(signed_pkg, pkg_copy)
    (pkg_copy.parent / macos_postinstall.sidecar_name(PRODUCT)).write_bytes(SIGNED[1].jws.reveal().encode())
    run_postinstall(script, root, pkg_copy)
    got, want = sha(under(root, CONFIG).read_bytes()), sha(config_of(SIGNED[0]))
    assert got == want


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_release_postinstall_takes_a_genuine_sidecar(release_pkg, tmp_path, shell):
    root = tmp_path / "root"
    script = install_like_installer(release_pkg, root, tmp_path / "x")
    folder = root / "Volumes" / "Example Remote Access Agent"
    folder.mkdir(parents=True)
    pkg_copy = folder / "Example Remote Access Agent.pkg"
    shutil.copyfile(release_pkg, pkg_copy)
    (folder / macos_postinstall.sidecar_name(PRODUCT)).write_bytes(SIGNED[0].jws.reveal().encode())
    run_postinstall(script, root, pkg_copy, shell=shell)
    config = under(root, CONFIG)
    got, want = sha(config.read_bytes()), sha(config_of(SIGNED[0]))
    assert got == want
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_release_postinstall_without_sidecar(release_pkg, tmp_path):
    root = tmp_path / "root"
    script = install_like_installer(release_pkg, root, tmp_path / "x")
    pkg_copy = root / "Downloads" / "agent.pkg"
    pkg_copy.parent.mkdir()
    shutil.copyfile(release_pkg, pkg_copy)
    # A first install with no enrollment anywhere fails, naming the sidecar, and writes nothing.
    proc = run_postinstall(script, root, pkg_copy, check=False)
    assert proc.returncode == 1 and macos_postinstall.sidecar_name(PRODUCT) in proc.stderr
    assert not under(root, CONFIG).exists()
    # An upgrade keeps the config an earlier install wrote.
    earlier = config_of(SIGNED[1])
    under(root, CONFIG).write_bytes(earlier)
    run_postinstall(script, root, pkg_copy)
    assert sha(under(root, CONFIG).read_bytes()) == sha(earlier)


def test_postinstall_leaves_launchctl_alone_in_an_install_root(signed_pkg, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "launchctl-calls"
    (fake / "launchctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake / "launchctl").chmod(0o755)
    root = tmp_path / "root"
    script = install_like_installer(signed_pkg, root, tmp_path / "x")
    proc = run_postinstall(script, root, signed_pkg, path=f"{fake}:{NO_LAUNCHCTL_PATH}")
    assert not calls.exists()
    assert "launchctl not used" in proc.stderr
    # The same script, as Installer runs it on the boot volume, does call launchctl; checked
    # on its text only, since it would write to this machine's /Library.
    text = script.read_text()
    assert 'launchctl bootstrap system "$plist"' in text and 'launchctl bootout "system/$label"' in text


# --------------------------------------------------------------------------------------------
# The sidecar is not signed: the postinstall verifies it before it writes anything


def release_install(release_pkg: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(postinstall, install root, the pkg's copy on a "disk image" folder where a sidecar goes)."""
    root = tmp_path / "root"
    script = install_like_installer(release_pkg, root, tmp_path / "x")
    folder = root / "Volumes" / "Agent"
    folder.mkdir(parents=True)
    pkg_copy = folder / "agent.pkg"
    shutil.copyfile(release_pkg, pkg_copy)
    return script, root, pkg_copy


def attacks() -> dict[str, bytes]:
    """Sidecars an attacker could put beside the release's signed pkg."""
    genuine = SIGNED[0].jws.reveal()
    pinned_key = oracle.new_key()  # stands in for nothing: an attacker's own key
    return {
        "unpinned-key": KEY_OF_ATTACKER.sign(HOSTILE[0], trust_of(KEY_OF_ATTACKER, hosts=("console.example.com",)),
                                             issued_at=EPOCH).jws.reveal().encode(),
        "edited-payload": oracle.tamper(genuine, 1, 40).encode(),
        "edited-signature": oracle.tamper(genuine, 2, 10).encode(),
        "edited-header": oracle.tamper(genuine, 0, 12).encode(),
        "trailing-newline": (genuine + "\n").encode(),
        "two-enrollments": (genuine + "\n" + SIGNED[1].jws.reveal()).encode(),
        "plain-json": HOSTILE[0].to_json_bytes(),
        "expired": KEY.sign(HOSTILE[0], TRUST, issued_at=EPOCH, expires_at=EPOCH + 60).jws.reveal().encode(),
        "host-not-pinned": KEY.sign(HOSTILE[0].__class__(account_id="a", group_id="g", token=HOSTILE[0].token,
                                                        console_url="https://console.example.com:8443/"),
                                    trust_of(KEY, hosts=("console.example.com:8443",)), issued_at=EPOCH).jws.reveal().encode(),
        "kid-of-pinned-key-signed-by-another": oracle.sign(pinned_key, key_id=KEY.kid, issued_at=EPOCH).encode(),
        "empty": b"",
    }


KEY_OF_ATTACKER = new_key()


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_postinstall_refuses_every_forged_sidecar_and_writes_nothing(release_pkg, tmp_path, shell):
    for name, sidecar in attacks().items():
        script, root, pkg_copy = release_install(release_pkg, tmp_path / name)
        (pkg_copy.parent / macos_postinstall.sidecar_name(PRODUCT)).write_bytes(sidecar)
        proc = run_postinstall(script, root, pkg_copy, shell=shell, check=False)
        leaked = HOSTILE[0].token.reveal() in proc.stdout + proc.stderr
        assert not leaked, name
        assert proc.returncode == 1 and "refused" in proc.stderr, f"{name}: {proc.stderr[-500:]}"
        written = sorted(p.name for p in under(root, INSTALL_DIR).iterdir() if p.name.endswith((".json",)) or p.name.startswith("."))
        assert written == [], f"{name}: wrote {written}"


def test_a_forged_sidecar_over_an_install_keeps_the_old_enrollment(release_pkg, tmp_path):
    script, root, pkg_copy = release_install(release_pkg, tmp_path)
    sidecar = pkg_copy.parent / macos_postinstall.sidecar_name(PRODUCT)
    sidecar.write_bytes(SIGNED[1].jws.reveal().encode())
    run_postinstall(script, root, pkg_copy)
    before = under(root, CONFIG).read_bytes()
    sidecar.write_bytes(attacks()["unpinned-key"])
    proc = run_postinstall(script, root, pkg_copy, check=False)
    assert proc.returncode == 1
    assert under(root, CONFIG).read_bytes() == before


def test_builder_verify_and_the_postinstall_agree_on_every_sidecar(release_pkg, tmp_path):
    """`builder verify` of a dmg shows what the postinstall will do with its sidecar."""
    cases = {**attacks(), "genuine-0": SIGNED[0].jws.reveal().encode(), "genuine-2": SIGNED[2].jws.reveal().encode()}
    for name, sidecar in cases.items():
        script, root, pkg_copy = release_install(release_pkg, tmp_path / name)
        (pkg_copy.parent / macos_postinstall.sidecar_name(PRODUCT)).write_bytes(sidecar)
        installed = run_postinstall(script, root, pkg_copy, check=False).returncode == 0
        _, problem = describe(sidecar.decode("ascii", "replace"), TRUST, int(time.time()))
        assert installed == (problem is None), f"{name}: postinstall {'accepted' if installed else 'refused'}, verify: {problem}"
        assert installed == name.startswith("genuine"), name


def test_the_pins_are_in_the_signed_package(release_pkg, dev_keys, tmp_path):
    contents = pkg_archive.read_pkg(release_pkg, "release.pkg")
    assert contents.trust == TRUST
    # Editing the pins in the Scripts member breaks the package's signature.
    data = release_pkg.read_bytes()
    members = bsdtar_extract(release_pkg, tmp_path / "m")
    scripts = (members / "agent.pkg" / "Scripts").read_bytes()
    at = data.find(scripts)
    assert at > 0
    forged = bytearray(data)
    forged[at + len(scripts) // 2] ^= 0x01
    bad = tmp_path / "forged.pkg"
    bad.write_bytes(bytes(forged))
    assert not PkgFormat().verify(bad, dev_keys.ca_cert)["ok"]


# --------------------------------------------------------------------------------------------
# Re-baking a release for the stamp stage


def test_rebake_equals_a_baked_build(mac_payload, release_pkg, mac_signers, dev_keys, tmp_path):
    unsigned_release = build_pkg(mac_payload, tmp_path / "release", None, Signers(unsigned=True))
    baked = build_pkg(mac_payload, tmp_path / "baked", SIGNED[1], Signers(unsigned=True))
    started = time.perf_counter()
    from_unsigned = pkg_archive.rebake(unsigned_release, SIGNED[1], PRODUCT, EPOCH)
    seconds = time.perf_counter() - started
    print(f"rebake: {seconds:.3f}s")
    assert sha(from_unsigned) == sha(baked.read_bytes())
    # The signed release's payload carries signed code, so compare with a signed-payload build:
    # same members but Scripts, and a signature away from a finished group pkg.
    from_signed = pkg_archive.rebake(release_pkg.read_bytes(), SIGNED[1], PRODUCT, EPOCH)
    group = tmp_path / "group.unsigned.pkg"
    group.write_bytes(from_signed)
    signed = tmp_path / "group.pkg"
    sign_pkg(mac_signers.apple_installer, group, signed, EPOCH)
    report = PkgFormat().verify(signed, dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["enrollment"] == {"state": "valid", **SIGNED[1].public()}
    release_members = bsdtar_extract(release_pkg, tmp_path / "r")
    group_members = bsdtar_extract(signed, tmp_path / "g")
    for member in ("Distribution", "agent.pkg/Bom", "agent.pkg/Payload", "agent.pkg/PackageInfo"):
        assert (release_members / member).read_bytes() == (group_members / member).read_bytes(), member


def test_rebake_refuses_another_products_pkg(release_pkg):
    other = load_product(overrides={"pkg_identifier": "org.other.agent.pkg"})
    with pytest.raises(FormatError, match="identifier"):
        pkg_archive.rebake(release_pkg, SIGNED[0], other, EPOCH)


# --------------------------------------------------------------------------------------------
# Reproducibility


def test_unsigned_builds_are_byte_identical(mac_payload, tmp_path):
    a = build_pkg(mac_payload, tmp_path / "a", SIGNED[0], Signers(unsigned=True))
    b = build_pkg(mac_payload, tmp_path / "b", SIGNED[0], Signers(unsigned=True))
    assert sha(a.read_bytes()) == sha(b.read_bytes())


# --------------------------------------------------------------------------------------------
# Errors


def test_truncated_and_foreign_files_are_format_errors(signed_pkg, tmp_path):
    cut = tmp_path / "cut.pkg"
    cut.write_bytes(signed_pkg.read_bytes()[:3000])
    with pytest.raises(FormatError) as info:
        PkgFormat().inspect(cut)
    assert str(cut) in str(info.value)
    foreign = tmp_path / "foreign.pkg"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(FormatError) as info:
        PkgFormat().inspect(foreign)
    assert str(foreign) in str(info.value)


def test_app_without_info_plist_is_a_payload_error(tmp_path):
    payload = make_mac_payload(tmp_path / "payload")
    info = payload / "macos" / "Agent.app" / "Contents" / "Info.plist"
    info.unlink()
    with pytest.raises(PayloadError) as err:
        build_pkg(payload, tmp_path / "work", None, Signers(unsigned=True))
    assert str(info) in str(err.value)


def test_plain_agent_executable_is_accepted(tmp_path):
    payload = tmp_path / "payload"
    (payload / "macos").mkdir(parents=True)
    agent = payload / "macos" / "agent"
    agent.write_text("#!/bin/sh\nexit 0\n")
    agent.chmod(0o755)
    pkg = build_pkg(payload, tmp_path / "work", SIGNED[2], Signers(unsigned=True))
    report = PkgFormat().inspect(pkg)
    assert report["ok"], report["detail"]
    root = gunzip_cpio(bsdtar_extract(pkg, tmp_path / "m") / "agent.pkg" / "Payload", tmp_path / "root")
    import plistlib

    args = plistlib.loads(under(root, PLIST).read_bytes())["ProgramArguments"]
    assert args[0] == f"{INSTALL_DIR}/agent"


def test_signed_build_needs_both_identities(mac_payload, mac_signers, tmp_path):
    no_installer = Signers(apple_application=mac_signers.apple_application)
    with pytest.raises(UsageError, match="Installer"):
        PkgFormat().build(request(mac_payload, tmp_path / "a", None, no_installer))
    no_application = Signers(apple_installer=mac_signers.apple_installer)
    with pytest.raises(UsageError, match="Application"):
        PkgFormat().build(request(mac_payload, tmp_path / "b", None, no_application))


def test_signed_builds_are_byte_identical(mac_payload, mac_signers, dev_keys, tmp_path):
    """Same inputs and SOURCE_DATE_EPOCH, same signed pkg: the CMS signing time is the epoch
    (clamped into the certificate's validity), not the wall clock."""
    a = build_pkg(mac_payload, tmp_path / "a", SIGNED[0], mac_signers)
    time.sleep(1.1)  # a different second, so a wall-clock time anywhere would show
    b = build_pkg(mac_payload, tmp_path / "b", SIGNED[0], mac_signers)
    assert sha(a.read_bytes()) == sha(b.read_bytes())
    report = PkgFormat().verify(a, dev_keys.ca_cert)
    assert report["ok"] and report["signature"]["trusted"] is True, report["detail"]


def test_verify_says_not_notarized_without_a_stapled_ticket(signed_pkg, dev_keys):
    """No App Store Connect credentials here: the build is signed but not notarized, and the
    verify output says so (it looks for a stapled ticket with apple-platform's reader)."""
    report = PkgFormat().verify(signed_pkg, dev_keys.ca_cert)
    assert report["ok"] and report["notarized"] is False
    assert "no stapled ticket" in report["notarization"]
