"""The enrollment slot against the real tools: mingw and wixl build, osslsigncode signs,
attaches and verifies, wine runs the stamped EXE.

A throwaway CA, code-signing certificate and TSA are made here with `cryptography`; the
signatures carry an RFC 3161 timestamp from osslsigncode's offline test TSA, so the slot is
shown to sit beside an existing unauthenticated attribute.
"""

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from asn1crypto import cms

from builder.binfmt import cfb, pe, tag
from builder.binfmt.pkcs7 import SLOT_OID, add_slot
from builder.binfmt.slot import SLOT_SIZE, encode_slot
from builder.errors import FormatError, SlotError
from tests.support import vendorpki

RFC3161_OID = "1.3.6.1.4.1.311.3.3.1"
PAYLOAD = json.dumps({"account": "acct-0001", "group": "group-0001",
                      "console": "https://console.example.com",
                      "token": "t" * 5000}).encode()
assert 5000 < len(PAYLOAD) <= 5 * 1024 + 200

WXS = """<?xml version="1.0" encoding="utf-8"?>
<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">
  <Product Id="{6B1C0E2A-3B1F-4C55-9E0B-6A3D2E1F0A11}" Name="Slot Test" Language="1033"
           Version="1.0.0" Manufacturer="Test" UpgradeCode="{0F3E5D7C-1A2B-4C3D-8E9F-A0B1C2D3E4F5}">
    <Package InstallerVersion="200" Compressed="yes" InstallScope="perMachine"/>
    <Media Id="1" Cabinet="data.cab" EmbedCab="yes"/>
    <Directory Id="TARGETDIR" Name="SourceDir">
      <Directory Id="ProgramFiles64Folder">
        <Directory Id="INSTALLDIR" Name="SlotTest">
          <Component Id="MainFile" Guid="{2C4D6E8F-0A1B-4C2D-9E3F-5A6B7C8D9E0F}" Win64="yes">
            <File Id="HelloTxt" Name="hello.txt" Source="hello.txt" KeyPath="yes"/>
          </Component>
        </Directory>
      </Directory>
    </Directory>
    <Feature Id="Main" Level="1">
      <ComponentRef Id="MainFile"/>
    </Feature>
  </Product>
</Wix>
"""


def run(*cmd, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert shutil.which(cmd[0]), f"{cmd[0]} is not installed (see RESEARCH.md for the package)"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def check(*cmd, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = run(*cmd, cwd=cwd)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    return vendorpki.make(tmp_path_factory.mktemp("pki"))


def sign(pki, src: Path, dst: Path) -> Path:
    check("osslsigncode", "sign", "-certs", pki.cert, "-key", pki.key, "-h", "sha256",
          "-TSA-certs", pki.tsa, "-TSA-key", pki.tsa_key, "-TSA-time", int(time.time()),
          "-in", src, "-out", dst)
    return dst


def verify(pki, path: Path) -> subprocess.CompletedProcess:
    return run("osslsigncode", "verify", "-CAfile", pki.ca, "-TSA-CAfile", pki.ca, "-in", path)


def slotted_signature(signed: Path) -> Path:
    sig = signed.with_suffix(".sig.der")
    check("osslsigncode", "extract-signature", "-in", signed, "-out", sig)
    slotted = signed.with_suffix(".slotted.der")
    slotted.write_bytes(add_slot(sig.read_bytes(), SLOT_SIZE))
    return slotted


@pytest.fixture(scope="module")
def exe(pki, tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("exe")
    (d / "hello.c").write_text(
        '#include <stdio.h>\nint main(void) { puts("hello from the stamped exe"); return 7; }\n')
    check("x86_64-w64-mingw32-gcc", "-O2", "-s", "-o", d / "unsigned.exe", d / "hello.c")
    signed = sign(pki, d / "unsigned.exe", d / "signed.exe")
    slotted = slotted_signature(signed)
    base = d / "base.exe"
    base.write_bytes(pe.with_signature(signed.read_bytes(), slotted.read_bytes(), "signed.exe"))
    return SimpleNamespace(dir=d, unsigned=d / "unsigned.exe", signed=signed, slotted=slotted,
                           base=base)


@pytest.fixture(scope="module")
def msi(pki, tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("msi")
    (d / "hello.txt").write_text("hello\n")
    (d / "product.wxs").write_text(WXS)
    proc = check("wixl", "-a", "x64", "-o", "unsigned.msi", "product.wxs", cwd=d)
    # wixl drops what it does not understand with only a warning (RESEARCH.md).
    assert "WARNING" not in proc.stderr and "CRITICAL" not in proc.stderr, proc.stderr
    signed = sign(pki, d / "unsigned.msi", d / "signed.msi")
    slotted = slotted_signature(signed)
    base = d / "base.msi"
    check("osslsigncode", "attach-signature", "-sigin", slotted, "-CAfile", pki.ca,
          "-TSA-CAfile", pki.ca, "-in", d / "unsigned.msi", "-out", base)
    return SimpleNamespace(dir=d, unsigned=d / "unsigned.msi", signed=signed, slotted=slotted,
                           base=base)


def stamp(base: Path, kind: str, out: Path, *, update_checksum: bool = True) -> Path:
    data = base.read_bytes()
    pieces = tag.stamp_pieces(len(data), tag.slot_extents(data, kind, base.name),
                              encode_slot(PAYLOAD, SLOT_SIZE),
                              tag.checksum_field(data, kind) if update_checksum else None)
    out.write_bytes(tag.apply_pieces(data, pieces))
    return out


def flip(path: Path, offset: int) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out = path.with_name("tampered-" + path.name)
    out.write_bytes(bytes(data))
    return out


def assert_verifies(pki, path: Path) -> str:
    proc = verify(pki, path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Signature verification: ok" in proc.stdout
    assert "Timestamp Server Signature verification: ok" in proc.stdout
    return proc.stdout


def unsigned_attribute_types(der: bytes) -> list[str]:
    info = cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    return [a["type"].dotted for a in info["unsigned_attrs"]]


def msi_table_stream(table: str) -> str:
    """The compound-file name Windows Installer gives a table's stream."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._"
    out, i = [chr(0x4840)], 0
    while i < len(table):
        first = alphabet.index(table[i])
        if i + 1 < len(table) and table[i + 1] in alphabet:
            out.append(chr(0x3800 + first + (alphabet.index(table[i + 1]) << 6)))
            i += 2
        else:
            out.append(chr(0x4800 + first))
            i += 1
    return "".join(out)


# EXE


def test_exe_base_verifies_with_the_timestamp_and_the_slot(pki, exe):
    out = assert_verifies(pki, exe.base)
    der = pe.pkcs7_of(exe.base.read_bytes())
    assert unsigned_attribute_types(der) == [RFC3161_OID, SLOT_OID]
    assert tag.read_slot(exe.base.read_bytes(), "exe") is None
    # osslsigncode prints one "PE checksum" line when the stored value is the one it computes.
    assert f"PE checksum   : {pe.pe_checksum(exe.base.read_bytes()):08X}" in out


def test_attach_signature_gives_the_same_exe_as_with_signature(pki, exe):
    attached = exe.dir / "attached.exe"
    check("osslsigncode", "attach-signature", "-sigin", exe.slotted, "-CAfile", pki.ca,
          "-TSA-CAfile", pki.ca, "-in", exe.unsigned, "-out", attached)
    assert attached.read_bytes() == exe.base.read_bytes()


def test_exe_stamp_verifies_and_reads_back(pki, exe, tmp_path):
    stamped = stamp(exe.base, "exe", tmp_path / "stamped.exe")
    data = stamped.read_bytes()
    assert len(data) == exe.base.stat().st_size
    assert tag.read_slot(data, "exe") == PAYLOAD
    out = assert_verifies(pki, stamped)
    assert "invalid PE checksum" not in out
    assert pe.parse(data).checksum == pe.pe_checksum(data)


def test_exe_stamp_with_a_stale_checksum_only_warns(pki, exe, tmp_path):
    # The evidence for updating the CheckSum per stamp: osslsigncode still passes the file
    # but prints a warning, which is noise in every support ticket.
    stamped = stamp(exe.base, "exe", tmp_path / "stale.exe", update_checksum=False)
    assert "Warning: invalid PE checksum" in assert_verifies(pki, stamped)


def test_exe_tampered_code_fails_verify(pki, exe, tmp_path):
    stamped = stamp(exe.base, "exe", tmp_path / "stamped.exe")
    data = stamped.read_bytes()
    pe_offset = struct.unpack_from("<I", data, 0x3C)[0]
    sections = pe_offset + 24 + struct.unpack_from("<H", data, pe_offset + 20)[0]
    name, _, _, raw_size, raw_pointer = struct.unpack_from("<8sIIII", data, sections)
    assert name.rstrip(b"\0") == b".text"
    proc = verify(pki, flip(stamped, raw_pointer + raw_size // 2))
    assert proc.returncode != 0 and "MISMATCH" in proc.stdout, proc.stdout


@pytest.mark.wine
def test_stamped_exe_runs_under_wine(exe, wine, tmp_path):
    stamped = stamp(exe.base, "exe", tmp_path / "stamped.exe")
    proc = wine.run(str(stamped))
    assert proc.returncode == 7, proc.stderr
    assert b"hello from the stamped exe" in proc.stdout


# MSI


def test_msi_base_verifies_with_the_timestamp_and_the_slot(pki, msi):
    assert_verifies(pki, msi.base)
    der = cfb.read_stream(msi.base.read_bytes(), tag.SIGNATURE_STREAM)
    assert der == msi.slotted.read_bytes()  # attach-signature carries the DER byte for byte
    assert unsigned_attribute_types(der) == [RFC3161_OID, SLOT_OID]
    assert tag.read_slot(msi.base.read_bytes(), "msi") is None


def test_msi_stamp_verifies_and_reads_back(pki, msi, tmp_path):
    stamped = stamp(msi.base, "msi", tmp_path / "stamped.msi")
    data = stamped.read_bytes()
    assert len(data) == msi.base.stat().st_size
    assert tag.read_slot(data, "msi") == PAYLOAD
    assert_verifies(pki, stamped)
    # msitools still reads the database.
    assert "ProductName\tSlot Test" in check("msiinfo", "export", stamped, "Property").stdout


def test_msi_tampered_table_fails_verify(pki, msi, tmp_path):
    stamped = stamp(msi.base, "msi", tmp_path / "stamped.msi")
    (offset, length), *_ = cfb.stream_extents(stamped.read_bytes(), msi_table_stream("Property"))
    proc = verify(pki, flip(stamped, offset + length // 2))
    assert proc.returncode != 0 and "MISMATCH" in proc.stdout, proc.stdout


# Errors on real files


def test_payload_too_large_for_the_slot(exe):
    with pytest.raises(SlotError, match="larger slot"):
        encode_slot(b"x" * SLOT_SIZE, SLOT_SIZE)


def test_signature_without_slot_raises_slot_error(exe, msi):
    with pytest.raises(SlotError):
        tag.slot_extents(exe.signed.read_bytes(), "exe")
    with pytest.raises(SlotError):
        tag.slot_extents(msi.signed.read_bytes(), "msi")


def test_wrong_kind_truncated_or_unsigned_raise_format_error(exe, msi):
    exe_data, msi_data = exe.base.read_bytes(), msi.base.read_bytes()
    for data, kind in ((msi_data, "exe"), (exe_data, "msi")):
        with pytest.raises(FormatError):
            tag.slot_extents(data, kind, "wrong kind")
    for data, kind in ((exe_data, "exe"), (msi_data, "msi")):
        for cut in (100, len(data) // 2, len(data) - 1):
            with pytest.raises(FormatError):
                tag.slot_extents(data[:cut], kind, "truncated")
    with pytest.raises(FormatError):
        tag.slot_extents(exe.unsigned.read_bytes(), "exe")
    with pytest.raises(FormatError):
        tag.slot_extents(msi.unsigned.read_bytes(), "msi")
