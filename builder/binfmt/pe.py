"""The parts of a PE (Windows .exe) file that Authenticode signing touches.

Offsets are file offsets. The Security data directory entry holds a file offset (not an RVA)
and the size of the attribute certificate table, which signing tools put at the end of the
file. Each WIN_CERTIFICATE is dwLength (header included), wRevision, wCertificateType and the
PKCS#7 DER, padded with zeros to a multiple of 8 bytes.

Every function takes the file's bytes (bytes, bytearray, memoryview or mmap) and a `name`
used only in error messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from builder.binfmt.pkcs7 import element_size
from builder.errors import FormatError, VerificationError

WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
_SECURITY_DIRECTORY = 4
_PE32, _PE32_PLUS = 0x10B, 0x20B


@dataclass(frozen=True)
class PeLayout:
    checksum_offset: int  # of the optional header's CheckSum (uint32)
    checksum: int  # the value stored there
    security_entry_offset: int  # of the Security IMAGE_DATA_DIRECTORY entry (offset, size)
    cert_table_offset: int  # 0 when the file is not signed
    cert_table_size: int


@dataclass(frozen=True)
class WinCertificate:
    offset: int  # of the WIN_CERTIFICATE header
    length: int  # dwLength: header, certificate and (as signing tools write it) padding
    revision: int
    cert_type: int

    @property
    def content_offset(self) -> int:
        return self.offset + 8


def _truncated(name: str, what: str) -> FormatError:
    return FormatError(f"{name} is truncated: its {what} runs past the end of the file",
                       hint="download or copy the file again")


def parse(data, name: str = "the input") -> PeLayout:
    size = len(data)
    if size < 64 or bytes(data[:2]) != b"MZ":
        raise FormatError(f"{name} is not a PE file (no MZ header)",
                          hint="pass a Windows .exe")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 24 > size:
        raise _truncated(name, "PE header") if pe < 1 << 24 else FormatError(
            f"{name} is not a PE file (bad PE header offset)", hint="pass a Windows .exe")
    if bytes(data[pe:pe + 4]) != b"PE\0\0":
        raise FormatError(f"{name} is not a PE file (no PE signature)",
                          hint="pass a Windows .exe, not a DOS program")
    optional_size = struct.unpack_from("<H", data, pe + 20)[0]
    opt = pe + 24
    if opt + 2 > size:
        raise _truncated(name, "optional header")
    magic = struct.unpack_from("<H", data, opt)[0]
    if magic not in (_PE32, _PE32_PLUS):
        raise FormatError(f"{name} has an unknown optional header magic 0x{magic:04x}",
                          hint="pass a PE32 or PE32+ Windows .exe")
    count_at, directories = (opt + 92, opt + 96) if magic == _PE32 else (opt + 108, opt + 112)
    entry = directories + 8 * _SECURITY_DIRECTORY
    if entry + 8 > opt + optional_size:
        raise FormatError(f"{name} has no Security data directory (its optional header is short)")
    if entry + 8 > size:
        raise _truncated(name, "optional header")
    if struct.unpack_from("<I", data, count_at)[0] <= _SECURITY_DIRECTORY:
        raise FormatError(f"{name} has no Security data directory (NumberOfRvaAndSizes < 5)")
    table, table_size = struct.unpack_from("<II", data, entry)
    if (table == 0) != (table_size == 0):
        raise FormatError(f"{name} has a corrupt Security data directory")
    if table + table_size > size:
        raise _truncated(name, "certificate table")
    checksum_offset = opt + 64
    return PeLayout(checksum_offset, struct.unpack_from("<I", data, checksum_offset)[0],
                    entry, table, table_size)


def certificates(data, name: str = "the input") -> list[WinCertificate]:
    """The WIN_CERTIFICATE entries of the certificate table, in file order."""
    layout = parse(data, name)
    out: list[WinCertificate] = []
    pos, end = layout.cert_table_offset, layout.cert_table_offset + layout.cert_table_size
    while pos < end:
        if pos + 8 > end:
            raise FormatError(f"{name} has a corrupt certificate table (a header is cut short)")
        length, revision, cert_type = struct.unpack_from("<IHH", data, pos)
        if length < 8 or pos + length > end:
            raise FormatError(f"{name} has a corrupt certificate table (dwLength {length})")
        out.append(WinCertificate(pos, length, revision, cert_type))
        pos += (length + 7) & ~7
    return out


def pkcs7_span(data, name: str = "the input") -> tuple[int, int]:
    """(file offset, length) of the Authenticode PKCS#7 DER, without the padding after it.

    Strict, as the agents read it: one WIN_CERTIFICATE, the certificate table last in the file,
    and after the DER nothing but the zero padding to an 8-byte boundary. Bytes anywhere else
    are what CVE-2013-3900 abuse hides there (a second enrollment, a MeshCentral-style config).
    """
    layout = parse(data, name)
    found = certificates(data, name)
    signed = [c for c in found if (c.revision, c.cert_type) == (WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA)]
    if not signed:
        raise FormatError(f"{name} has no Authenticode signature", hint="sign it first")
    if len(found) != 1:
        raise VerificationError(f"{name} has {len(found)} WIN_CERTIFICATE entries; a signed installer has one",
                                hint="the file was altered after signing: do not use it")
    if layout.cert_table_offset + layout.cert_table_size != len(data):
        raise VerificationError(f"{name} has data after its certificate table",
                                hint="the file was altered after signing: do not use it")
    cert = signed[0]
    der_size = element_size(memoryview(data)[cert.content_offset:cert.offset + cert.length])
    tail = bytes(data[cert.content_offset + der_size:cert.offset + cert.length])
    if len(tail) > 7 or any(tail) or layout.cert_table_size != (cert.length + 7) & ~7:
        raise VerificationError(f"{name} has {len(tail)} bytes after the PKCS#7 signature inside its WIN_CERTIFICATE",
                                hint="the file was altered after signing: do not use it")
    return cert.content_offset, der_size


def pkcs7_of(data, name: str = "the input") -> bytes:
    offset, length = pkcs7_span(data, name)
    return bytes(data[offset:offset + length])


def with_signature(data, pkcs7_der: bytes, name: str = "the input") -> bytes:
    """`data` with its certificate table replaced by one WIN_CERTIFICATE holding `pkcs7_der`.

    The Authenticode hash excludes the CheckSum, the Security entry and the table itself, so
    the signature made over `data` stays valid. Only an already signed file is accepted: the
    table must be the last thing in the file, where signing tools put it.
    """
    layout = parse(data, name)
    if layout.cert_table_offset == 0:
        raise FormatError(f"{name} is not signed",
                          hint="sign it first; with_signature replaces an existing signature")
    if layout.cert_table_offset + layout.cert_table_size != len(data):
        raise FormatError(f"{name} has data after its certificate table",
                          hint="remove the trailing data and sign the file again")
    padding = -len(pkcs7_der) % 8
    length = 8 + len(pkcs7_der) + padding  # padding included, as osslsigncode and signtool do
    out = bytearray(data[:layout.cert_table_offset])
    out += struct.pack("<IHH", length, WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA)
    out += pkcs7_der
    out += bytes(padding)
    struct.pack_into("<II", out, layout.security_entry_offset, layout.cert_table_offset, length)
    struct.pack_into("<I", out, layout.checksum_offset, pe_checksum(out, layout.checksum_offset))
    return bytes(out)


_CHUNK = 1 << 16  # even, so every chunk starts on a word boundary; small enough for the cache


def words_sum(data, offset: int = 0) -> int:
    """Sum of the little-endian 16-bit words of `data` (a piece starting at file offset
    `offset`), modulo 0xFFFF.

    Because 2**16 == 1 (mod 0xFFFF), a piece read as one little-endian integer is congruent to
    the sum of its words, so each chunk is one int.from_bytes and one remainder by a small
    divisor, both in C: several times faster than summing memoryview.cast("H") on 30 MB.
    """
    view = memoryview(data).cast("B")
    total = sum(int.from_bytes(view[i:i + _CHUNK], "little") % 0xFFFF
                for i in range(0, len(view), _CHUNK)) % 0xFFFF
    # A piece at an odd file offset has its bytes in the other half of each word.
    return total * 0x100 % 0xFFFF if offset & 1 else total


def fold_checksum(word_sum: int, file_size: int, all_zero: bool = False) -> int:
    """The CheckSum from the words' sum (mod 0xFFFF, CheckSum field excluded) and the size.

    The reference algorithm adds words with end-around carry, which gives the sum modulo 0xFFFF
    except that a nonzero total that is a multiple of 0xFFFF comes out as 0xFFFF; only words
    that are all zero give 0. (A PE starts with "MZ", so its words never are.)
    """
    folded = word_sum % 0xFFFF or (0 if all_zero else 0xFFFF)
    return (folded + file_size) & 0xFFFFFFFF


def pe_checksum(data, checksum_offset: int | None = None) -> int:
    """The optional header CheckSum of `data` as Windows' CheckSumMappedFile computes it.

    16-bit little-endian words (an odd last byte padded with zero), the CheckSum field counted
    as zero, added with end-around carry into 16 bits, plus the file size. osslsigncode differs
    only on files of odd size (it drops the last byte); signed files are a multiple of 8.
    """
    if checksum_offset is None:
        checksum_offset = parse(data).checksum_offset
    view = memoryview(data).cast("B")
    end = checksum_offset + 4
    total = words_sum(view) - words_sum(view[checksum_offset:end], checksum_offset)
    all_zero = total % 0xFFFF == 0 and not (any(view[:checksum_offset]) or any(view[end:]))
    return fold_checksum(total, len(view), all_zero)
