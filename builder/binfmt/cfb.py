"""Read-only Compound File Binary (OLE2) parsing: where a stream's bytes are in the file.

An MSI is a compound file. Its Authenticode signature is the PKCS#7 DER held in the root
stream "\\x05DigitalSignature" (names starting with a control character are not
MSI-encoded). Stamping rewrites bytes of that stream in place, so what is needed is the map
from a stream's bytes to file byte ranges, not a general reader.

[MS-CFB]: a 512-byte header (in a 512- or 4096-byte first sector), the FAT found through the
DIFAT (109 entries in the header, then a chain of DIFAT sectors), 128-byte directory entries,
and streams under the mini-stream cutoff (4096) stored in 64-byte mini sectors inside the
root entry's mini stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from builder.errors import FormatError

SIGNATURE = bytes.fromhex("D0CF11E0A1B11AE1")
MAXREGSECT = 0xFFFFFFFA
ENDOFCHAIN = 0xFFFFFFFE
NOSTREAM = 0xFFFFFFFF
_HEADER = struct.Struct("<8s16sHHHHH6sIIIIIIIII")
_DIFAT_IN_HEADER = 109
_ENTRY_SIZE = 128
_STREAM, _ROOT = 2, 5  # directory entry object types


@dataclass(frozen=True)
class DirEntry:
    name: str
    kind: int  # 1 storage, 2 stream, 5 root
    left: int
    right: int
    child: int
    start: int  # first sector (of the mini stream for small streams)
    size: int


class _CompoundFile:
    def __init__(self, data, name: str):
        self.data, self.name = data, name
        if len(data) < 8 or bytes(data[:8]) != SIGNATURE:
            raise FormatError(f"{name} is not an MSI (it is not a compound file)",
                              hint="pass a Windows Installer .msi")
        if len(data) < 512:
            raise self._truncated("header")
        (_, _, _, major, byte_order, sector_shift, mini_shift, _, _, fat_sectors,
         self.first_dir, _, self.cutoff, self.first_minifat, _, first_difat,
         difat_sectors) = _HEADER.unpack_from(data, 0)
        supported = (major, sector_shift) in ((3, 9), (4, 12))
        if byte_order != 0xFFFE or not supported or mini_shift != 6:
            raise FormatError(f"{name} has an unsupported compound file header "
                              f"(version {major}, sector shift {sector_shift})")
        self.major = major
        self.shift = sector_shift
        self.sector_size = 1 << sector_shift
        self.mini_size = 1 << mini_shift
        self.max_sectors = (len(data) + self.sector_size - 1) >> sector_shift
        self.fat_sectors = self._difat(fat_sectors, first_difat, difat_sectors)
        self._per_sector = self.sector_size // 4
        self._dir_chain: list[int] | None = None
        self._minifat_chain: list[int] | None = None
        self._mini_stream_chain: list[int] | None = None

    def _truncated(self, what: str) -> FormatError:
        return FormatError(f"{self.name} is truncated: its {what} runs past the end of the file",
                           hint="download or copy the file again")

    def _corrupt(self, what: str) -> FormatError:
        return FormatError(f"{self.name} is a corrupt compound file ({what})")

    def sector_offset(self, sector: int) -> int:
        if sector > MAXREGSECT:
            raise self._corrupt(f"a chain points at special sector 0x{sector:08x}")
        return (sector + 1) << self.shift

    def _u32s(self, sector: int) -> tuple[int, ...]:
        offset = self.sector_offset(sector)
        if offset + self.sector_size > len(self.data):
            raise self._truncated("sector table")
        return struct.unpack_from(f"<{self.sector_size // 4}I", self.data, offset)

    def _difat(self, count: int, first: int, difat_count: int) -> list[int]:
        if count > self.max_sectors:
            raise self._corrupt(f"{count} FAT sectors in a file of {self.max_sectors} sectors")
        sectors = list(struct.unpack_from(f"<{_DIFAT_IN_HEADER}I", self.data, 76))
        sector = first
        for _ in range(difat_count):
            if len(sectors) >= count:
                break
            entries = self._u32s(sector)
            sectors += entries[:-1]
            sector = entries[-1]
        if len(sectors) < count:
            raise self._corrupt("the DIFAT lists fewer FAT sectors than the header")
        sectors = sectors[:count]
        if sectors and self.sector_offset(max(sectors)) + self.sector_size > len(self.data):
            raise self._truncated("FAT")
        return sectors

    def _next(self, sector: int) -> int:
        index, entry = divmod(sector, self._per_sector)
        if index >= len(self.fat_sectors):
            raise self._corrupt(f"sector {sector} is beyond the FAT")
        offset = self.sector_offset(self.fat_sectors[index]) + 4 * entry
        if offset + 4 > len(self.data):
            raise self._truncated("FAT")
        return struct.unpack_from("<I", self.data, offset)[0]

    def chain(self, start: int, needed: int | None = None) -> list[int]:
        """Sectors of the chain from `start`: `needed` of them, or up to ENDOFCHAIN."""
        out, seen, sector = [], set(), start
        while sector != ENDOFCHAIN and (needed is None or len(out) < needed):
            if sector > MAXREGSECT:
                raise self._corrupt("a sector chain is broken")
            if sector in seen:
                raise self._corrupt("a sector chain loops")
            seen.add(sector)
            out.append(sector)
            sector = self._next(sector)
        if needed is not None and len(out) < needed:
            raise self._corrupt("a sector chain is shorter than its stream")
        return out

    def entry(self, index: int) -> DirEntry:
        if self._dir_chain is None:
            self._dir_chain = self.chain(self.first_dir)
        per = self.sector_size // _ENTRY_SIZE
        if index >= len(self._dir_chain) * per:
            raise self._corrupt(f"directory entry {index} does not exist")
        offset = self.sector_offset(self._dir_chain[index // per]) + index % per * _ENTRY_SIZE
        if offset + _ENTRY_SIZE > len(self.data):
            raise self._truncated("directory")
        raw_name, name_len, kind, _, left, right, child = struct.unpack_from(
            "<64sHBBIII", self.data, offset)
        start, size = struct.unpack_from("<IQ", self.data, offset + 116)
        if self.major == 3:
            size &= 0xFFFFFFFF  # [MS-CFB]: version 3 writers may leave garbage in the high half
        name = raw_name[:max(name_len - 2, 0)].decode("utf-16-le", "surrogatepass")
        return DirEntry(name, kind, left, right, child, start, size)

    def children(self, storage: DirEntry) -> list[DirEntry]:
        """Every entry of the red-black tree under `storage` (order is not meaningful)."""
        out, todo, seen = [], [storage.child], set()
        while todo:
            index = todo.pop()
            if index == NOSTREAM:
                continue
            if index in seen:
                raise self._corrupt("the directory tree loops")
            seen.add(index)
            item = self.entry(index)
            out.append(item)
            todo += (item.left, item.right)
        return out

    def find(self, path: str) -> DirEntry:
        node = self.entry(0)
        if node.kind != _ROOT:
            raise self._corrupt("the first directory entry is not the root")
        for part in path.split("/"):
            match = [c for c in self.children(node) if c.name.upper() == part.upper()]
            if not match:
                raise FormatError(f"{self.name} has no stream {path!r}")
            node = match[0]
        if node.kind != _STREAM:
            raise FormatError(f"{self.name}: {path!r} is a storage, not a stream")
        return node

    def extents(self, entry: DirEntry) -> list[tuple[int, int]]:
        if entry.size == 0:
            return []
        if entry.size < self.cutoff:
            return self._mini_extents(entry)
        sectors = self.chain(entry.start, -(-entry.size // self.sector_size))
        return self._coalesce([(self.sector_offset(s), self.sector_size) for s in sectors],
                              entry.size)

    def _mini_extents(self, entry: DirEntry) -> list[tuple[int, int]]:
        if self._minifat_chain is None:
            self._minifat_chain = self.chain(self.first_minifat)
            root = self.entry(0)
            self._mini_stream_chain = self.chain(root.start,
                                                 -(-root.size // self.sector_size))
        per_container = self.sector_size // self.mini_size
        pieces, seen = [], set()
        mini, limit = entry.start, len(self._minifat_chain) * self._per_sector
        for _ in range(-(-entry.size // self.mini_size)):
            if mini >= limit or mini // per_container >= len(self._mini_stream_chain):
                raise self._corrupt("a mini stream chain is broken")
            if mini in seen:
                raise self._corrupt("a mini stream chain loops")
            seen.add(mini)
            container, within = divmod(mini, per_container)
            pieces.append((self.sector_offset(self._mini_stream_chain[container])
                           + within * self.mini_size, self.mini_size))
            index, slot = divmod(mini, self._per_sector)
            offset = self.sector_offset(self._minifat_chain[index]) + 4 * slot
            if offset + 4 > len(self.data):
                raise self._truncated("mini FAT")
            mini = struct.unpack_from("<I", self.data, offset)[0]
        return self._coalesce(pieces, entry.size)

    def _coalesce(self, pieces: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        remaining = size
        for offset, length in pieces:
            length = min(length, remaining)
            remaining -= length
            if out and out[-1][0] + out[-1][1] == offset:
                out[-1][1] += length
            else:
                out.append([offset, length])
        if any(offset + length > len(self.data) for offset, length in out):
            raise self._truncated("stream")
        return [(offset, length) for offset, length in out]


def stream_extents(data, name: str, file_name: str = "the input") -> list[tuple[int, int]]:
    """File byte ranges (offset, length) holding stream `name`'s bytes, in stream order.

    `name` is the raw compound-file name ("\\x05DigitalSignature"); "a/b" looks inside
    storage "a". Adjacent sectors are merged, so a contiguous stream is one range.
    """
    cfb = _CompoundFile(data, file_name)
    return cfb.extents(cfb.find(name))


def read_stream(data, name: str, file_name: str = "the input") -> bytes:
    return b"".join(bytes(data[o:o + n]) for o, n in stream_extents(data, name, file_name))
