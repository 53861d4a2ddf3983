"""Real signed installers with an enrollment slot, and the attacks on them, for the agents' tests.

A base is made once: a PE (any .exe, e.g. the test agent itself) or a tiny wixl MSI, signed
with osslsigncode through builder's signing code, with an empty slot added as a release adds
it. A stamp is builder's own stamp (tag.stamp_pieces), so the agents read what builder writes.
The SEs stamped in come from tests/support/signed.py, not from builder.

The attacks keep the Authenticode signature as Windows checks it (the hash skips the
certificate table): that is why an agent must read the slot only where builder put it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from builder.binfmt import cfb, pe, pkcs7, tag
from builder.binfmt.slot import SLOT_SIZE, encode_slot
from builder.signing import authenticode
from builder.signing.authenticode import SigningKey

_WXS = """<?xml version="1.0" encoding="utf-8"?>
<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">
  <Product Id="{7A1C0E2A-3B1F-4C55-9E0B-6A3D2E1F0A12}" Name="Enrollment Test" Language="1033"
           Version="1.0.0" Manufacturer="Test" UpgradeCode="{1F3E5D7C-1A2B-4C3D-8E9F-A0B1C2D3E4F6}">
    <Package InstallerVersion="200" Compressed="yes" InstallScope="perMachine"/>
    <Media Id="1" Cabinet="data.cab" EmbedCab="yes"/>
    <Directory Id="TARGETDIR" Name="SourceDir">
      <Directory Id="ProgramFiles64Folder">
        <Directory Id="INSTALLDIR" Name="EnrollmentTest">
          <Component Id="MainFile" Guid="{3C4D6E8F-0A1B-4C2D-9E3F-5A6B7C8D9E10}" Win64="yes">
            <File Id="HelloTxt" Name="hello.txt" Source="hello.txt" KeyPath="yes"/>
          </Component>
        </Directory>
      </Directory>
    </Directory>
    <Feature Id="Main" Level="1"><ComponentRef Id="MainFile"/></Feature>
  </Product>
</Wix>
"""


def signing_key(dev_keys) -> SigningKey:
    return SigningKey(cert=dev_keys.sign_cert, key=dev_keys.sign_key)


def slotted_exe(dev_keys, exe: Path, out: Path) -> Path:
    """`exe` signed, with an empty slot in its PKCS#7, as `out`."""
    signed = out.with_name("signed-" + out.name)
    authenticode.sign(signing_key(dev_keys), exe, signed)
    authenticode.add_enrollment_slot(signed, out, "exe", SLOT_SIZE)
    signed.unlink()
    return out


def slotted_msi(dev_keys, work: Path, out: Path, min_slack: int = 64) -> Path:
    """A tiny MSI built with wixl, signed, with an empty slot, as `out`.

    The slot's size is chosen (a multiple of 8 near SLOT_SIZE) so that the signature stream's
    last sector has at least `min_slack` unused bytes: room for `trailing_in_signature_stream`.
    """
    assert shutil.which("wixl"), "install wixl (Debian: apt-get install wixl)"
    work.mkdir(parents=True, exist_ok=True)
    (work / "hello.txt").write_text("hello\n")
    (work / "test.wxs").write_text(_WXS)
    unsigned = work / "unsigned.msi"
    built = subprocess.run(["wixl", "-a", "x64", "-o", str(unsigned), "test.wxs"], cwd=work,
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0 and unsigned.is_file(), built.stderr
    signed = work / "signed.msi"
    authenticode.sign(signing_key(dev_keys), unsigned, signed)
    size = SLOT_SIZE
    authenticode.add_enrollment_slot(signed, out, "msi", size)
    slack = _signature_slack(out.read_bytes())
    if slack < min_slack:  # grow the slot into the slack: the stream then ends near a sector's start
        out.unlink()
        authenticode.add_enrollment_slot(signed, out, "msi", size + (slack - min_slack) // 8 * 8 + 512)
    assert _signature_slack(out.read_bytes()) >= min_slack
    return out


_SIGNATURE_STREAM = "\x05DigitalSignature"


def _signature_slack(data: bytes) -> int:
    """Unused bytes in the last sector of the MSI's signature stream."""
    offset, length = cfb.stream_extents(data, _SIGNATURE_STREAM)[-1]
    sector_size = 1 << struct.unpack_from("<H", data, 30)[0]
    return -(offset + length) % sector_size


def trailing_in_signature_stream(data: bytes, extra: bytes) -> bytes:
    """The MSI with `extra` after the PKCS#7 inside its signature stream: the stream's size in
    its directory entry grown over bytes written into its last sector's slack."""
    assert len(extra) <= _signature_slack(data)
    entry = data.index(_SIGNATURE_STREAM.encode("utf-16-le") + b"\0\0")  # the directory entry's name
    size = struct.unpack_from("<I", data, entry + 120)[0]
    offset, length = cfb.stream_extents(data, _SIGNATURE_STREAM)[-1]
    out = bytearray(data)
    out[offset + length:offset + length + len(extra)] = extra
    struct.pack_into("<I", out, entry + 120, size + len(extra))
    assert cfb.read_stream(bytes(out), _SIGNATURE_STREAM) == cfb.read_stream(data, _SIGNATURE_STREAM) + extra
    return bytes(out)


def stamp(base: Path, kind: str, payload: bytes) -> bytes:
    """`base` with `payload` (an SE's ASCII, or b"" for an empty slot) stamped as builder does."""
    data = base.read_bytes()
    extents = tag.slot_extents(data, kind, base.name)
    size = sum(n for _, n in extents)
    pieces = tag.stamp_pieces(len(data), extents, encode_slot(payload, size), tag.checksum_field(data, kind))
    return tag.apply_pieces(data, pieces)


def _with_table(data: bytes, table: bytes) -> bytes:
    """`data` (a signed PE) with its certificate table replaced by `table`, the directory to match."""
    layout = pe.parse(data)
    out = bytearray(data[:layout.cert_table_offset]) + table
    struct.pack_into("<II", out, layout.security_entry_offset, layout.cert_table_offset, len(table))
    struct.pack_into("<I", out, layout.checksum_offset, pe.pe_checksum(out, layout.checksum_offset))
    return bytes(out)


def _win_certificate(der: bytes, tail: bytes = b"") -> bytes:
    body = der + tail
    body += bytes(-(8 + len(body)) % 8)
    return struct.pack("<IHH", 8 + len(body), pe.WIN_CERT_REVISION_2_0, pe.WIN_CERT_TYPE_PKCS_SIGNED_DATA) + body


def appended_in_certificate(stamped: bytes, payload: bytes) -> bytes:
    """CVE-2013-3900 style: a second slot after the PKCS#7 inside the WIN_CERTIFICATE, with
    dwLength and the security directory grown to cover it (MeshCentral's .msh trick)."""
    return _with_table(stamped, _win_certificate(pe.pkcs7_of(stamped), encode_slot(payload, SLOT_SIZE)))


def second_certificate(stamped: bytes, payload: bytes) -> bytes:
    """A second WIN_CERTIFICATE after the first, carrying a slot, inside the table."""
    layout = pe.parse(stamped)
    table = stamped[layout.cert_table_offset:]
    return _with_table(stamped, table + _win_certificate(b"\x30\x00", encode_slot(payload, SLOT_SIZE)))


def after_table(stamped: bytes, payload: bytes) -> bytes:
    """A slot appended to the file, after the certificate table (which no longer ends the file)."""
    return stamped + encode_slot(payload, SLOT_SIZE)


def second_slot_attribute(stamped: bytes, payload: bytes) -> bytes:
    """A second slot attribute in the SignerInfo's unauthenticated attributes, holding `payload`.

    builder refuses to add a slot twice, so the first slot's OID is renamed for a moment (same
    length), builder adds a fresh slot, and the name is put back: every length stays right.
    """
    der = pe.pkcs7_of(stamped)
    oid = pkcs7.oid_der(pkcs7.SLOT_OID)
    decoy = oid[:-1] + bytes([oid[-1] ^ 0x7F])
    assert der.count(oid) == 1 and decoy not in der
    doubled = pkcs7.add_slot(der.replace(oid, decoy), SLOT_SIZE).replace(decoy, oid)
    offset, length = _second_slot_span(doubled, oid)
    doubled = doubled[:offset] + encode_slot(payload, length) + doubled[offset + length:]
    return pe.with_signature(stamped, doubled)


def _second_slot_span(der: bytes, oid: bytes) -> tuple[int, int]:
    """(offset, length) of the second slot's OCTET STRING contents (the one add_slot appended)."""
    at = der.rindex(oid) + len(oid)
    assert der[at] == 0x31  # SET
    at += 2 + (der[at + 1] & 0x7F if der[at + 1] & 0x80 else 0)
    assert der[at] == 0x04  # OCTET STRING
    count = der[at + 1] & 0x7F if der[at + 1] & 0x80 else 0
    length = int.from_bytes(der[at + 2:at + 2 + count], "big") if count else der[at + 1]
    return at + 2 + count, length
