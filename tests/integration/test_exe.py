"""The EXE with the real tools: makensis, osslsigncode, 7z, and installs under wine.

Nothing here prints a token: values are compared through `same()`, which names a differing
field by its length and hash only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.binfmt import nsis
from builder.config import load_product
from builder.enrollment import Enrollment, Secret
from builder.errors import FormatError, SigningError
from builder.formats import exe
from builder.formats.base import BuildRequest
from builder.signing.signers import Signers
from builder.errors import UsageError
from builder.signing.authenticode import SigningKey
from builder.trust import TRUST_FILE
from tests.support import enrollkeys
from tests.support.wine import parse_reg_export, parse_reg_export_all

EPOCH = 1767225600
PRODUCT = load_product()
# Every character a console URL may carry that means something to NSIS, sc.exe, the shell or
# JSON: `$INSTDIR` and `$%PATH%` would be expanded by a careless script (the second one by
# makensis itself, from the build machine's environment), `$$` must stay two characters.
HOSTILE_URL = "https://console.example.com:8443/p$INSTDIR/a%20b?x=1&y='2';(z)!*+,=$%PATH%$$R0#top"


def token() -> str:
    """4096 bytes of a fresh random token with every allowed character."""
    return (secrets.token_urlsafe(3100)[:4091] + "+/.=~")


ENROLL_A = Enrollment(account_id="acct:1@corp.example-x_y", group_id="grp.A:@-_1", token=Secret(token()), console_url=HOSTILE_URL)
ENROLL_B = Enrollment(account_id="acct:1@corp.example-x_y", group_id="grp.B", token=Secret(token()),
                      console_url="https://console.example.com/b?t=1&u=$USER")
# The release's pins: the suite's enrollment key, both console hosts the enrollments name.
TRUST = enrollkeys.trust_of(hosts=("console.example.com", "console.example.com:8443"))
SIGNED_A = enrollkeys.signed(ENROLL_A, trust=TRUST)
SIGNED_B = enrollkeys.signed(ENROLL_B, trust=TRUST)


def fingerprint(value) -> str:
    text = value.reveal() if isinstance(value, Secret) else value
    data = text if isinstance(text, bytes) else str(text).encode()
    return f"<{len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:12]}>"


def same(actual: dict | bytes | None, expected: dict | bytes, what: str) -> None:
    """assert actual == expected without ever printing a value."""
    __tracebackhide__ = True  # pytest would print this frame's arguments: the token among them
    if actual == expected:
        return
    if not isinstance(expected, dict) or not isinstance(actual, dict):
        raise AssertionError(f"{what}: got {fingerprint(actual or b'')}, expected {fingerprint(expected)}")
    diff = {k: (fingerprint(actual.get(k, "")), fingerprint(v)) for k, v in expected.items() if actual.get(k) != v}
    extra = sorted(set(actual) - set(expected))
    raise AssertionError(f"{what}: differing fields (got, expected) {diff}; unexpected fields {extra}")


def build(tmp: Path, payload: Path, enrollment, signers: Signers, name: str = "setup.exe"):
    work = tmp / f"work-{name}"
    work.mkdir(mode=0o700)
    request = BuildRequest(product=PRODUCT, version="1.2.3", payload=payload, enrollment=enrollment, trust=TRUST,
                           work=work, source_date_epoch=EPOCH, signers=signers)
    built = exe.ExeFormat().build(request)
    out = tmp / name
    shutil.copyfile(built.path, out)
    shutil.rmtree(work)
    return out, built


def pem_signers(keys) -> Signers:
    return Signers(authenticode=SigningKey(cert=keys.sign_cert, key=keys.sign_key), verify_ca=keys.ca_cert)


def p12_signers(keys, password: str = "development") -> Signers:
    # A password-protected key: the uninstaller is signed inside makensis with it.
    return Signers(authenticode=SigningKey(pkcs12=keys.sign_pkcs12, password=Secret(password)), verify_ca=keys.ca_cert)


@pytest.fixture(scope="module")
def built_a(tmp_path_factory, dev_keys, test_payload):
    tmp = tmp_path_factory.mktemp("exe-a")
    return build(tmp, test_payload, SIGNED_A, p12_signers(dev_keys))


@pytest.fixture(scope="module")
def built_b(tmp_path_factory, dev_keys, test_payload):
    tmp = tmp_path_factory.mktemp("exe-b")
    return build(tmp, test_payload, SIGNED_B, pem_signers(dev_keys))


def osslsigncode_verify(path: Path, ca: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["osslsigncode", "verify", "-CAfile", str(ca), "-in", str(path)], capture_output=True, text=True)


def extract_with_7z(installer: Path, member: str, dest: Path) -> Path:
    proc = subprocess.run(["7z", "e", "-y", f"-o{dest}", str(installer), member], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    return dest / member


# --- without wine ---------------------------------------------------------------------------

def test_installer_and_uninstaller_are_signed(built_a, dev_keys, tmp_path):
    setup, built = built_a
    assert built.details["uninstaller_signed"] is True
    assert osslsigncode_verify(setup, dev_keys.ca_cert).returncode == 0, "osslsigncode verify failed on the installer"
    uninstaller = extract_with_7z(setup, exe.UNINSTALLER_NAME, tmp_path)
    proc = osslsigncode_verify(uninstaller, dev_keys.ca_cert)
    assert proc.returncode == 0, f"osslsigncode verify failed on the uninstaller: {proc.stdout[-500:]}"
    # And the same uninstaller is what ExeFormat finds and checks.
    report = exe.ExeFormat().verify(setup, dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["uninstaller"]["signature"]["ok"]
    assert report["uninstaller"]["size"] == uninstaller.stat().st_size
    assert "DEVELOPMENT" in report["signature"]["signer"]


def test_verify_reads_back_the_baked_enrollment(built_a, dev_keys):
    report = exe.ExeFormat().verify(built_a[0], dev_keys.ca_cert)
    same(report["enrollment"], {"state": "valid", **SIGNED_A.public()}, "enrollment read back")
    assert report["enrollment_source"] == "slot"
    leaked = ENROLL_A.token.reveal() in json.dumps(report)
    assert not leaked, "verify's report shows the token"
    assert exe.ExeFormat().inspect(built_a[0])["enrollment"] == report["enrollment"]
    assert (report["product"], report["version"], report["exe"]["manufacturer"]) == (PRODUCT.name, "1.2.3", PRODUCT.vendor)


def test_payload_is_installed_as_given(built_a, test_payload, tmp_path):
    agent = extract_with_7z(built_a[0], PRODUCT.agent_exe, tmp_path)
    assert agent.read_bytes() == (test_payload / "windows" / PRODUCT.agent_exe).read_bytes()
    # Beside it, the release's pins, inside the signed bytes (7z reads them, not our code).
    assert extract_with_7z(built_a[0], TRUST_FILE, tmp_path).read_bytes() == TRUST.to_json_bytes()


def test_makensis_output_is_reproducible(test_payload, tmp_path):
    """Unsigned, so that only makensis is compared: a signature carries its signing time."""
    first, _ = build(tmp_path, test_payload, None, Signers(unsigned=True), name="first.exe")
    second, _ = build(tmp_path, test_payload, None, Signers(unsigned=True), name="second.exe")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest(), \
        "the same input gave a different installer"


def test_a_changed_byte_fails_verification(built_a, dev_keys, tmp_path):
    data = bytearray(built_a[0].read_bytes())
    inst = nsis.locate(bytes(data), "setup.exe")
    blocks = list(nsis._blocks(bytes(data), inst, "setup.exe"))
    for label, (offset, length, _) in (("agent data", max(blocks[1:], key=lambda b: b[1])), ("script header", blocks[0])):
        changed = bytearray(data)
        changed[offset + length // 2] ^= 0x01
        path = tmp_path / f"changed-{label.replace(' ', '-')}.exe"
        path.write_bytes(changed)
        report = exe.ExeFormat().verify(path, dev_keys.ca_cert)
        assert not report["ok"], f"a byte changed in the {label} went unnoticed"
        assert "signature" in report["detail"], report["detail"]
        assert osslsigncode_verify(path, dev_keys.ca_cert).returncode != 0


def test_truncated_or_foreign_input_is_named(built_a, tmp_path):
    data = built_a[0].read_bytes()
    for size in (1000, len(data) // 2, len(data) - 100):
        cut = tmp_path / f"cut-{size}.exe"
        cut.write_bytes(data[:size])
        with pytest.raises(FormatError, match=str(cut)) as err:
            exe.ExeFormat().verify(cut, None)
        assert "truncated" in err.value.message
    other = tmp_path / "notes.exe"
    other.write_bytes(b"just some text, not a program\n" * 10)
    with pytest.raises(FormatError, match="notes.exe.*not a PE"):
        exe.ExeFormat().inspect(other)


def test_release_build_reads_its_enrollment_at_install_time(dev_keys, test_payload, tmp_path):
    setup, _ = build(tmp_path, test_payload, None, pem_signers(dev_keys))
    report = exe.ExeFormat().verify(setup, dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["enrollment"] is None
    data = setup.read_bytes()
    strings = nsis.script_strings(data, nsis.locate(data, "setup.exe"), "setup.exe")
    assert any("verify-enrollment --installer" in s for s in strings)
    assert any("enroll-from-installer --installer" in s for s in strings)
    assert not any("write-config" in s for s in strings)
    assert not any(ENROLL_A.account_id in s for s in strings)  # no enrollment in the script


def test_unsigned_build_signs_nothing(test_payload, tmp_path):
    # The enrollment lives in the signature: an unsigned EXE cannot carry one, and leaves nothing.
    with pytest.raises(UsageError, match="unsigned EXE cannot carry one"):
        build(tmp_path, test_payload, SIGNED_B, Signers(unsigned=True), name="refused.exe")
    assert not (tmp_path / "refused.exe").exists()
    setup, built = build(tmp_path, test_payload, None, Signers(unsigned=True))
    assert built.signer is None and built.details["uninstaller_signed"] is False
    report = exe.ExeFormat().verify(setup, None)
    assert not report["ok"]
    assert report["signature"]["detail"] == "not signed"
    assert "uninstaller is not signed" in report["detail"]
    # Without !uninstfinalize the uninstaller is assembled at install time from the installer's
    # own (unsigned) stub: there is no whole uninstaller inside.
    assert "uninstaller" not in exe.ExeFormat().inspect(setup)
    assert report["enrollment"] is None


def test_wrong_password_fails_inside_makensis(dev_keys, test_payload, tmp_path):
    with pytest.raises(SigningError, match="wrong password"):
        build(tmp_path, test_payload, SIGNED_B, p12_signers(dev_keys, password="not-the-password"))
    assert not (tmp_path / "setup.exe").exists()


# --- under wine -----------------------------------------------------------------------------

def config_bytes(e) -> bytes:
    """enrollment.json as the agent writes it (payload/README.md): the signed enrollment."""
    return json.dumps({"enrollment": e.jws.reveal()}).encode()


def registry_doc(e) -> dict[str, str]:
    """The agent's Enrollment value, the verified SE; the installer's PendingEnrollment is gone."""
    return {"Enrollment": e.jws.reveal()}


ARP_ROOT = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall"


@dataclass
class Snapshot:
    """What an admin would look at after an install, read in ONE wine session: every `wine`
    start costs a few seconds (the prefix boots and shuts down around it)."""

    enrollment_values: dict[str, str] | None  # HKLM\<registry_key>, None when the key is absent
    arp: dict[str, dict[str, str]]  # our product's Add/Remove Programs entries: key -> REG_SZ values
    arp_dwords: dict[str, dict[str, int]]
    service_key: bool  # HKLM\SYSTEM\CurrentControlSet\Services\<service_name> exists
    service_state: str | None  # from `sc query`, None when there is no such service


def snapshot(wine, folder: Path) -> Snapshot:
    folder.mkdir(exist_ok=True)
    files = {name: folder / f"{name}.out" for name in ("enroll", "arp", "svc", "sc")}
    for f in files.values():
        f.unlink(missing_ok=True)
    w = {name: wine.winpath(f) for name, f in files.items()}
    batch = folder / "snapshot.cmd"
    batch.write_text("\r\n".join([
        "@echo off",
        f'reg export "HKLM\\{PRODUCT.registry_key}" "{w["enroll"]}" /y /reg:64',
        f'reg export "HKLM\\{ARP_ROOT}" "{w["arp"]}" /y /reg:64',
        f'reg export "HKLM\\SYSTEM\\CurrentControlSet\\Services\\{PRODUCT.service_name}" "{w["svc"]}" /y /reg:64',
        # Every wine command boots the prefix, which starts the auto-start service anew: give it
        # up to about 15 s to leave START_PENDING (it stays there when it cannot start).
        "set n=0",
        ":starting",
        f'sc query "{PRODUCT.service_name}" | find "START_PENDING" > nul || goto query',
        "set /a n+=1",
        "if %n% lss 300 goto starting",
        ":query",
        f'sc query "{PRODUCT.service_name}" > "{w["sc"]}"',
        "",
    ]), encoding="ascii")
    wine.run("cmd", "/c", wine.winpath(batch))
    read = lambda name: files[name].read_bytes() if files[name].exists() else None  # noqa: E731
    enroll, arp = read("enroll"), read("arp")
    entries = parse_reg_export_all(arp, ARP_ROOT) if arp else {}
    ours = {k: v for k, v in entries.items() if v.get("DisplayName") == PRODUCT.name}
    dwords: dict[str, dict[str, int]] = {k: {} for k in ours}
    current = None
    for line in (arp or b"").decode("utf-16", "replace").splitlines():
        if line.startswith("["):
            current = line[1:-1].rpartition("\\")[2]
        elif current in dwords and '"=dword:' in line:
            name, _, value = line.partition("=dword:")
            dwords[current][name.strip('"')] = int(value, 16)
    state = None
    for line in (read("sc") or b"").decode("ascii", "replace").splitlines():
        if "STATE" in line:
            state = line.split()[-1]
    return Snapshot(parse_reg_export(enroll, PRODUCT.registry_key) if enroll else None, ours, dwords,
                    read("svc") is not None, state)


def assert_enrolled(wine, snap: Snapshot, e, step: str) -> None:
    data_dir = wine.host_path("C:\\ProgramData\\" + PRODUCT.windows_install_folder)
    same(snap.enrollment_values, registry_doc(e), f"{step}: registry values")
    same((data_dir / exe.CONFIG_NAME).read_bytes(), config_bytes(e), f"{step}: {exe.CONFIG_NAME}")
    assert snap.service_state == "RUNNING", f"{step}: the service is {snap.service_state}, not RUNNING"
    status = json.loads((data_dir / "status.json").read_text())
    expected = {"state": "running", "account_id": e.account_id, "group_id": e.group_id, "console_url": e.console_url,
                "key_id": e.key_id, "token_sha256": hashlib.sha256(e.token.reveal().encode()).hexdigest()}
    same(status, expected, f"{step}: status.json (what the running service read)")


def test_install_upgrade_and_uninstall_under_wine(wine, built_a, built_b, dev_keys, test_payload, tmp_path):
    install_dir = wine.host_path("C:\\Program Files\\" + PRODUCT.windows_install_folder)
    data_dir = wine.host_path("C:\\ProgramData\\" + PRODUCT.windows_install_folder)
    uninstaller = f"C:\\Program Files\\{PRODUCT.windows_install_folder}\\{exe.UNINSTALLER_NAME}"

    # 1. Group A, silently, with the hostile values and a 4 KiB token.
    proc = wine.run(wine.winpath(built_a[0]), "/S")
    assert proc.returncode == 0, f"setup.exe /S exited {proc.returncode} (exit codes: templates/nsis/installer.nsi.j2)"
    assert sorted(p.name for p in install_dir.iterdir()) == sorted([PRODUCT.agent_exe, TRUST_FILE, exe.UNINSTALLER_NAME])
    assert (install_dir / TRUST_FILE).read_bytes() == TRUST.to_json_bytes()
    assert (install_dir / PRODUCT.agent_exe).read_bytes() == (test_payload / "windows" / PRODUCT.agent_exe).read_bytes()
    proc = osslsigncode_verify(install_dir / exe.UNINSTALLER_NAME, dev_keys.ca_cert)
    assert proc.returncode == 0, "the installed uninstaller does not verify"
    snap = snapshot(wine, tmp_path / "snap")
    assert_enrolled(wine, snap, SIGNED_A, "install A")
    assert len(snap.arp) == 1, f"Add/Remove Programs entries: {list(snap.arp)}"
    (arp_key, arp), = snap.arp.items()
    assert arp["DisplayVersion"] == "1.2.3" and arp["Publisher"] == PRODUCT.vendor
    assert arp["InstallLocation"] == f"C:\\Program Files\\{PRODUCT.windows_install_folder}"
    assert arp["UninstallString"] == f'"{uninstaller}"'
    assert arp["QuietUninstallString"] == f'"{uninstaller}" /S'
    assert snap.arp_dwords[arp_key]["NoModify"] == 1 and snap.arp_dwords[arp_key]["NoRepair"] == 1

    # 2. Group B's installer over group A's install: one product, enrolled to B.
    proc = wine.run(wine.winpath(built_b[0]), "/S")
    assert proc.returncode == 0, f"setup.exe /S (group B over A) exited {proc.returncode}"
    snap = snapshot(wine, tmp_path / "snap")
    assert list(snap.arp) == [arp_key], f"Add/Remove Programs entries after B over A: {list(snap.arp)}"
    assert_enrolled(wine, snap, SIGNED_B, "install B over A")

    # 3. Uninstall as Add/Remove Programs does it silently. (Without _?= the uninstaller copies
    # itself to %TEMP% and returns at once; wine.run waits for every process of the prefix.)
    quiet = snap.arp[arp_key]["QuietUninstallString"]
    assert quiet.startswith('"') and quiet.endswith('" /S')
    proc = wine.run(quiet[1:-4], "/S")
    assert proc.returncode == 0, f"uninstall exited {proc.returncode}"
    snap = snapshot(wine, tmp_path / "snap")
    assert not install_dir.exists() and not install_dir.parent.exists(), "files are left in Program Files"
    assert snap.service_state is None and not snap.service_key, "the service is still registered"
    key_gone = snap.enrollment_values is None  # not in the assert: pytest would print the values
    assert key_gone, "the enrollment registry key is still there"
    assert snap.arp == {}, "the Add/Remove Programs entry is still there"
    left = sorted(p.relative_to(data_dir.parent).as_posix() for p in data_dir.parent.rglob("*")) if data_dir.parent.exists() else []
    assert left == [], f"left in ProgramData (the agent's `forget` removes them): {left}"


def test_install_over_a_service_that_is_still_starting(wine, built_a, built_b, tmp_path):
    """Right after boot, the old service may still be START_PENDING, and a stop control sent then
    is refused: the installer must ask again once it runs, not wait 60 s and give up (exit 3)."""
    proc = wine.run(wine.winpath(built_a[0]), "/S")
    assert proc.returncode == 0, f"setup.exe /S exited {proc.returncode}"
    # The test agent's hook: its service stays START_PENDING for 5 s after each start.
    added = wine.run("reg", "add", f"HKLM\\{PRODUCT.registry_key}", "/v", "TestStartDelayMs", "/t", "REG_DWORD",
                     "/d", "5000", "/f", "/reg:64")
    assert added.returncode == 0
    wine.kill()  # a cold start: the next program boots the prefix, which starts the service again
    started = time.monotonic()
    proc = wine.run(wine.winpath(built_b[0]), "/S")
    took = time.monotonic() - started
    assert proc.returncode == 0, f"setup.exe /S over a starting service exited {proc.returncode} after {took:.0f} s"
    # Each wine command here boots the prefix anew: without the hook, the snapshot's own boot
    # finds the service RUNNING, as in the other install tests.
    deleted = wine.run("reg", "delete", f"HKLM\\{PRODUCT.registry_key}", "/v", "TestStartDelayMs", "/f", "/reg:64")
    assert deleted.returncode == 0
    snap = snapshot(wine, tmp_path / "snap")
    assert_enrolled(wine, snap, SIGNED_B, "install B over a starting A")
