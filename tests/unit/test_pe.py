import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.binfmt import pe
from builder.errors import FormatError, VerificationError

E_LFANEW = 0x40


def reference_checksum(data: bytes, field: int) -> int:
    """CheckSumMappedFile, word by word: the CheckSum field as zero, an odd byte padded."""
    buf = bytearray(data)
    buf[field:field + 4] = bytes(4)
    if len(buf) % 2:
        buf.append(0)
    total = 0
    for (word,) in struct.iter_unpack("<H", buf):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total + len(data)


def win_certificate(der: bytes, revision: int = 0x0200, cert_type: int = 2) -> bytes:
    padding = -len(der) % 8
    return struct.pack("<IHH", 8 + len(der) + padding, revision, cert_type) + der + bytes(padding)


def make_pe(*, pe32plus: bool = True, text: bytes = b"\xc3" * 0x200, certs: bytes = b"",
            checksum: bool = True, rva_count: int = 16) -> bytes:
    """A hand-made PE: DOS header, PE header, one .text section, optional certificate table."""
    optional_size = (112 if pe32plus else 96) + 8 * rva_count
    headers = bytearray(0x200)
    headers[0:2] = b"MZ"
    struct.pack_into("<I", headers, 0x3C, E_LFANEW)
    struct.pack_into("<4sHHIIIHH", headers, E_LFANEW, b"PE\0\0", 0x8664 if pe32plus else 0x14C,
                     1, 0, 0, 0, optional_size, 0x22)
    opt = E_LFANEW + 24
    struct.pack_into("<H", headers, opt, 0x20B if pe32plus else 0x10B)
    struct.pack_into("<I", headers, opt + 60, 0x200)  # SizeOfHeaders
    struct.pack_into("<I", headers, opt + (108 if pe32plus else 92), rva_count)
    section = opt + optional_size
    struct.pack_into("<8sIIII", headers, section, b".text", len(text), 0x1000, len(text), 0x200)
    data = bytearray(headers + text)
    if certs:
        entry = opt + (112 if pe32plus else 96) + 32
        struct.pack_into("<II", data, entry, len(data), len(certs))
        data += certs
    if checksum:
        struct.pack_into("<I", data, opt + 64, reference_checksum(bytes(data), opt + 64))
    return bytes(data)


FAKE_PKCS7 = b"\x30\x82\x01\x00" + bytes(range(256))  # a DER SEQUENCE: all pe.py looks at


def test_parse_pe32_plus():
    data = make_pe(certs=win_certificate(FAKE_PKCS7))
    layout = pe.parse(data)
    assert layout.checksum_offset == E_LFANEW + 24 + 64
    assert layout.security_entry_offset == E_LFANEW + 24 + 112 + 32
    assert layout.cert_table_offset == 0x400
    assert layout.cert_table_size == len(data) - 0x400
    assert layout.checksum == reference_checksum(data, layout.checksum_offset)


def test_parse_pe32():
    layout = pe.parse(make_pe(pe32plus=False))
    assert layout.checksum_offset == E_LFANEW + 24 + 64
    assert layout.security_entry_offset == E_LFANEW + 24 + 96 + 32
    assert (layout.cert_table_offset, layout.cert_table_size) == (0, 0)


def test_pkcs7_of_strips_the_padding():
    data = make_pe(certs=win_certificate(FAKE_PKCS7 + b"\x00"))  # 261 bytes of DER + 0 pad
    assert pe.pkcs7_of(data) == FAKE_PKCS7
    assert pe.pkcs7_span(data) == (0x408, len(FAKE_PKCS7))


def test_a_second_certificate_entry_is_refused():
    # A second WIN_CERTIFICATE is a place for bytes no signature covers: agents refuse it.
    x509_entry = win_certificate(b"\x30\x03\x02\x01\x01", cert_type=1)
    data = make_pe(certs=x509_entry + win_certificate(FAKE_PKCS7))
    assert [c.cert_type for c in pe.certificates(data)] == [1, 2]
    with pytest.raises(VerificationError, match="2 WIN_CERTIFICATE entries"):
        pe.pkcs7_of(data)


def test_bytes_after_the_pkcs7_inside_win_certificate_are_refused():
    # The CVE-2013-3900 place: dwLength and the table grown over an appended blob.
    data = make_pe(certs=win_certificate(FAKE_PKCS7 + b"\0" * 16 + b"ENRSLOT1" + b"x" * 24))
    with pytest.raises(VerificationError, match="bytes after the PKCS#7"):
        pe.pkcs7_of(data)


def test_data_after_the_certificate_table_is_refused():
    data = make_pe(certs=win_certificate(FAKE_PKCS7)) + b"ENRSLOT1" + bytes(8)
    with pytest.raises(VerificationError, match="data after its certificate table"):
        pe.pkcs7_of(data)


def test_unsigned_pe_has_no_pkcs7():
    with pytest.raises(FormatError, match="no Authenticode signature"):
        pe.pkcs7_of(make_pe())


@pytest.mark.parametrize("size", [1, 7, 8, 4091])
def test_with_signature_rewrites_table_lengths_and_checksum(size):
    data = make_pe(certs=win_certificate(FAKE_PKCS7))
    new = b"\x30\x82" + (size).to_bytes(2, "big") + os.urandom(size)
    out = pe.with_signature(data, new)
    layout = pe.parse(out)
    assert out[:layout.checksum_offset] == data[:layout.checksum_offset]
    assert len(out) % 8 == 0
    assert layout.cert_table_offset == 0x400
    assert layout.cert_table_offset + layout.cert_table_size == len(out)
    (cert,) = pe.certificates(out)
    assert (cert.length, cert.revision, cert.cert_type) == (len(out) - 0x400, 0x0200, 2)
    assert out[cert.content_offset + len(new):] == bytes(-len(new) % 8)
    assert pe.pkcs7_of(out) == new
    assert layout.checksum == reference_checksum(out, layout.checksum_offset)
    assert pe.with_signature(out, FAKE_PKCS7) == pe.with_signature(data, FAKE_PKCS7)


def test_with_signature_keeps_the_hashed_bytes():
    data = make_pe(certs=win_certificate(FAKE_PKCS7))
    out = pe.with_signature(data, FAKE_PKCS7 + b"\x30\x00")  # trailing bytes kept verbatim
    layout = pe.parse(data)
    # Everything Authenticode hashes: all but CheckSum, the Security entry and the table.
    skip = [(layout.checksum_offset, 4), (layout.security_entry_offset, 8)]
    for offset, length in skip:
        data = data[:offset] + bytes(length) + data[offset + length:]
        out = out[:offset] + bytes(length) + out[offset + length:]
    assert out[:0x400] == data[:0x400]


def test_with_signature_refuses_unsigned_and_trailing_data():
    with pytest.raises(FormatError, match="not signed"):
        pe.with_signature(make_pe(), FAKE_PKCS7)
    signed = bytearray(make_pe(certs=win_certificate(FAKE_PKCS7)))
    struct.pack_into("<I", signed, pe.parse(signed).security_entry_offset + 4,
                     pe.parse(signed).cert_table_size - 8)
    with pytest.raises(FormatError, match="after its certificate table"):
        pe.with_signature(bytes(signed), FAKE_PKCS7)


def test_checksum_matches_reference_on_the_hand_made_pe():
    data = make_pe(certs=win_certificate(FAKE_PKCS7))
    assert pe.pe_checksum(data) == reference_checksum(data, E_LFANEW + 24 + 64)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.integers(0, 2990))
def test_checksum_matches_reference_on_any_bytes(body, field):
    data = b"MZ" + body
    field = min(field, max(len(data) - 4, 0))
    assert pe.pe_checksum(data, field) == reference_checksum(data, field)


def test_checksum_of_a_multiple_of_0xffff_is_0xffff_not_0():
    data = b"MZ" + (0xFFFF - 0x5A4D).to_bytes(2, "little") + bytes(12)
    assert reference_checksum(data, 8) == 0xFFFF + len(data)
    assert pe.pe_checksum(data, 8) == 0xFFFF + len(data)


def test_checksum_across_fold_chunks():
    data = b"MZ" + os.urandom(3 * (1 << 20) + 5)
    assert pe.pe_checksum(data, 0x99) == reference_checksum(data, 0x99)


def test_words_sum_of_odd_offset_piece():
    data = os.urandom(1001)
    whole = pe.words_sum(data)
    assert (pe.words_sum(data[:333]) + pe.words_sum(data[333:], 333)) % 0xFFFF == whole


def test_names_the_file_when_not_a_pe():
    with pytest.raises(FormatError, match="setup.msi is not a PE file"):
        pe.parse(b"\xd0\xcf\x11\xe0" + bytes(600), "setup.msi")


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 0x40 + 30, 0x40 + 24 + 100])
def test_truncated_headers_raise_format_error(cut):
    with pytest.raises(FormatError):
        pe.parse(make_pe()[:cut], "x.exe")


def test_truncated_certificate_table_raises_format_error():
    data = make_pe(certs=win_certificate(FAKE_PKCS7))
    with pytest.raises(FormatError, match="truncated"):
        pe.parse(data[:-1], "x.exe")
    with pytest.raises(FormatError, match="truncated"):
        pe.pkcs7_of(data[:0x410], "x.exe")


@pytest.mark.parametrize("patch", [
    (E_LFANEW, b"PX\0\0"),  # PE signature
    (E_LFANEW + 24, b"\x07\x01"),  # optional header magic (ROM image)
    (0x3C, b"\xff\xff\xff\x7f"),  # e_lfanew far past the end
])
def test_corrupt_headers_raise_format_error(patch):
    data = bytearray(make_pe())
    offset, raw = patch
    data[offset:offset + len(raw)] = raw
    with pytest.raises(FormatError):
        pe.parse(bytes(data))


def test_too_few_data_directories_raise_format_error():
    with pytest.raises(FormatError, match="Security data directory"):
        pe.parse(make_pe(rva_count=4))


def test_corrupt_certificate_entries_raise_format_error():
    data = bytearray(make_pe(certs=win_certificate(FAKE_PKCS7)))
    struct.pack_into("<I", data, 0x400, 4)  # dwLength shorter than its own header
    with pytest.raises(FormatError):
        pe.certificates(bytes(data))
    struct.pack_into("<I", data, 0x400, 0x10000)  # longer than the table
    with pytest.raises(FormatError):
        pe.pkcs7_of(bytes(data))
