"""A stamped installer cannot be repointed: the attacks of issue 8, under wine, on the real files.

Every case is an installer an attacker could make WITHOUT the enrollment key, from a genuine
release or a genuine group installer: a slot re-stamped with another key, one byte changed in
the slot, a second slot, an expired enrollment, a console host outside the pins, unsigned values
on the msiexec line. Each is installed on a fresh wine machine (one session per case: every
`wine` start boots the prefix) and must fail closed: a non-zero exit, no enrollment written
(no config file, no Enrollment value), no service running, no attacker value anywhere. Over an
existing install, the old enrollment stays. The genuine cases (and key rotation) install.

The forged files are made with builder's pure byte code (tag, pkcs7, pe), as an attacker would
with any hex editor; the enrollments with tests/support/signed.py, an independent producer.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder import release, stamp
from builder.binfmt import pe, pkcs7, tag
from builder.binfmt.slot import encode_slot
from builder.config import load_product
from builder.enrollment import Enrollment, Secret
from builder.signing.signers import Signers
from builder.signing.authenticode import SigningKey
from builder.signing.enrollment_key import FileEnrollmentKey
from builder.trust import PinnedKey, Trust
from tests.support import signed as oracle
from tests.support import wine as winesupport

EPOCH = 1767225600
PRODUCT = load_product()
HOST = "console.example.com"
ATTACKER = "https://attacker.example.net/enroll"
TOKEN = "genuine-token-0123456789abcdefghijklmnop"
REGKEY = PRODUCT.registry_key
PARALLEL = 3


@dataclass
class Machine:
    """What an admin would look at afterwards. Values that hold the token stay out of repr."""

    rcs: list[int | None]
    service_state: str | None
    config: bytes = field(repr=False)
    registry: dict[str, str] = field(repr=False)
    registry_text: str = field(repr=False)
    log: str = field(repr=False)


def session(template: winesupport.WinePrefix, work: Path, commands: list[str]) -> Machine:
    """A fresh machine, `commands` run one after the other (each waited for; after a success the
    service is given time to reach RUNNING), then everything read back, in one wine session."""
    prefix = winesupport.copy_prefix(template, work / "prefix")
    out = work / "out"
    out.mkdir()
    w = lambda name: prefix.winpath(out / name)  # noqa: E731
    lines = ["@echo off"]
    for i, command in enumerate(commands):
        lines += [f'start "" /wait {command}', f'echo %ERRORLEVEL% > "{w(f"rc{i}.out")}"',
                  "set n=0", f":wait{i}", f'sc query "{PRODUCT.service_name}" | find "RUNNING" > nul && goto done{i}',
                  "set /a n+=1", f"if %n% lss 40 goto wait{i}", f":done{i}"]
    lines += [f'reg export "HKLM\\{REGKEY}" "{w("enroll.reg")}" /y /reg:64',
              f'sc query "{PRODUCT.service_name}" > "{w("sc.out")}"', ""]
    batch = out / "run.cmd"
    batch.write_text("\r\n".join(lines), encoding="ascii")
    try:
        prefix.run("cmd", "/c", prefix.winpath(batch), timeout=600)
        read = lambda p: p.read_bytes() if p.exists() else b""  # noqa: E731
        rcs = []
        for i in range(len(commands)):
            raw = read(out / f"rc{i}.out").decode().strip()
            rcs.append(int(raw) if raw else None)
        state = None
        for line in read(out / "sc.out").decode("utf-8", "replace").splitlines():
            if "STATE" in line:
                state = line.split()[-1]
        reg = read(out / "enroll.reg")
        data_dir = prefix.host_path("C:\\ProgramData\\" + PRODUCT.windows_install_folder)
        log = work / "msiexec.log"
        return Machine(rcs, state, read(data_dir / "enrollment.json"),
                       winesupport.parse_reg_export(reg, REGKEY) if reg else {},
                       reg.decode("utf-16", "replace") if reg[:2] == b"\xff\xfe" else reg.decode("utf-8", "replace"),
                       (log.read_bytes().decode("utf-16", "replace") if log.exists() else ""))
    finally:
        prefix.kill()
        shutil.rmtree(prefix.root, ignore_errors=True)


# --- the releases and the files an attacker makes ------------------------------------------------

@pytest.fixture(scope="module")
def keys(dev_keys):
    """The suite's enrollment key (`builder dev-keys` makes it) and a second one."""
    from cryptography.hazmat.primitives import serialization

    first = serialization.load_pem_private_key((dev_keys.folder / "enrollment.key").read_bytes(), None)
    return first, oracle.new_key()


@pytest.fixture(scope="module")
def releases(dev_keys, test_payload, tmp_path_factory, keys):
    """R1 pins the first key, R2 both (a key rotation); exe and msi, signed with the dev CA."""
    signers = Signers(authenticode=SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), verify_ca=dev_keys.ca_cert)
    out = {}
    for name, pinned in (("r1", keys[:1]), ("r2", keys)):
        folder = tmp_path_factory.mktemp(f"repoint-{name}")
        trust = Trust(tuple(PinnedKey.from_public_key(k.public_key()) for k in pinned), (HOST,))
        release.release(format_names=["exe", "msi"], product=PRODUCT, version="1.0.0", payload=test_payload,
                        signers=signers, trust=trust, out=folder, source_date_epoch=EPOCH)
        out[name] = release.Release.open(folder, ca=dev_keys.ca_cert)
    return out


def restamp(rel: release.Release, fmt: str, payload: bytes, dest: Path) -> Path:
    """The release's file with `payload` written into its slot: no key needed, no check made."""
    base = rel.file(fmt)
    info = base.slot
    new = encode_slot(payload, info["size"])
    if info.get("checksum_neutral"):
        new = tag.checksum_neutral(new, encode_slot(b"", info["size"]), info["extents"][0][0])
    dest.write_bytes(tag.apply_pieces(base.path.read_bytes(), tag.stamp_pieces(base.entry["size"], [tuple(e) for e in info["extents"]], new)))
    return dest


def flip_in_payload(jws: str) -> str:
    """One character of the signed payload changed: the group id's first letter, say."""
    return oracle.tamper(jws, 1, 30)


def append_after_pkcs7(exe: Path, blob: bytes, dest: Path) -> Path:
    """CVE-2013-3900: bytes after the PKCS#7 inside WIN_CERTIFICATE, dwLength and the security
    directory grown to cover them (what MeshCentral and ScreenConnect did)."""
    data = bytearray(exe.read_bytes())
    layout = pe.parse(bytes(data), str(exe))
    blob = blob + bytes(-len(blob) % 8)
    length = struct.unpack_from("<I", data, layout.cert_table_offset)[0]
    struct.pack_into("<I", data, layout.cert_table_offset, length + len(blob))
    struct.pack_into("<II", data, layout.security_entry_offset, layout.cert_table_offset, layout.cert_table_size + len(blob))
    data += blob
    dest.write_bytes(bytes(data))
    return dest


def second_slot_msi(msi: Path, payload: bytes, work: Path, dest: Path) -> Path:
    """The MSI's PKCS#7 with a second slot attribute (the attacker's) after the genuine one,
    re-attached with osslsigncode: the Authenticode signature stays valid."""
    sig, unsigned = work / "sig.der", work / "unsigned.msi"
    subprocess.run(["osslsigncode", "extract-signature", "-in", str(msi), "-out", str(sig)], check=True, capture_output=True)
    der = sig.read_bytes()
    path = pkcs7._signer_path(der)
    signer = path[-1]
    attrs = pkcs7._unsigned_attrs(der, signer)
    value = encode_slot(payload, 1024)
    octets = bytes([0x04]) + pkcs7._length(len(value)) + value
    body = pkcs7.oid_der(pkcs7.SLOT_OID) + bytes([0x31]) + pkcs7._length(len(octets)) + octets
    attribute = bytes([0x30]) + pkcs7._length(len(body)) + body
    new = pkcs7._rewrap(der, attrs, der[attrs.header_end:attrs.end] + attribute)
    new = pkcs7._rewrap(der, signer, der[signer.header_end:attrs.start] + new + der[attrs.end:signer.end])
    replaced = signer
    for outer in reversed(path[:-1]):
        new = pkcs7._rewrap(der, outer, der[outer.header_end:replaced.start] + new + der[replaced.end:outer.end])
        replaced = outer
    sig.write_bytes(new)
    subprocess.run(["osslsigncode", "remove-signature", "-in", str(msi), "-out", str(unsigned)], check=True, capture_output=True)
    subprocess.run(["osslsigncode", "attach-signature", "-sigin", str(sig), "-CAfile", "/etc/ssl/certs/ca-certificates.crt",
                    "-in", str(unsigned), "-out", str(dest)], capture_output=True)
    assert dest.is_file()
    return dest


@pytest.fixture(scope="module")
def cases(releases, keys, dev_keys, tmp_path_factory):
    """name -> (commands, expect_enrolled_group or None). Made once, installed in parallel."""
    first, second = keys
    work = tmp_path_factory.mktemp("repoint-files")
    r1, r2 = releases["r1"], releases["r2"]
    now = int(time.time())
    good = oracle.sign(first, group_id="grp-genuine", token=TOKEN, console_url=f"https://{HOST}/e", issued_at=now)
    attacker_values = dict(group_id="grp-attacker", token="attacker-token-000000000000", console_url=ATTACKER)
    forged = {
        "unpinned-key": oracle.sign(second, issued_at=now, **attacker_values),
        "changed-byte": flip_in_payload(good),
        "expired": oracle.sign(first, group_id="grp-expired", token=TOKEN, console_url=f"https://{HOST}/e",
                               issued_at=now - 7200, expires_at=now - 3600),
        "host-not-pinned": oracle.sign(first, issued_at=now, **attacker_values),
    }
    win = winesupport.WinePrefix.winpath
    files: dict[str, tuple[list[str], str | None]] = {}

    def exe_cmd(path: Path) -> str:
        return f'"{win(path)}" /S'

    def msi_cmd(path: Path, *props: str) -> str:
        log = work / f"{path.stem}.log"
        return f'msiexec /i "{win(path)}" /qn {" ".join(props)} /l*v "{win(log)}"'.replace("  ", " ")

    genuine_exe = restamp(r1, "exe", good.encode(), work / "genuine.exe")
    genuine_tagged = restamp(r1, "msi", good.encode(), work / "genuine-tagged.msi")
    files["exe-genuine"] = ([exe_cmd(genuine_exe)], "grp-genuine")
    files["msi-tagged-genuine"] = ([msi_cmd(genuine_tagged)], "grp-genuine")
    for name, jws in forged.items():
        files[f"exe-{name}"] = ([exe_cmd(restamp(r1, "exe", jws.encode(), work / f"{name}.exe"))], None)
        files[f"msi-tagged-{name}"] = ([msi_cmd(restamp(r1, "msi", jws.encode(), work / f"{name}.msi"))], None)
    # A second enrollment after the PKCS#7, in the certificate table grown to cover it: the
    # old agents took the LAST magic in the file.
    appended = append_after_pkcs7(genuine_exe, encode_slot(forged["unpinned-key"].encode(), 1024), work / "appended.exe")
    files["exe-second-slot-appended"] = ([exe_cmd(appended)], None)
    files["msi-tagged-second-slot"] = ([msi_cmd(second_slot_msi(genuine_tagged, forged["unpinned-key"].encode(), work,
                                                                work / "second-slot.msi"))], None)
    # Key rotation: R2 pins both keys.
    rotated = oracle.sign(second, group_id="grp-rotated", token=TOKEN, console_url=f"https://{HOST}/", issued_at=now)
    files["exe-rotated-key-pinned"] = ([exe_cmd(restamp(r2, "exe", rotated.encode(), work / "rotated.exe"))], "grp-rotated")
    # The generic MSI and IT's command line: ENROLLMENT=<signed enrollment>.
    generic = work / "generic.msi"
    shutil.copyfile(r1.file("msi").path, generic)
    files["msi-generic-enrollment-property"] = ([msi_cmd(generic, f"ENROLLMENT={good}")], "grp-genuine")
    files["msi-generic-tampered-property"] = ([msi_cmd(generic, f"ENROLLMENT={flip_in_payload(good)}")], None)
    files["msi-generic-console-url"] = ([msi_cmd(genuine_tagged, f"CONSOLE_URL={ATTACKER}")], None)
    # A baked MSI (`stamp --format msi`: ENROLLMENT's default in the Property table, re-signed),
    # and what an admin's command line might add to it.
    signers = Signers(authenticode=SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key), verify_ca=dev_keys.ca_cert)
    baked_se = FileEnrollmentKey.from_private_key(first).sign(
        Enrollment(account_id="acct-1", group_id="grp-genuine", token=Secret(TOKEN), console_url=f"https://{HOST}/e"),
        r1.trust(), issued_at=now)
    baked = stamp.stamp(r1, "msi", baked_se, signers, work / "baked.msi").path
    files["msi-baked-genuine"] = ([msi_cmd(baked)], "grp-genuine")
    files["msi-baked-console-url"] = ([msi_cmd(baked, f"CONSOLE_URL={ATTACKER}")], None)
    files["msi-baked-tampered-property"] = ([msi_cmd(baked, f"ENROLLMENT={flip_in_payload(good)}")], None)
    # Over an existing install the old enrollment stays, and its service keeps running.
    files["exe-over-install"] = ([exe_cmd(genuine_exe), exe_cmd(work / "unpinned-key.exe")], "grp-genuine")
    files["msi-over-install"] = ([msi_cmd(generic, f"ENROLLMENT={good}"),
                                  msi_cmd(generic, f"ENROLLMENT={forged['unpinned-key']}")], "grp-genuine")
    return files, good


@pytest.fixture(scope="module")
def machines(wine_template, cases, tmp_path_factory) -> dict[str, Machine]:
    files, _ = cases
    work = tmp_path_factory.mktemp("repoint-wine")

    def one(name: str) -> Machine:
        folder = work / name
        folder.mkdir()
        return session(wine_template, folder, files[name][0])

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return dict(zip(files, pool.map(one, files)))


def masked(log: str) -> str:
    """An msiexec log fit to print: wine logs hidden properties too (ENROLLMENT holds the token)."""
    return re.sub(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", "<signed enrollment>", log).replace(TOKEN, "***")


def forged_se(files, name: str) -> str:
    """The ENROLLMENT=<SE> of the last command of case `name`."""
    return files[name][0][-1].split("ENROLLMENT=", 1)[1].split(" ", 1)[0]


def names(kind: str) -> list[str]:
    return [n for n in (
        "exe-genuine", "msi-tagged-genuine", "exe-rotated-key-pinned", "msi-generic-enrollment-property",
        "exe-unpinned-key", "msi-tagged-unpinned-key", "exe-changed-byte", "msi-tagged-changed-byte",
        "exe-expired", "msi-tagged-expired", "exe-host-not-pinned", "msi-tagged-host-not-pinned",
        "exe-second-slot-appended", "msi-tagged-second-slot", "msi-generic-tampered-property",
        "msi-generic-console-url", "exe-over-install", "msi-over-install", "msi-baked-genuine",
        "msi-baked-console-url", "msi-baked-tampered-property") if (kind == "good") == (
        n.endswith(("genuine", "pinned", "property")) and "tampered" not in n and "not-pinned" not in n)]


@pytest.mark.wine
@pytest.mark.parametrize("name", names("good"))
def test_genuine_installers_install_and_enroll(machines, cases, name):
    files, good = cases
    m = machines[name]
    assert m.rcs == [0], f"{name}: exit codes {m.rcs}\n{masked(m.log[-3000:])}"
    assert m.service_state == "RUNNING", f"{name}: service {m.service_state}"
    config = json.loads(m.config)
    payload = json.loads(base64.urlsafe_b64decode(config["enrollment"].split(".")[1] + "=="))
    assert payload["group_id"] == files[name][1] and payload["console_url"].startswith(f"https://{HOST}/")
    same = m.registry.get("Enrollment") == config["enrollment"]
    assert same, f"{name}: the registry's Enrollment is not the config's"
    left = bool(m.registry.get("PendingEnrollment"))
    assert not left, f"{name}: the staging value was left"


@pytest.mark.wine
@pytest.mark.parametrize("name", names("bad"))
def test_forged_installers_are_refused_and_leave_no_attacker_value(machines, cases, name):
    files, good = cases
    m = machines[name]
    over = len(files[name][0]) == 2
    last = m.rcs[-1]
    assert last not in (0, None), f"{name}: the forged installer exited {m.rcs}"
    if over:
        assert m.rcs[0] == 0, f"{name}: the genuine first install failed {m.rcs}"
        # The old enrollment stays, and its service runs on.
        same = json.loads(m.config)["enrollment"] == good and m.registry.get("Enrollment") == good
        assert same, f"{name}: the earlier enrollment was changed"
        assert m.service_state == "RUNNING", f"{name}: the earlier install's service is {m.service_state}"
    else:
        assert m.config == b"", f"{name}: an enrollment.json was written"
        written = bool(m.registry.get("Enrollment"))
        assert not written, f"{name}: an Enrollment value was written"
        assert m.service_state != "RUNNING", f"{name}: a service runs"
    pending = m.registry.get("PendingEnrollment")
    if name == "msi-over-install":
        # Observed with wine 8: after the failed maintenance install (msiexec /i of the installed
        # product), the refused value is back under PendingEnrollment although the agent deleted
        # it (Windows Installer's rollback of WriteRegistryValues would remove it). It is never
        # trusted: Enrollment and the config above are the earlier ones, enroll-from-registry
        # verifies whatever it finds, and the next install writes its own value before the agent runs.
        stale = pending in (None, "", forged_se(files, name))
        assert stale, f"{name}: PendingEnrollment holds something other than the refused enrollment"
    else:
        left = bool(pending)
        assert not left, f"{name}: the refused enrollment stayed in the registry"
    for value in ("attacker", "grp-attacker"):
        assert value not in m.registry_text and value.encode() not in m.config, f"{name}: {value} on disk"
