"""Sign once per release, stamp each group in milliseconds: a stamped installer against a build.

One release of all four formats (dev keys) and one hostile enrollment. Each stamp format is
stamped once and compared with `builder build` of the same enrollment: under wine for EXE and
MSI (one fresh prefix per installer; the install and everything read back happen in ONE wine
session, since every `wine` start boots and shuts the prefix down), and by the postinstall
taken out of the pkg and run in a temporary root for pkg and dmg. Then what a stamp must refuse,
and the command line.

No token is printed: values that hold it are compared in a statement of their own, or through
test_exe's `same()`, which names a differing field by its length and hash only (called from a
frame pytest hides, since pytest prints the arguments of the function an assertion fails in).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder import build, formats, release, stamp
from builder.binfmt import tag
from builder.config import load_product
from builder.enrollment import MAX_TOKEN_BYTES, Enrollment, Secret
from builder.errors import FormatError, SlotError, UsageError, VerificationError
from builder.signing.signers import AppleKey, Signers
from builder.signing.authenticode import SigningKey
from builder.signing.enrollment_key import DEV_KEY_NAME
from builder.trust import TRUST_FILE, SignedEnrollment, Trust
from tests.integration.test_cli import run_cli
from tests.integration.test_dmg import hfs_listing
from tests.integration.test_exe import ARP_ROOT, config_bytes, registry_doc
from tests.integration.test_exe import same as exe_same
from tests.integration.test_pkg import install_like_installer, run, run_postinstall
from tests.support import wine as winesupport

EPOCH = 1767225600
VERSION = "1.2.3"
PRODUCT = load_product()
# 4096 bytes of base64url: the largest token the rules allow.
TOKEN = base64.urlsafe_b64encode(random.Random(20).randbytes(3072)).decode()
assert len(TOKEN.encode()) == MAX_TOKEN_BYTES
ENROLLMENT = Enrollment(
    account_id="acct:0042@example.com",
    group_id="grp-A_1.x:y@z",
    token=Secret(TOKEN),
    console_url="https://console.example.com/e?a=1&b='x'$y;z(!)*%20&c=$(id)",
)
TOKEN_ENV = "STAMP_TEST_TOKEN"
SLOT_MAGIC = b"ENRSLOT1"  # builder/binfmt/slot.py and payload/README.md: the slot's layout
MAC_CONFIG = PRODUCT.mac_install_folder.lstrip("/") + "/enrollment.json"  # relative to the install root
MAC_TRUST = PRODUCT.mac_install_folder.lstrip("/") + "/" + TRUST_FILE  # the pins, written by the postinstall too
OUT_NAMES = {"exe": "group.exe", "msi": "group.msi", "msi-tagged": "group-tagged.msi", "pkg": "group.pkg", "dmg": "group.dmg"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mask(text: str) -> str:
    """An msiexec log fit to print: wine logs hidden properties too, so the token and any signed
    enrollment (which holds it) are masked."""
    return re.sub(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", "<signed enrollment>", text).replace(TOKEN, "***")


def leftovers(folder: Path) -> list[str]:
    """Everything in `folder`, dot-files (a .partial) included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def same(actual, expected, what: str) -> None:
    """test_exe's same(), its failure raised again from here, with this frame hidden: pytest
    prints the arguments of the function an assertion fails in, and same()'s arguments are the
    values themselves, token included."""
    __tracebackhide__ = True
    try:
        exe_same(actual, expected, what)
    except AssertionError as exc:
        raise AssertionError(str(exc)) from None


def osslsigncode_verify(path: Path, ca: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["osslsigncode", "verify", "-CAfile", str(ca), "-in", str(path)],
                          capture_output=True, text=True)


def pe_layout(data: bytes) -> tuple[int, int, int, int]:
    """(CheckSum offset, certificate-table directory entry offset, table offset, table size),
    read with struct from the PE headers, not with builder's own parser."""
    header = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[header:header + 4] == b"PE\0\0"
    optional = header + 24
    magic = struct.unpack_from("<H", data, optional)[0]
    cert_entry = optional + (96 if magic == 0x10B else 112) + 4 * 8  # data directory 4: security
    offset, size = struct.unpack_from("<II", data, cert_entry)
    return optional + 64, cert_entry, offset, size


def signed_content_sha(data: bytes) -> str:
    """sha256 of what an Authenticode signature covers: the file without its CheckSum, its
    certificate-table entry and the table. The whole file's sha256 for anything else."""
    if data[:2] != b"MZ":
        return sha(data)
    checksum, entry, offset, size = pe_layout(data)
    if not size:
        return sha(data)
    return sha(data[:checksum] + data[checksum + 4:entry] + data[entry + 8:offset] + data[offset + size:])


def cli_stamp(release_dir: Path, fmt: str, out: Path, ca: Path, *extra) -> subprocess.CompletedProcess:
    # The development enrollment key lies beside the development CA (`builder dev-keys`).
    return run_cli("stamp", "--release", release_dir, "--format", fmt, "--account-id", ENROLLMENT.account_id,
                   "--group-id", ENROLLMENT.group_id, "--console-url", ENROLLMENT.console_url,
                   "--token-env", TOKEN_ENV, "--out", out, "--ca", ca, "--enrollment-key", ca.parent / DEV_KEY_NAME,
                   *extra, env={TOKEN_ENV: TOKEN, "SOURCE_DATE_EPOCH": str(EPOCH)})


def assert_one_error(proc: subprocess.CompletedProcess, code: int, words: str) -> None:
    __tracebackhide__ = True  # pytest would print `proc`, its output included
    leaked = TOKEN in proc.stdout + proc.stderr  # first, so that nothing below prints a token
    assert not leaked, "the token is in the command's output"
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# --- the release, the stamps and the builds --------------------------------------------------

@pytest.fixture(scope="module")
def signers(dev_keys) -> Signers:
    mac_password = Secret("development")
    return Signers(
        authenticode=SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key),
        apple_application=AppleKey(pkcs12=dev_keys.mac_app_pkcs12, password=mac_password),
        apple_installer=AppleKey(pkcs12=dev_keys.mac_installer_pkcs12, password=mac_password),
        verify_ca=dev_keys.ca_cert,
    )


def make_release(out: Path, format_names: list[str], payload: Path, signers: Signers, trust: Trust, product=PRODUCT) -> Path:
    release.release(format_names=format_names, product=product, version=VERSION, payload=payload,
                    signers=signers, trust=trust, out=out, source_date_epoch=EPOCH)
    return out


@pytest.fixture(scope="module")
def signed_enrollment(enrollment_key, trust) -> SignedEnrollment:
    """ENROLLMENT signed as `builder stamp` signs it (issued at SOURCE_DATE_EPOCH)."""
    return enrollment_key.sign(ENROLLMENT, trust, issued_at=EPOCH)


@pytest.fixture(scope="module")
def release_dir(test_payload, signers, trust, tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("release"), ["exe", "msi", "pkg", "dmg"], test_payload, signers, trust)


@pytest.fixture(scope="module")
def rel(release_dir, dev_keys) -> release.Release:
    return release.Release.open(release_dir, ca=dev_keys.ca_cert)


@dataclass
class Stamps:
    results: dict[str, stamp.Stamped]
    made_at: float  # time.monotonic() when the last one was written

    def path(self, fmt: str) -> Path:
        return self.results[fmt].path


@pytest.fixture(scope="module")
def stamped(rel, signers, signed_enrollment, tmp_path_factory) -> Stamps:
    out = tmp_path_factory.mktemp("stamped")
    results = {fmt: stamp.stamp(rel, fmt, signed_enrollment, signers, out / OUT_NAMES[fmt]) for fmt in formats.KIND_NAMES}
    return Stamps(results, time.monotonic())


@pytest.fixture(scope="module")
def built(test_payload, signers, signed_enrollment, trust, tmp_path_factory) -> dict[str, Path]:
    """`builder build` of the same enrollment, the same version and SOURCE_DATE_EPOCH."""
    outputs = build.build(format_names=["exe", "msi", "pkg"], product=PRODUCT, version=VERSION, payload=test_payload,
                          enrollment=signed_enrollment, trust=trust, signers=signers, out=tmp_path_factory.mktemp("built"),
                          source_date_epoch=EPOCH)
    return {o.format: o.path for o in outputs}


def test_release_reserves_an_empty_slot_in_exe_and_msi(rel):
    assert set(rel.manifest["files"]) == {"exe", "msi", "pkg", "dmg"}
    for fmt in ("exe", "msi"):
        base = rel.file(fmt)
        data = base.path.read_bytes()
        extents = base.slot["extents"]
        slot = b"".join(data[offset:offset + length] for offset, length in extents)
        assert base.slot["size"] == PRODUCT.slot_size == len(slot), fmt
        assert slot == SLOT_MAGIC + bytes(4) + bytes(len(slot) - 12), f"{fmt}: the manifest's extents are not an empty slot"
    data = rel.file("exe").path.read_bytes()
    _, _, table, size = pe_layout(data)
    [(offset, length)] = rel.file("exe").slot["extents"]
    assert table < offset and offset + length <= table + size, "the EXE's slot is not inside its certificate table"


# --- signatures and bytes --------------------------------------------------------------------

@pytest.mark.parametrize("fmt, resigned", [("exe", False), ("msi-tagged", False), ("msi", True)])
def test_stamped_windows_installers_verify_with_osslsigncode(stamped, dev_keys, signed_enrollment, fmt, resigned):
    assert stamped.results[fmt].resigned is resigned
    proc = osslsigncode_verify(stamped.path(fmt), dev_keys.ca_cert)
    output = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and "Signature verification: ok" in output
    assert ok, mask(output)[-1500:]
    assert "invalid PE checksum" not in output, "the stamp broke the PE CheckSum"
    # And `builder verify` reads the enrollment back (masked) from where the stamp put it.
    report = formats.for_file(stamped.path(fmt)).verify(stamped.path(fmt), dev_keys.ca_cert)
    assert report["ok"], report["detail"]
    assert report["enrollment"] == {"state": "valid", **signed_enrollment.public()}
    assert report["enrollment_source"] == ("property" if fmt == "msi" else "slot")


@pytest.mark.parametrize("fmt", ["exe", "msi-tagged"])
def test_a_slotted_stamp_changes_only_the_slot(rel, stamped, signed_enrollment, fmt):
    base_file = rel.file(formats.kind(fmt).base)
    base, out = base_file.path.read_bytes(), stamped.path(fmt).read_bytes()
    assert len(out) == len(base)
    extents = base_file.slot["extents"]
    pos = 0
    for offset, length in extents:
        assert out[pos:offset] == base[pos:offset], f"bytes changed before {offset}"
        pos = offset + length
    assert out[pos:] == base[pos:], f"bytes changed after {pos}"
    slot = b"".join(out[offset:offset + length] for offset, length in extents)
    payload = signed_enrollment.jws.reveal().encode()
    filled = slot[:12 + len(payload)] == SLOT_MAGIC + struct.pack("<I", len(payload)) + payload
    assert filled, "the slot does not hold the signed enrollment as the agent reads it"
    pieces = stamp.stamp_ranges(base_file, signed_enrollment)
    streamed = tag.apply_pieces(base, pieces) == out
    assert streamed, "stamp_ranges describes another file than the one stamp() wrote"
    assert stamped.results[fmt].bytes_written == base_file.slot["size"]
    # Reported from the pieces, not read back: the same as the file's own hash and size.
    assert (stamped.results[fmt].sha256, stamped.results[fmt].size) == (hashlib.sha256(out).hexdigest(), len(out))


@pytest.mark.parametrize("fmt", ["exe", "msi-tagged", "msi", "pkg", "dmg"])
def test_stamping_is_deterministic(rel, stamped, signers, signed_enrollment, tmp_path, fmt):
    # In another second than the first stamp, so that a wall-clock time would show.
    time.sleep(max(0.0, 1.1 - (time.monotonic() - stamped.made_at)))
    again = stamp.stamp(rel, fmt, signed_enrollment, signers, tmp_path / OUT_NAMES[fmt])
    assert again.sha256 == sha(again.path.read_bytes())
    assert again.sha256 == stamped.results[fmt].sha256


# --- EXE and MSI under wine --------------------------------------------------------------------

@dataclass
class Installed:
    """What an admin would look at after one install. Fields that hold the token are kept out
    of repr: pytest prints an object whose attribute an assertion reads."""

    rc: int | None
    files: dict[str, str]  # under Program Files: relative path -> sha256 of its signed content
    whole_files: dict[str, str]  # relative path -> sha256 of the whole file
    data_files: list[str]  # names under ProgramData
    service_key: str | None  # `reg export` of the service's key
    service_state: str | None
    arp: dict[str, str]  # our Add/Remove Programs entries: subkey -> its `reg export` section
    config: bytes = field(repr=False)
    status: dict | None = field(repr=False)
    enrollment_values: dict[str, str] | None = field(repr=False)
    log: str = field(repr=False)


def decode_reg(data: bytes | None) -> str:
    """A `reg export` file (UTF-16 with a BOM) or an msiexec log as text."""
    data = data or b""
    return data.decode("utf-16", "replace") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8", "replace")


def reg_sections(text: str, root: str) -> dict[str, str]:
    """Subkey of HKLM\\root -> its lines in a `reg export`, as one string."""
    sections: dict[str, list[str]] = {}
    current = None
    prefix = "HKEY_LOCAL_MACHINE\\" + root + "\\"
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            current = name[len(prefix):] if name.lower().startswith(prefix.lower()) else None
        if current is not None and line:
            sections.setdefault(current, []).append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def install_and_snapshot(template: winesupport.WinePrefix, work: Path, install: str) -> Installed:
    """A copy of the template prefix, `install` (a cmd.exe command line) run in it, and everything
    read back, in one wine session. An msiexec log goes to work/msiexec.log. The prefix is
    deleted afterwards (700 MB each)."""
    prefix = winesupport.copy_prefix(template, work / "prefix")
    out = work / "out"
    out.mkdir()
    w = lambda name: prefix.winpath(out / name)  # noqa: E731
    service = PRODUCT.service_name
    batch = out / "install.cmd"
    batch.write_text("\r\n".join([
        "@echo off",
        f'start "" /wait {install}',
        "set rc=%ERRORLEVEL%",
        f'echo %rc% > "{w("rc.out")}"',
        'if not "%rc%"=="0" goto snapshot',
        # The service may still be START_PENDING when the installer returns.
        "set n=0",
        ":wait",
        f'sc query "{service}" | find "RUNNING" > nul && goto snapshot',
        "set /a n+=1",
        "if %n% lss 300 goto wait",
        ":snapshot",
        f'reg export "HKLM\\{PRODUCT.registry_key}" "{w("enroll.reg")}" /y /reg:64',
        f'reg export "HKLM\\{ARP_ROOT}" "{w("arp.reg")}" /y /reg:64',
        f'reg export "HKLM\\SYSTEM\\CurrentControlSet\\Services\\{service}" "{w("service.reg")}" /y /reg:64',
        f'sc query "{service}" > "{w("sc.out")}"',
        "",
    ]), encoding="ascii")
    try:
        prefix.run("cmd", "/c", prefix.winpath(batch), timeout=300)
        read = lambda path: path.read_bytes() if path.exists() else None  # noqa: E731
        arp = read(out / "arp.reg") or b""
        ours = {k for k, v in winesupport.parse_reg_export_all(arp, ARP_ROOT).items() if v.get("DisplayName") == PRODUCT.name}
        state = None
        for line in decode_reg(read(out / "sc.out")).splitlines():
            if "STATE" in line:
                state = line.split()[-1]
        enroll, rc = read(out / "enroll.reg"), read(out / "rc.out")
        program_files = prefix.host_path("C:\\Program Files\\" + PRODUCT.windows_install_folder)
        installed = sorted(p for p in program_files.rglob("*") if p.is_file())
        data_dir = prefix.host_path("C:\\ProgramData\\" + PRODUCT.windows_install_folder)
        status = read(data_dir / "status.json")
        return Installed(
            rc=int(rc.decode().strip()) if rc else None,
            files={p.relative_to(program_files).as_posix(): signed_content_sha(p.read_bytes()) for p in installed},
            whole_files={p.relative_to(program_files).as_posix(): sha(p.read_bytes()) for p in installed},
            data_files=leftovers(data_dir),
            service_key=decode_reg(read(out / "service.reg")) or None,
            service_state=state,
            arp={k: v for k, v in reg_sections(decode_reg(arp), ARP_ROOT).items() if k in ours},
            config=read(data_dir / "enrollment.json") or b"",
            status=json.loads(status) if status else None,
            enrollment_values=winesupport.parse_reg_export(enroll, PRODUCT.registry_key) if enroll else None,
            log=decode_reg(read(work / "msiexec.log")),
        )
    finally:
        prefix.kill()
        shutil.rmtree(prefix.root, ignore_errors=True)


@pytest.fixture(scope="module")
def windows_installs(wine_template, stamped, built, tmp_path_factory) -> dict[str, Installed]:
    """Five installs, each in its own fresh prefix, side by side (separate wineservers)."""
    work = tmp_path_factory.mktemp("stamp-wine")
    exes = {"exe-built": built["exe"], "exe-stamped": stamped.path("exe")}
    # All MSIs run from one folder: Add/Remove Programs records it (InstallSource).
    msis = {"msi-built": built["msi"], "msi-baked": stamped.path("msi"), "msi-tagged": stamped.path("msi-tagged")}
    msi_dir = work / "msi"
    msi_dir.mkdir()
    for name, src in msis.items():
        shutil.copyfile(src, msi_dir / f"{name}.msi")
    winpath = winesupport.WinePrefix.winpath

    def one(name: str) -> Installed:
        folder = work / name
        folder.mkdir()
        if name in exes:
            command = f'"{winpath(exes[name])}" /S'
        else:
            command = f'msiexec /i "{winpath(msi_dir / f"{name}.msi")}" /qn /l*v "{winpath(folder / "msiexec.log")}"'
        return install_and_snapshot(wine_template, folder, command)

    names = [*exes, *msis]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(one, names)))


def assert_installed(snap: Installed, name: str, expected_files: set[str], test_payload: Path,
                     se: SignedEnrollment) -> None:
    """`snap` holds exactly the payload, its pins and the signed ENROLLMENT, with the service running."""
    assert snap.rc == 0, f"{name}: the installer exited {snap.rc}\n" + "\n".join(mask(snap.log).splitlines()[-30:])
    assert set(snap.files) == expected_files, name
    agent = sha((test_payload / "windows" / PRODUCT.agent_exe).read_bytes())
    assert snap.whole_files[PRODUCT.agent_exe] == agent, f"{name}: the installed agent is not the payload's"
    assert snap.service_state == "RUNNING", f"{name}: the service is {snap.service_state}"
    auto_start = '"Start"=dword:00000002' in (snap.service_key or "").splitlines()
    assert auto_start, f"{name}: the service is missing or does not start automatically"
    same(snap.enrollment_values, registry_doc(se), f"{name}: registry values")
    same(snap.config, config_bytes(se), f"{name}: enrollment.json")
    # The snapshot is read after wine shut the prefix down, which may kill the service in the
    # middle of writing its last status: its status.json.tmp is that write, not the install's.
    installed_data = [f for f in snap.data_files if f != "status.json.tmp"]
    assert installed_data == ["enrollment.json", "status.json"], (name, snap.data_files)
    want = {"state": "running", "account_id": ENROLLMENT.account_id, "group_id": ENROLLMENT.group_id,
            "console_url": ENROLLMENT.console_url, "key_id": se.key_id, "token_sha256": sha(TOKEN.encode())}
    same(snap.status, want, f"{name}: status.json (what the running service read)")
    assert len(snap.arp) == 1, f"{name}: Add/Remove Programs entries {list(snap.arp)}"


def assert_same_install(a: Installed, b: Installed, what: str, arp=lambda snap: snap.arp) -> None:
    assert a.files == b.files, f"{what}: installed files differ"
    same(a.enrollment_values, b.enrollment_values, f"{what}: registry values")
    same(a.config, b.config, f"{what}: enrollment.json")
    same(a.status, b.status, f"{what}: status.json")
    assert (a.service_key, a.service_state) == (b.service_key, b.service_state), f"{what}: the service differs"
    assert arp(a) == arp(b), f"{what}: Add/Remove Programs entries differ"


def test_stamped_exe_installs_like_a_built_exe(windows_installs, test_payload, signed_enrollment):
    built_exe, stamped_exe = windows_installs["exe-built"], windows_installs["exe-stamped"]
    for name in ("exe-built", "exe-stamped"):
        assert_installed(windows_installs[name], name, {PRODUCT.agent_exe, TRUST_FILE, "uninstall.exe"}, test_payload,
                         signed_enrollment)
    assert list(stamped_exe.arp) == [PRODUCT.service_name]
    # uninstall.exe is compared by what its signature covers: see the test below.
    assert_same_install(built_exe, stamped_exe, "built EXE vs stamped EXE")


def test_stamped_exe_installs_the_built_exes_uninstaller_byte_for_byte(windows_installs):
    built_exe, stamped_exe = windows_installs["exe-built"], windows_installs["exe-stamped"]
    assert built_exe.files["uninstall.exe"] == stamped_exe.files["uninstall.exe"]  # the signed content
    assert built_exe.whole_files == stamped_exe.whole_files


def section_values(text: str) -> dict[str, str]:
    """The values of one `reg export` section: strings unescaped, REG_EXPAND_SZ (hex(2)) decoded,
    anything else as exported (dword:00000001)."""
    values = {}
    for line in text.replace("\\\n  ", "").splitlines()[1:]:
        name, _, value = line.partition("=")
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        elif value.startswith("hex(2):"):
            value = bytes.fromhex(value[7:].replace(",", "")).decode("utf-16-le").rstrip("\0")
        values[name.strip('"')] = value
    return values


def without_product_code(snap: Installed) -> dict[str, str]:
    """The MSI's Add/Remove Programs entry with its ProductCode (its key, and inside ModifyPath)
    and InstallDate masked: a built MSI, a baked MSI (new ProductCode per group, so a group swap
    is a major upgrade) and the release MSI have three ProductCodes by design; InstallDate is
    the wall clock's."""
    [(code, text)] = snap.arp.items()
    assert re.fullmatch(r"\{[0-9A-F-]{36}\}", code), code
    values = {k: v.replace(code, "{ProductCode}") for k, v in section_values(text).items()}
    values.pop("InstallDate")
    return values


def test_baked_and_tagged_msis_install_like_a_built_msi(windows_installs, test_payload, signed_enrollment):
    for name in ("msi-built", "msi-baked", "msi-tagged"):
        assert_installed(windows_installs[name], name, {PRODUCT.agent_exe, TRUST_FILE}, test_payload, signed_enrollment)
    built_msi = windows_installs["msi-built"]
    for name in ("msi-baked", "msi-tagged"):
        assert_same_install(built_msi, windows_installs[name], f"built MSI vs {name}", arp=without_product_code)
    codes = {name: next(iter(windows_installs[name].arp)) for name in ("msi-built", "msi-baked", "msi-tagged")}
    assert len(set(codes.values())) == 3, f"a baked MSI needs its own ProductCode: {codes}"
    # The tagged MSI has no ENROLLMENT property: the agent read its own slot through
    # [OriginalDatabase]. The baked one verified its ENROLLMENT default through the registry.
    ran = {name: {action for action in ("AgentEnrollFromRegistry", "AgentEnrollFromInstaller")
                  if re.search(rf"Action ended [^\n]*: {action}\. Return value 1\.", windows_installs[name].log)}
           for name in ("msi-built", "msi-baked", "msi-tagged")}
    assert ran == {"msi-built": {"AgentEnrollFromRegistry"}, "msi-baked": {"AgentEnrollFromRegistry"},
                   "msi-tagged": {"AgentEnrollFromInstaller"}}


# --- pkg and dmg: the postinstall in a temporary root ------------------------------------------

def install_tree(pkg: Path, work: Path) -> dict[str, tuple]:
    """The pkg's Payload and postinstall as Installer would run them, into work/root; returns
    every path there -> (sha256 or "dir", mode, mtime). The postinstall gets the pkg's own path
    as $1 (beside it a sidecar, if any)."""
    root = work / "root"
    script = install_like_installer(pkg, root, work / "extract")
    proc = run_postinstall(script, root, pkg)
    leaked = TOKEN in proc.stdout + proc.stderr
    assert not leaked, "the postinstall printed the token"
    tree = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        # The Payload's file times are fixed; folders get the time GNU cpio last wrote into
        # them, and enrollment.json and trust.json the time the postinstall wrote them.
        mtime = None if p.is_dir() or rel in (MAC_CONFIG, MAC_TRUST) else p.lstat().st_mtime
        tree[rel] = (sha(p.read_bytes()) if p.is_file() else "dir", p.lstat().st_mode, mtime)
    return tree


@pytest.fixture(scope="module")
def built_pkg_install(built, tmp_path_factory) -> dict[str, tuple]:
    return install_tree(built["pkg"], tmp_path_factory.mktemp("built-pkg-install"))


def mac_config(se: SignedEnrollment) -> bytes:
    """The agent's config as payload/README.md specifies it: the signed enrollment."""
    return json.dumps({"enrollment": se.jws.reveal()}).encode()


def test_stamped_pkg_installs_like_a_built_pkg(stamped, built_pkg_install, signed_enrollment, tmp_path):
    tree = install_tree(stamped.path("pkg"), tmp_path)
    written = tree[MAC_CONFIG][0] == built_pkg_install[MAC_CONFIG][0] == sha(mac_config(signed_enrollment))
    assert written, "the stamped pkg's postinstall did not write the built pkg's enrollment.json"
    assert tree == built_pkg_install


def test_stamped_dmg_installs_like_a_built_pkg(stamped, rel, built_pkg_install, signed_enrollment, tmp_path):
    # The volume as 7-Zip extracts it: the release's signed pkg, the group's enrollment beside it.
    hfs, _ = hfs_listing(stamped.path("dmg"), tmp_path)
    volumes = tmp_path / "Volumes"
    run(["7z", "x", "-y", f"-o{volumes}", hfs])
    [volume] = volumes.iterdir()
    [pkg] = volume.glob("*.pkg")
    [sidecar] = volume.glob(".*.enrollment.jws")
    assert sha(pkg.read_bytes()) == rel.file("pkg").entry["sha256"], "the dmg does not carry the release's pkg"
    stored = sha(sidecar.read_bytes()) == sha(signed_enrollment.jws.reveal().encode())
    assert stored, "the sidecar is not the signed enrollment"
    tree = install_tree(pkg, tmp_path / "install")
    written = tree[MAC_CONFIG][0] == built_pkg_install[MAC_CONFIG][0] == sha(mac_config(signed_enrollment))
    assert written, "the dmg's postinstall did not write the built pkg's enrollment.json"
    assert tree == built_pkg_install


# --- what a stamp refuses ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_slot_release(test_payload, signers, trust, tmp_path_factory) -> Path:
    product = load_product(None, {"slot_size": "1024"})
    return make_release(tmp_path_factory.mktemp("release-1k"), ["exe", "msi"], test_payload, signers, trust, product)


def test_an_enrollment_larger_than_the_slot_is_refused(small_slot_release, signers, signed_enrollment, dev_keys, tmp_path):
    rel = release.Release.open(small_slot_release, ca=dev_keys.ca_cert)
    assert rel.file("exe").slot["size"] == 1024
    out = tmp_path / "out"
    for fmt in ("exe", "msi-tagged"):
        with pytest.raises(SlotError) as info:
            stamp.stamp(rel, fmt, signed_enrollment, signers, out / OUT_NAMES[fmt])
        assert "1024-byte slot" in str(info.value)
    assert leftovers(out) == []
    proc = cli_stamp(small_slot_release, "exe", out / "cli.exe", dev_keys.ca_cert)
    assert_one_error(proc, SlotError.exit_code, "slot")
    assert leftovers(out) == []


def copy_release(src: Path, dst: Path, *, exe: bytes | None = None, manifest_sha: str | None = None) -> Path:
    """The release's EXE alone in a new release folder: its bytes replaced by `exe` (the manifest
    then records their size and sha256), or the manifest's sha256 replaced by `manifest_sha`."""
    manifest = json.loads((src / release.MANIFEST).read_text())
    entry = manifest["files"]["exe"]
    manifest["files"] = {"exe": entry}
    data = exe if exe is not None else (src / entry["file"]).read_bytes()
    dst.mkdir()
    (dst / entry["file"]).write_bytes(data)
    entry["size"], entry["sha256"] = len(data), manifest_sha or sha(data)
    (dst / release.MANIFEST).write_text(json.dumps(manifest))
    return dst


def flip_signed_byte(data: bytes) -> bytes:
    _, _, table, _ = pe_layout(data)
    changed = bytearray(data)
    changed[table // 2] ^= 0x01  # in the NSIS data, well before the certificate table
    return bytes(changed)


@pytest.mark.parametrize("damage, words", [("signed-byte", "signature does not verify"), ("manifest-sha256", "sha256")])
def test_a_changed_release_is_refused(rel, release_dir, dev_keys, tmp_path, damage, words):
    exe = rel.file("exe").path.read_bytes()
    if damage == "signed-byte":
        folder = copy_release(release_dir, tmp_path / "release", exe=flip_signed_byte(exe))
    else:
        folder = copy_release(release_dir, tmp_path / "release", manifest_sha=sha(b"another file"))
    with pytest.raises(VerificationError) as info:
        release.Release.open(folder, ca=dev_keys.ca_cert)
    assert words in str(info.value) and "exe" in str(info.value)
    out = tmp_path / "out"
    proc = cli_stamp(folder, "exe", out / "group.exe", dev_keys.ca_cert)
    assert_one_error(proc, VerificationError.exit_code, words)
    assert leftovers(out) == []


def test_truncated_and_foreign_inputs_are_format_errors(release_dir, stamped, dev_keys, tmp_path):
    exe = stamped.path("exe").read_bytes()
    msi = stamped.path("msi-tagged").read_bytes()
    inputs = {
        "cut.exe": exe[:len(exe) // 2],
        "notes.exe": b"just some text, not a program\n" * 20,
        "cut.msi": msi[:len(msi) - 100],
        "notes.msi": b"just some text, not an installer\n" * 20,
    }
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        proc = run_cli("verify", "--ca", dev_keys.ca_cert, tmp_path / name)
        assert_one_error(proc, FormatError.exit_code, name)
    # A release whose EXE was cut (and its manifest made to match) or is no PE at all.
    for name in ("cut.exe", "notes.exe"):
        folder = copy_release(release_dir, tmp_path / f"release-{name}", exe=inputs[name])
        with pytest.raises(FormatError) as info:
            release.Release.open(folder, ca=dev_keys.ca_cert)
        assert "ExampleRemoteAgent" in str(info.value)
        out = tmp_path / f"out-{name}"
        proc = cli_stamp(folder, "exe", out / "group.exe", dev_keys.ca_cert)
        assert_one_error(proc, FormatError.exit_code, "ExampleRemoteAgent")
        assert leftovers(out) == []


def test_an_unknown_stamp_format_is_a_usage_error(rel, release_dir, signers, signed_enrollment, dev_keys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as info:
        stamp.stamp(rel, "rpm", signed_enrollment, signers, out / "group.rpm")
    assert info.value.exit_code == 2 and "rpm" in str(info.value)
    proc = cli_stamp(release_dir, "rpm", out / "group.rpm", dev_keys.ca_cert)
    leaked = TOKEN in proc.stdout + proc.stderr
    assert not leaked
    assert proc.returncode == 2 and "rpm" in proc.stderr, proc.stderr
    assert leftovers(out) == []


# --- the command line ------------------------------------------------------------------------

def test_cli_release_then_stamp(test_payload, dev_keys, signers, signed_enrollment, tmp_path):
    folder = tmp_path / "release"
    proc = run_cli("release", "--format", "exe", "--version", VERSION, "--payload", test_payload, "--out", folder,
                   "--sign-cert", dev_keys.sign_cert, "--sign-key", dev_keys.sign_key, "--ca", dev_keys.ca_cert,
                   "--enrollment-key", dev_keys.folder / DEV_KEY_NAME, "--json", env={"SOURCE_DATE_EPOCH": str(EPOCH)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(proc.stdout)
    assert manifest == json.loads((folder / release.MANIFEST).read_text())
    assert list(manifest["files"]) == ["exe"] and manifest["source_date_epoch"] == EPOCH

    out = tmp_path / "out" / "group.exe"
    proc = cli_stamp(folder, "exe", out, dev_keys.ca_cert, "--json")
    leaked = TOKEN in proc.stdout + proc.stderr
    assert not leaked, "the token is in the command's output"
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["sha256"] == sha(out.read_bytes()) and doc["size"] == out.stat().st_size
    assert (doc["format"], doc["release"], doc["resigned"]) == ("exe", VERSION, False)
    assert doc["enrollment"] == signed_enrollment.public()
    # The command line carried every hostile value intact: the library gives the same file.
    library = stamp.stamp(release.Release.open(folder, ca=dev_keys.ca_cert), "exe", signed_enrollment, signers, tmp_path / "lib" / "group.exe")
    assert library.sha256 == doc["sha256"]
