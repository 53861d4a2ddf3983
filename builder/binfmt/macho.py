"""Pure parsers for Apple code signatures: Mach-O slices and LC_CODE_SIGNATURE, the SuperBlob,
the CodeDirectory, and the code signature a UDIF (DMG) koly trailer points at. Bytes in,
values out; builder/signing/apple/ signs and verifies with them."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Iterator

from builder.errors import FormatError



MH_EXECUTE = 2  # mach_header.filetype of an executable
_LC_CODE_SIGNATURE = 0x1D
MACHO_MAGICS = (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xfe\xed\xfa\xce")
FAT_MAGIC = b"\xca\xfe\xba\xbe"
FAT_MAGIC_64 = b"\xca\xfe\xba\xbf"
SUPERBLOB_MAGIC = 0xFADE0CC0
_CODEDIRECTORY_MAGIC = 0xFADE0C02
CMS_SLOT = 0x10000
CS_RUNTIME = 0x10000  # CodeDirectory flag: hardened runtime
_CD_HASHES = {1: ("sha1", 20), 2: ("sha256", 32), 3: ("sha256", 20), 4: ("sha384", 48)}
SPECIAL_NAMES = {1: "Info.plist", 2: "requirements", 3: "CodeResources", 4: "application slot",
                 5: "entitlements", 6: "rep-specific (DMG trailer)", 7: "DER entitlements"}
# Blobs of the SuperBlob that a CodeDirectory hashes in the special slot of the same number.
_SPECIAL_BLOBS = (2, 5, 7)  # requirements, entitlements, DER entitlements
KOLY_SIZE = 512
KOLY_CODESIG = struct.Struct(">QQ")  # code signature offset and size, at byte 296 of koly
KOLY_CODESIG_AT = 296


def is_macho(head: bytes) -> bool:
    """Whether `head`, a file's first 8 bytes, starts a Mach-O file, thin or universal."""
    if head[:4] in (FAT_MAGIC, FAT_MAGIC_64):
        # A Java class file starts with the same magic, then its version (45 and up) where a
        # universal binary has its slice count; `file` tells them apart the same way.
        return len(head) == 8 and struct.unpack(">I", head[4:])[0] < 20
    return head[:4] in MACHO_MAGICS


def is_executable(head: bytes) -> bool:
    """Whether `head`, a file's first 16 bytes, starts a Mach-O executable (filetype MH_EXECUTE),
    or a universal binary: those are executables in practice."""
    if len(head) < 16:
        return False
    for magic, endian in ((b"\xcf\xfa\xed\xfe", "<"), (b"\xce\xfa\xed\xfe", "<"),
                          (b"\xfe\xed\xfa\xcf", ">"), (b"\xfe\xed\xfa\xce", ">")):
        if head[:4] == magic:
            return struct.unpack_from(endian + "I", head, 12)[0] == MH_EXECUTE
    return head[:4] in (FAT_MAGIC, FAT_MAGIC_64)


def macho_slices(data: bytes, name: str) -> list[tuple[int, int]]:
    """(offset, size) of each architecture: one for a thin file, several for a universal one."""
    head = data[:8]
    if head[:4] in (FAT_MAGIC, FAT_MAGIC_64):
        count = struct.unpack_from(">I", data, 4)[0]
        if not 0 < count < 32:
            raise FormatError(f"{name}: universal header lists {count} architectures")
        wide = head[:4] == FAT_MAGIC_64
        entry = struct.Struct(">iiQQII" if wide else ">iiIII")
        out = []
        for i in range(count):
            fields = entry.unpack_from(data, 8 + i * entry.size)
            offset, size = fields[2], fields[3]
            if offset + size > len(data):
                raise FormatError(f"{name}: architecture {i} lies past the end of the file")
            out.append((offset, size))
        return out
    if head[:4] in MACHO_MAGICS:
        return [(0, len(data))]
    raise FormatError(f"{name} is not a Mach-O file (magic {head[:4].hex()})",
                      "only Mach-O code can carry a code signature")


def macho_code_signature(sl: memoryview | bytes, name: str) -> tuple[int, int] | None:
    """(dataoff, datasize) of LC_CODE_SIGNATURE in one thin Mach-O, or None when unsigned."""
    magic = bytes(sl[:4])
    endian = "<" if magic in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe") else ">"
    wide = magic in (b"\xcf\xfa\xed\xfe", b"\xfe\xed\xfa\xcf")
    if len(sl) < 32:
        raise FormatError(f"{name}: truncated Mach-O header")
    ncmds, sizeofcmds = struct.unpack_from(endian + "II", sl, 16)
    position = 32 if wide else 28
    end = position + sizeofcmds
    if end > len(sl):
        raise FormatError(f"{name}: load commands run past the end of the file")
    for _ in range(ncmds):
        cmd, cmdsize = struct.unpack_from(endian + "II", sl, position)
        if cmdsize < 8 or position + cmdsize > end:
            raise FormatError(f"{name}: malformed load command at offset {position}")
        if cmd == _LC_CODE_SIGNATURE:
            dataoff, datasize = struct.unpack_from(endian + "II", sl, position + 8)
            if dataoff + datasize > len(sl):
                raise FormatError(f"{name}: the code signature lies past the end of the file")
            return dataoff, datasize
        position += cmdsize
    return None


def superblob_entries(blob: bytes, name: str) -> dict[int, bytes]:
    """{slot type: blob bytes (with their 8-byte header)} of an embedded-signature SuperBlob."""
    if len(blob) < 12:
        raise FormatError(f"{name}: code signature is truncated")
    magic, length, count = struct.unpack_from(">III", blob, 0)
    if magic != SUPERBLOB_MAGIC or length > len(blob) or count > 64:
        raise FormatError(f"{name}: code signature is not an embedded-signature SuperBlob")
    out = {}
    for i in range(count):
        slot, offset = struct.unpack_from(">II", blob, 12 + 8 * i)
        if offset + 8 > length:
            raise FormatError(f"{name}: code signature blob {slot:#x} lies outside the SuperBlob")
        _, blob_length = struct.unpack_from(">II", blob, offset)
        if offset + blob_length > length or blob_length < 8:
            raise FormatError(f"{name}: code signature blob {slot:#x} is truncated")
        payload = blob[offset:offset + blob_length]
        # The CMS blob is a wrapper (magic 0xfade0b01): the DER follows its 8-byte header.
        out[slot] = payload[8:] if slot == CMS_SLOT else payload
    return out


def code_directories(blobs: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """[(slot, blob)] of the CodeDirectories among a SuperBlob's entries: slot 0, then the
    alternate ones (0x1000 to 0x1004), in slot order."""
    return [(slot, blobs[slot]) for slot in sorted(blobs) if slot == 0 or 0x1000 <= slot < 0x1005]


def special_blobs(blobs: dict[int, bytes]) -> dict[int, bytes]:
    """{special slot: blob} for the blobs a signature carries itself and its CodeDirectory hashes
    in a special slot (requirements, entitlements, DER entitlements)."""
    return {slot: blobs[slot] for slot in _SPECIAL_BLOBS if slot in blobs}


@dataclass(frozen=True)
class CodeDirectory:
    version: int
    flags: int
    hash_offset: int
    special_slots: int
    code_slots: int
    code_limit: int
    hash_size: int
    hash_type: int
    page_shift: int
    identifier: str
    team_id: str | None
    raw: bytes = field(repr=False)

    @property
    def hash_name(self) -> str:
        return _CD_HASHES[self.hash_type][0]

    def hash(self, data) -> bytes:
        return hashlib.new(self.hash_name, data).digest()

    def code_slot(self, index: int) -> bytes:
        start = self.hash_offset + index * self.hash_size
        return self.raw[start:start + self.hash_size]

    def special_slot(self, number: int) -> bytes:
        start = self.hash_offset - number * self.hash_size
        return self.raw[start:start + self.hash_size]

    def pages(self) -> Iterator[tuple[int, int]]:
        if self.page_shift == 0:
            yield 0, self.code_limit
            return
        size = 1 << self.page_shift
        for index in range(self.code_slots):
            yield index * size, min((index + 1) * size, self.code_limit)


def parse_code_directory(blob: bytes, name: str) -> CodeDirectory:
    if len(blob) < 44:
        raise FormatError(f"{name}: CodeDirectory is truncated")
    (magic, length, version, flags, hash_offset, ident_offset, n_special, n_code, code_limit,
     hash_size, hash_type, _platform, page_shift, _spare) = struct.unpack_from(">IIIIIIIIIBBBBI", blob, 0)
    if magic != _CODEDIRECTORY_MAGIC or length > len(blob):
        raise FormatError(f"{name}: bad CodeDirectory header")
    if hash_type not in _CD_HASHES or _CD_HASHES[hash_type][1] != hash_size:
        raise FormatError(f"{name}: CodeDirectory hash type {hash_type} (size {hash_size}) is not supported")
    if hash_offset - n_special * hash_size < 0 or hash_offset + n_code * hash_size > length:
        raise FormatError(f"{name}: CodeDirectory slots lie outside the blob")
    team_id = None
    if version >= 0x20200 and len(blob) >= 52:
        team_offset = struct.unpack_from(">I", blob, 48)[0]
        if team_offset:
            team_id = blob[team_offset:blob.index(b"\0", team_offset)].decode("utf-8", "replace")
    if version >= 0x20300 and len(blob) >= 64:
        limit64 = struct.unpack_from(">Q", blob, 56)[0]
        code_limit = limit64 or code_limit
    identifier = blob[ident_offset:blob.index(b"\0", ident_offset)].decode("utf-8", "replace")
    if page_shift:
        expected_slots = -(-code_limit // (1 << page_shift))
    else:
        expected_slots = 1 if code_limit else 0
    if n_code != expected_slots:
        raise FormatError(f"{name}: CodeDirectory has {n_code} page hashes for {code_limit} bytes")
    return CodeDirectory(version, flags, hash_offset, n_special, n_code, code_limit, hash_size,
                         hash_type, page_shift, identifier, team_id, bytes(blob[:length]))


def koly_code_signature(data: bytes, name: str) -> tuple[int, int]:
    """(offset, size) of the code signature a UDIF koly trailer records; (x, 0) when unsigned."""
    if len(data) < KOLY_SIZE or data[-KOLY_SIZE:-KOLY_SIZE + 4] != b"koly":
        raise FormatError(f"{name} is not a UDIF disk image (no koly trailer)")
    return KOLY_CODESIG.unpack_from(data, len(data) - KOLY_SIZE + KOLY_CODESIG_AT)


def koly_for_hash(koly: bytes) -> bytes:
    """The trailer as the DMG's rep-specific slot hashes it: signature size zeroed (it is not
    known when the CodeDirectory is made), signature offset kept."""
    out = bytearray(koly)
    out[KOLY_CODESIG_AT + 8:KOLY_CODESIG_AT + 16] = bytes(8)
    return bytes(out)
