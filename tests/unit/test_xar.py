"""xar writer and reader, checked with 7z, bsdtar and (for signatures) apple-platform-py."""

from __future__ import annotations

import hashlib
import random
import subprocess
import zlib
from pathlib import Path

import apple_platform as ap
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from builder.binfmt import xar
from builder.errors import FormatError

EPOCH = 1_700_000_000


def run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, check=True).stdout.decode()


@pytest.fixture
def members(tmp_path: Path) -> list[tuple[str, object]]:
    payload = tmp_path / "Payload"
    payload.write_bytes(random.Random(3).randbytes(300_000))
    return [
        ("Distribution", b'<?xml version="1.0"?><installer-gui-script minSpecVersion="2"/>'),
        ("agent.pkg/PackageInfo", b"<pkg-info/>"),
        ("agent.pkg/Bom", b"BOMStore" + bytes(100)),
        ("agent.pkg/Payload", payload),  # streamed from disk
        ("agent.pkg/Scripts", b""),
        ("Resources/en.lproj/Welcome & <more>.txt", "héllo".encode()),
    ]


def content(data) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else bytes(data)


FILES = ["Distribution", "agent.pkg/PackageInfo", "agent.pkg/Bom", "agent.pkg/Payload",
         "agent.pkg/Scripts", "Resources/en.lproj/Welcome & <more>.txt"]


def write(tmp_path: Path, members, name="agent.pkg", epoch=EPOCH) -> Path:
    path = tmp_path / name
    with open(path, "wb") as out:
        xar.write_xar(out, members, epoch=epoch)
    return path


def test_7z_lists_and_extracts_byte_identical(tmp_path, members):
    pkg = write(tmp_path, members)
    listing = run("7z", "l", "-slt", str(pkg))
    assert "Type = Xar" in listing
    listed = [line[len("Path = "):] for line in listing.splitlines() if line.startswith("Path = ")]
    assert set(FILES) | {"agent.pkg", "Resources", "Resources/en.lproj"} <= set(listed)
    out = tmp_path / "x7"
    run("7z", "x", "-y", f"-o{out}", str(pkg))
    for name, data in members:
        assert (out / name).read_bytes() == content(data), name


def test_bsdtar_lists_and_extracts_byte_identical(tmp_path, members):
    pkg = write(tmp_path, members)
    names = run("bsdtar", "-tf", str(pkg)).splitlines()
    assert names == ["Distribution", "agent.pkg", *FILES[1:5], "Resources",
                     "Resources/en.lproj", FILES[5]]
    out = tmp_path / "xb"
    out.mkdir()
    run("bsdtar", "-xf", str(pkg), "-C", str(out))
    for name, data in members:
        assert (out / name).read_bytes() == content(data), name
    assert int((out / "Distribution").stat().st_mtime) == EPOCH


def test_deterministic(tmp_path, members):
    first = write(tmp_path, members, "a.pkg").read_bytes()
    second = write(tmp_path, members, "b.pkg").read_bytes()
    assert first == second
    as_bytes = [(name, content(data)) for name, data in members]
    assert xar.build_xar(as_bytes, epoch=EPOCH) == first
    assert xar.build_xar(as_bytes, epoch=EPOCH + 60) != first


def test_header_and_toc_layout(tmp_path, members):
    data = write(tmp_path, members).read_bytes()
    magic, header_size, version, toc_size, toc_plain, alg = xar.HEADER.unpack(data[:28])
    assert (magic, header_size, version, alg) == (b"xar!", 28, 1, 1)
    toc = zlib.decompress(data[28:28 + toc_size])
    assert len(toc) == toc_plain
    assert data[28 + toc_size:28 + toc_size + 20] == hashlib.sha1(data[28:28 + toc_size]).digest()
    assert b"<creation-time>2023-11-14T22:13:20</creation-time>" in toc
    assert toc.count(b'<encoding style="application/octet-stream"') == len(FILES)
    assert b"Welcome &amp; &lt;more&gt;.txt" in toc


def test_reader_round_trip(tmp_path, members):
    pkg = write(tmp_path, members)
    with xar.read_xar(pkg) as archive:
        assert archive.creation_time == "2023-11-14T22:13:20"
        assert archive.names() == ["Distribution", "agent.pkg", *FILES[1:5], "Resources",
                                   "Resources/en.lproj", FILES[5]]
        assert archive.member("agent.pkg").type == "directory"
        offset = 20  # after the TOC checksum
        for name, data in members:
            member = archive.member(name)
            expected = content(data)
            assert (member.offset, member.length, member.size) == (offset, len(expected),
                                                                   len(expected))
            assert member.extracted_checksum == ("sha1", hashlib.sha1(expected).hexdigest())
            assert archive.read(name) == expected
            offset += len(expected)
        assert archive.signature is None and archive.x_signature is None
        assert archive.stored_toc_checksum == xar.toc_checksum(pkg.read_bytes())
    with pytest.raises(FormatError, match="no <signature>"):
        xar.signature_bytes(pkg.read_bytes())


def test_reader_decodes_zlib_members():
    # Apple's tools store small members zlib-compressed ("application/x-gzip"); forge one by
    # rewriting our TOC, then fix up the checksum as a real writer would.
    plain = b"<pkg-info>" * 50
    data = xar.build_xar([("PackageInfo", plain)], epoch=EPOCH)
    toc_size = xar.HEADER.unpack(data[:28])[3]
    packed = zlib.compress(plain)
    toc = zlib.decompress(data[28:28 + toc_size]).decode()
    toc = toc.replace('style="application/octet-stream"', 'style="application/x-gzip"')
    toc = toc.replace(f"<length>{len(plain)}</length>", f"<length>{len(packed)}</length>")
    archived = hashlib.sha1(plain).hexdigest()
    toc = toc.replace(f'<archived-checksum style="sha1">{archived}',
                      f'<archived-checksum style="sha1">{hashlib.sha1(packed).hexdigest()}')
    new_toc = zlib.compress(toc.encode())
    forged = (xar.HEADER.pack(b"xar!", 28, 1, len(new_toc), len(toc.encode()), 1) + new_toc
              + hashlib.sha1(new_toc).digest() + packed)
    assert xar.read_xar(forged).read("PackageInfo") == plain


def test_signed_package_exposes_signature(tmp_path, members):
    pkg = write(tmp_path, members)
    cert = ap.certificates.generate_self_signed("Unit Test", profile="developer-id-installer",
                                                team_id="ABCDE12345")
    p12 = tmp_path / "signer.p12"
    p12.write_bytes(cert.to_p12("pw"))
    signed = tmp_path / "signed.pkg"
    ap.sign(pkg, signed, signer=ap.Signer(p12=ap.P12Key(path=p12, password="pw")),
            timestamp_url="none")
    data = signed.read_bytes()
    archive = xar.read_xar(data, name="signed.pkg")
    assert archive.signature is not None and archive.signature.style == "RSA"
    assert (archive.signature.offset, archive.signature.size) == (20, 256)
    assert archive.x_signature is not None and archive.x_signature.style == "CMS"
    leaf = x509.load_der_x509_certificate(archive.signature.certificates_der[0])
    assert leaf == x509.load_pem_x509_certificate(cert.certificate_pem.encode())
    digest = xar.toc_checksum(data)
    assert digest == hashlib.sha1(archive.toc_compressed).digest()
    # rcodesign signs the 20-byte digest as a message with SHA-256 (see xar.toc_checksum).
    leaf.public_key().verify(xar.signature_bytes(data), digest, padding.PKCS1v15(),
                             hashes.SHA256())
    for name, member in members:
        assert archive.read(name) == content(member), name


def test_truncated(tmp_path, members):
    data = write(tmp_path, members).read_bytes()
    with pytest.raises(FormatError, match=r"agent\.pkg: truncated: member 'agent\.pkg/Payload'"):
        xar.read_xar(data[:len(data) - 100], name="agent.pkg")
    with pytest.raises(FormatError, match=r"agent\.pkg: truncated xar header: 10 of 28"):
        xar.read_xar(data[:10], name="agent.pkg")
    toc_size = xar.HEADER.unpack(data[:28])[3]
    with pytest.raises(FormatError, match=r"agent\.pkg: truncated: the compressed TOC"):
        xar.read_xar(data[:28 + toc_size // 2], name="agent.pkg")


def test_truncated_file_on_disk_names_the_path(tmp_path, members):
    pkg = write(tmp_path, members)
    pkg.write_bytes(pkg.read_bytes()[:-1])
    with pytest.raises(FormatError, match=str(pkg)):
        xar.read_xar(pkg)


def test_wrong_magic(tmp_path, members):
    data = write(tmp_path, members).read_bytes()
    with pytest.raises(FormatError, match=r"bad\.pkg: bad magic b'PK\\x03\\x04'"):
        xar.read_xar(b"PK\x03\x04" + data[4:], name="bad.pkg")


def test_corrupted_toc_checksum(tmp_path, members):
    data = bytearray(write(tmp_path, members).read_bytes())
    heap = 28 + xar.HEADER.unpack(data[:28])[3]
    data[heap + 5] ^= 0xFF
    with pytest.raises(FormatError, match=r"agent\.pkg: TOC checksum mismatch"):
        xar.toc_checksum(bytes(data), name="agent.pkg")


def test_corrupted_toc(tmp_path, members):
    data = bytearray(write(tmp_path, members).read_bytes())
    data[40] ^= 0xFF
    with pytest.raises(FormatError, match=r"agent\.pkg: TOC (does not inflate|inflates)"):
        xar.read_xar(bytes(data), name="agent.pkg")


def test_corrupted_member_fails_its_checksum(tmp_path, members):
    data = bytearray(write(tmp_path, members).read_bytes())
    archive = xar.read_xar(bytes(data))
    member = archive.member("agent.pkg/Payload")
    data[archive.heap_start + member.offset + 1000] ^= 0x01
    damaged = xar.read_xar(bytes(data), name="agent.pkg")
    assert damaged.read("Distribution") == members[0][1]
    with pytest.raises(FormatError, match=r"'agent\.pkg/Payload': archived-checksum mismatch"):
        damaged.read("agent.pkg/Payload")


def test_unknown_member_is_named(tmp_path, members):
    archive = xar.read_xar(write(tmp_path, members))
    with pytest.raises(FormatError, match="no member 'agent.pkg/Nope'"):
        archive.read("agent.pkg/Nope")
    archive.close()


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "./a"])
def test_bad_member_names(name):
    with pytest.raises(FormatError, match="not a relative path"):
        xar.build_xar([(name, b"x")], epoch=EPOCH)


def test_clashing_members():
    with pytest.raises(FormatError, match="clashes"):
        xar.build_xar([("a/b", b"x"), ("a", b"y")], epoch=EPOCH)
    with pytest.raises(FormatError, match="clashes"):
        xar.build_xar([("a", b"y"), ("a/b", b"x")], epoch=EPOCH)
    with pytest.raises(FormatError, match="clashes"):
        xar.build_xar([("a", b"y"), ("a", b"x")], epoch=EPOCH)


def test_str_content_is_refused():
    with pytest.raises(TypeError, match="pathlib.Path"):
        xar.build_xar([("a", "some/path")], epoch=EPOCH)
