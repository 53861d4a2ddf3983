"""Reading an NSIS installer back: its first header, compressed blocks, script strings, the
embedded uninstaller and the PE version strings. Pure: bytes in, values out."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from builder.binfmt import pe
from builder.errors import FormatError


_FH_SIG = 0xDEADBEEF
_FH_MAGIC = b"NullsoftInst"
_FIRSTHEADER = struct.Struct("<II12sII")  # flags, siginfo, "NullsoftInst", header size, data size
_FH_FLAGS_UNINSTALL, _FH_FLAGS_NO_CRC = 1, 4
_BLOCKS = 8  # pages, sections, entries, strings, langtables, ctlcolors, bgfont, data
_NB_STRINGS, _NB_LANGTABLES = 3, 4
# The uninstaller's stub (code, icons, manifest) comes before its own first header; 512 KiB is
# far more than any NSIS stub and far less than an agent that would be inflated for nothing.
_STUB_LIMIT = 512 * 1024


@dataclass(frozen=True)
class NsisInstaller:
    firstheader_offset: int
    flags: int
    header_size: int  # the script header, inflated
    data_end: int  # end of the NSIS data (its CRC included); a signature may follow
    wide: bool  # an amd64 stub: the header's block offsets are 64-bit

    @property
    def is_uninstaller(self) -> bool:
        return bool(self.flags & _FH_FLAGS_UNINSTALL)

    @property
    def blocks_start(self) -> int:
        return self.firstheader_offset + _FIRSTHEADER.size


def _truncated(name: str, what: str) -> FormatError:
    return FormatError(f"{name} is truncated: {what} runs past the end of the file", "download or copy the file again")


def _sections_end(data, name: str) -> int:
    """End of the last PE section's raw data (pe.parse has checked the headers before)."""
    lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    count, optional_size = struct.unpack_from("<H12xH", data, lfanew + 6)
    table = lfanew + 24 + optional_size
    if table + 40 * count > len(data):
        raise _truncated(name, "its section table")
    end = 0
    for i in range(count):
        raw_size, raw_ptr = struct.unpack_from("<II", data, table + 40 * i + 16)
        end = max(end, raw_ptr + raw_size)
    return end


def find_firstheader(data, start: int = 0) -> int | None:
    """Offset of NSIS's first header: on a 512-byte boundary, where the stub looks for it."""
    needle = struct.pack("<I", _FH_SIG) + _FH_MAGIC
    pos = data.find(needle, start)
    while pos != -1:
        if (pos - 4) % 512 == 0:
            return pos - 4
        pos = data.find(needle, pos + 1)
    return None


def locate(data, name: str) -> NsisInstaller:
    """The NSIS layout of `data`; FormatError naming `name` when it is not a PE, is cut off,
    or is not an NSIS installer."""
    layout = pe.parse(data, name)
    if _sections_end(data, name) > len(data):
        raise _truncated(name, "its last PE section")
    at = find_firstheader(data)
    if at is None:
        raise FormatError(f"{name} is not an NSIS installer (no NSIS header)", "give an installer built by builder")
    flags, _sig, _magic, header_size, data_size = _FIRSTHEADER.unpack_from(data, at)
    if at + data_size > len(data):
        raise _truncated(name, "the installer's data")
    if layout.cert_table_offset and at + data_size > layout.cert_table_offset:
        raise FormatError(f"{name}: the installer's data overlaps its signature", "rebuild the installer")
    lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    wide = struct.unpack_from("<H", data, lfanew + 24)[0] == 0x20B  # PE32+
    return NsisInstaller(at, flags, header_size, at + data_size, wide)


def _blocks(data, inst: NsisInstaller, name: str):
    """(offset of the stored bytes, their length, compressed?) of each data block in order:
    the script header first, then one per file, plugin and uninstaller."""
    pos = inst.blocks_start
    end = inst.data_end - (0 if inst.flags & _FH_FLAGS_NO_CRC else 4)
    while pos + 4 <= end:
        (word,) = struct.unpack_from("<I", data, pos)
        length = word & 0x7FFFFFFF
        if pos + 4 + length > end:
            raise FormatError(f"{name}: an NSIS data block runs past the installer's data (the file is damaged)")
        yield pos + 4, length, bool(word & 0x80000000)
        pos += 4 + length


def _inflate(data, offset: int, length: int, compressed: bool, limit: int, name: str) -> bytes:
    """A block's bytes, at most `limit` of them (0: all)."""
    stored = bytes(data[offset:offset + length])
    if not compressed:
        return stored[:limit] if limit else stored
    try:
        # makensis' zlib mode writes raw deflate streams (no zlib header).
        return zlib.decompressobj(-15).decompress(stored, limit)
    except zlib.error:
        raise FormatError(f"{name}: an NSIS data block does not decompress (the file is damaged)") from None


def script_strings(data, inst: NsisInstaller, name: str) -> list[str]:
    """The script's string table. FormatError when the header is damaged."""
    first = next(_blocks(data, inst, name), None)
    if first is None:
        raise FormatError(f"{name}: the NSIS header is missing")
    raw = _inflate(data, *first, inst.header_size + 1, name)
    if len(raw) != inst.header_size:
        raise FormatError(f"{name}: the NSIS header is {len(raw)} bytes, its first header says {inst.header_size}")
    # After the flags, one (offset, count) per block; the offset is pointer-sized (packed).
    entry = struct.Struct("<QI" if inst.wide else "<II")
    if len(raw) < 4 + entry.size * _BLOCKS:
        raise FormatError(f"{name}: the NSIS header is too short")
    start = entry.unpack_from(raw, 4 + entry.size * _NB_STRINGS)[0]
    end = entry.unpack_from(raw, 4 + entry.size * _NB_LANGTABLES)[0]
    if not 0 < start <= end <= len(raw) or start % 2:
        raise FormatError(f"{name}: the NSIS header's string table is out of place")
    return raw[start:end].decode("utf-16-le", "replace").split("\0")


def embedded_uninstaller(data, inst: NsisInstaller, name: str) -> bytes | None:
    """The uninstaller the installer writes, as stored (signed by !uninstfinalize when the
    build signed it): the data block holding a PE whose own NSIS header says "uninstaller"."""
    blocks = _blocks(data, inst, name)
    next(blocks, None)  # the script header
    for offset, length, compressed in blocks:
        head = _inflate(data, offset, length, compressed, _STUB_LIMIT, name)
        if head[:2] != b"MZ":
            continue
        at = find_firstheader(head)
        if at is not None and at + _FIRSTHEADER.size <= len(head) and _FIRSTHEADER.unpack_from(head, at)[0] & _FH_FLAGS_UNINSTALL:
            return _inflate(data, offset, length, compressed, 0, name)
    return None


def version_strings(data, end: int, keys=("ProductName", "CompanyName", "ProductVersion")) -> dict[str, str]:
    """Values of the stub's version resource (VIAddVersionKey), looked up before `end` (the
    first header: the stub's resources come before NSIS' data). A String entry is wLength,
    wValueLength (characters, NUL included), wType, the key in UTF-16 with its NUL, padding to
    4 bytes, then the value."""
    out = {}
    for key in keys:
        needle = (key + "\0").encode("utf-16-le")
        pos = data.find(needle, 6, end)
        if pos < 0 or pos % 2:
            continue
        _length, chars, kind = struct.unpack_from("<HHH", data, pos - 6)
        start = pos + len(needle)
        start += (pos - 6 - start) % 4  # aligned like the entry itself
        if kind != 1 or not chars or start + 2 * chars > end:
            continue
        out[key] = bytes(data[start:start + 2 * chars]).decode("utf-16-le", "replace").rstrip("\0")
    return out
