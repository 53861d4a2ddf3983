"""Apple UDIF disk images (.dmg), "UDZO" flavour: zlib-compressed chunks, XML plist, koly trailer.

Layout of a flattened, single-segment UDIF file, all integers big-endian:

    data fork   the chunks, back to back (zlib streams or raw copies; zero runs take no bytes)
    XML plist   {"resource-fork": {"blkx": [...], "plst": [...]}}
    koly        the 512-byte trailer: where the data fork and the plist are, their checksums

Each "blkx" entry describes one partition of the raw disk as a "mish" table (204-byte header,
then 40-byte chunk records, a terminator last). Like `hdiutil convert`, the writer makes one
table for the Driver Descriptor Map (sector 0), one per Apple Partition Map entry and one per
gap between entries ("Apple_Free"), so the tables cover the disk in order from sector 0 to the
end: dmg2img ignores sector numbers and concatenates the tables. A disk without a Driver
Descriptor Map becomes one "whole disk" table. Names are "name (type : index)" from the map,
as hdiutil prints them; 7-Zip picks the partition to open by them.

Chunks hold 1 MiB of disk (2048 sectors). An all-zero chunk is a "zero fill" record (type 0);
chunks that zlib cannot shrink are stored raw (type 1). Every terminator records the current
data-fork offset: dmg2img reads chunk offsets as absolute only after a non-zero terminator.

Checksums are CRC-32 (type 2, 32 bits), as hdiutil writes them: per table over its
uncompressed sectors (except "ignore" chunks, type 2, which hdiutil uses for free space and
7-Zip leaves out of the sum), the data fork over its compressed bytes, and the "master"
checksum over the tables' CRCs (4 bytes each, big-endian, in table order, as libdmg-hfsplus
computes it).

The writer is deterministic: no time is recorded, and the segment id (a UUID hdiutil fills at
random) is derived from a SHA-256 of the data fork and plist. Compression runs in threads
(zlib releases the GIL); the output does not depend on their number.
"""

from __future__ import annotations

import bz2
import collections
import hashlib
import io
import lzma
import os
import plistlib
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from xml.parsers.expat import ExpatError

from builder.errors import FormatError, OutputError

SECTOR = 512
CHUNK_SECTORS = 2048  # 1 MiB of raw disk per chunk
DEFAULT_LEVEL = 5  # 30 MB of binaries, CPU-s/size: 1 0.6/13.7 MB, 3 0.9/13.3, 5 1.4/12.8, 6 1.9/12.7

# Chunk ("block run") types.
ZERO_FILL = 0x00000000
RAW = 0x00000001
IGNORE = 0x00000002  # "free" sectors: read as zeros, left out of the table's CRC-32
ADC = 0x80000004
ZLIB = 0x80000005
BZIP2 = 0x80000006
LZFSE = 0x80000007
LZMA = 0x80000008
COMMENT = 0x7FFFFFFE
TERMINATOR = 0xFFFFFFFF

_TYPE_NAMES = {
    ZERO_FILL: "zero fill", RAW: "raw", IGNORE: "ignore", ADC: "ADC", ZLIB: "zlib",
    BZIP2: "bzip2", LZFSE: "LZFSE", LZMA: "LZMA", COMMENT: "comment", TERMINATOR: "terminator",
}

CHECKSUM_NONE = 0
CHECKSUM_CRC32 = 2

KOLY_SIZE = 512
KOLY_VERSION = 4
FLAG_FLATTENED = 0x1
VARIANT_DEVICE = 1  # a whole disk with a partition map
VARIANT_PARTITION = 2  # a bare volume, no partition map

_KOLY = struct.Struct(">4sIIIQQQQQII16sII128sQQ120sII128sIQ12s")
_MISH = struct.Struct(">4sIQQQII24sII128sI")
_RUN = struct.Struct(">IIQQQQ")
assert _KOLY.size == KOLY_SIZE and _MISH.size == 0xCC and _RUN.size == 0x28

_ATTRIBUTES = "0x0050"  # what hdiutil and libdmg-hfsplus write for blkx and plst entries
# The "plst" resource hdiutil adds (libdmg-hfsplus copies it): 0x408 bytes, two flags set.
_PLST = bytes(0x210) + b"\x00\x01\x00\x01" + bytes(0x408 - 0x214)

_DDM_SIGNATURE = b"ER"
_APM_SIGNATURE = b"PM"
_ZEROS = bytes(CHUNK_SECTORS * SECTOR)
_SAMPLE = 16 * 1024


# --- partition layout -------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A run of sectors that gets its own blkx table."""

    id: int  # the blkx ID: -1 for the Driver Descriptor Map, then 0, 1, ... in disk order
    name: str  # as hdiutil spells it: "HFSPLUS_Hybrid (Apple_HFS : 5)"
    first_sector: int
    sector_count: int


def _text(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0].decode("mac_roman")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def partition_layout(read_at: Callable[[int, int], bytes], size: int) -> list[Region]:
    """The blkx regions of a raw disk of `size` bytes; `read_at(offset, length)` reads it.

    With a Driver Descriptor Map ("ER") and an Apple Partition Map ("PM" entries), one region
    per map entry plus "Apple_Free" regions for the gaps; otherwise one whole-disk region.
    """
    total = size // SECTOR
    head = read_at(0, SECTOR)
    if size < 2 * SECTOR or head[:2] != _DDM_SIGNATURE:
        return [Region(-1, "whole disk (unknown partition : 0)", 0, total)]
    block_size = struct.unpack_from(">H", head, 2)[0]
    if block_size < SECTOR or block_size % SECTOR or block_size > 0x8000:
        raise FormatError(f"raw disk image: Driver Descriptor Map block size {block_size} is not a multiple of 512")
    per_block = block_size // SECTOR
    first = read_at(block_size, SECTOR)
    if first[:2] != _APM_SIGNATURE:
        raise FormatError("raw disk image: Driver Descriptor Map present but no Apple Partition Map after it")
    count = struct.unpack_from(">I", first, 4)[0]
    if not 1 <= count <= 256 or (count + 1) * block_size > size:
        raise FormatError(f"raw disk image: Apple Partition Map claims {count} entries, which do not fit the image")

    entries = []
    for index in range(1, count + 1):
        entry = read_at(index * block_size, SECTOR)
        if entry[:2] != _APM_SIGNATURE:
            raise FormatError(f"raw disk image: Apple Partition Map entry {index} lacks its 'PM' signature")
        start, blocks = struct.unpack_from(">II", entry, 8)
        name, kind = _text(entry[16:48]), _text(entry[48:80])
        if blocks == 0:
            continue
        first_sector, sectors = start * per_block, blocks * per_block
        if first_sector < 1 or first_sector + sectors > total:
            raise FormatError(f"raw disk image: partition {index} ({name or kind}) lies outside the image "
                              f"(sectors {first_sector}-{first_sector + sectors} of {total})")
        entries.append((first_sector, sectors, name, kind))
    entries.sort()

    spans = [(0, 1, "Driver Descriptor Map", "DDM")]
    position = 1
    for first_sector, sectors, name, kind in entries:
        if first_sector < position:
            raise FormatError(f"raw disk image: partition {name or kind} at sector {first_sector} overlaps the one before it")
        if first_sector > position:
            spans.append((position, first_sector - position, "", "Apple_Free"))
        spans.append((first_sector, sectors, name, kind))
        position = first_sector + sectors
    if position < total:
        spans.append((position, total - position, "", "Apple_Free"))
    return [Region(index - 1, f"{name} ({kind} : {index})", start, sectors)
            for index, (start, sectors, name, kind) in enumerate(spans)]


# --- writer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """What `write` produced."""

    size: int  # bytes of the .dmg
    raw_size: int  # bytes of the disk it holds
    data_fork_length: int
    partitions: tuple[str, ...]
    master_checksum: int


class _Source:
    """A raw disk: bytes-like in memory, or a file read a chunk at a time."""

    def __init__(self, source: bytes | bytearray | memoryview | str | os.PathLike[str]):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._view: memoryview | None = memoryview(source).cast("B")
            self._file: BinaryIO | None = None
            self.size = len(self._view)
        else:
            self._view = None
            try:
                self._file = open(source, "rb")
            except OSError as exc:
                raise FormatError(f"cannot read raw disk image {source}: {exc.strerror}") from None
            self.size = os.fstat(self._file.fileno()).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if self._view is not None:
            return bytes(self._view[offset:offset + length])
        assert self._file is not None
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != min(length, max(0, self.size - offset)):
            raise FormatError("raw disk image changed size while being read")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def incompressible(data: bytes) -> bool:
    """True when four 16 KiB samples spread over `data` do not shrink by 3% at zlib level 1.

    A DMG mostly holds already-compressed files (a signed pkg with a gzip Payload); zlib on
    such data costs ~1 s per 30 MB here to save nothing. Sampling costs ~6% of that. The
    decision depends only on the bytes, so the output stays deterministic.
    """
    if len(data) < 4 * _SAMPLE:
        return False
    step = len(data) // 4
    sampled = packed = 0
    for start in range(0, 4 * step, step):
        sample = data[start:start + _SAMPLE]
        sampled += len(sample)
        packed += len(zlib.compress(sample, 1))
    return packed * 100 >= sampled * 97


def _pack_chunk(data: bytes, level: int) -> tuple[int, bytes]:
    if data == _ZEROS[:len(data)]:
        return ZERO_FILL, b""
    if incompressible(data):
        return RAW, data
    packed = zlib.compress(data, level)
    if len(packed) >= len(data):
        return RAW, data
    return ZLIB, packed


def _segment_id(digest: bytes) -> bytes:
    """A UUID from the first 16 bytes of a SHA-256: version 8 (RFC 9562 "custom"), RFC variant."""
    uid = bytearray(digest[:16])
    uid[6] = (uid[6] & 0x0F) | 0x80
    uid[8] = (uid[8] & 0x3F) | 0x80
    return bytes(uid)


def write(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    out: str | os.PathLike[str] | BinaryIO,
    *,
    level: int = DEFAULT_LEVEL,
    workers: int | None = None,
) -> Written:
    """Write the raw disk `source` as a compressed UDIF image to `out` (a path, or a binary
    stream positioned at its start: UDIF offsets count from the first byte)."""
    if not 1 <= level <= 9:
        raise ValueError(f"zlib level must be 1-9, got {level}")
    workers = workers or min(4, os.cpu_count() or 1)
    raw = _Source(source)
    try:
        if raw.size == 0 or raw.size % SECTOR:
            raise FormatError(f"raw disk image is {raw.size} bytes, not a whole number of 512-byte sectors")
        regions = partition_layout(raw.read_at, raw.size)
        if isinstance(out, (str, os.PathLike)):
            try:
                stream = open(out, "wb")
            except OSError as exc:
                raise OutputError(f"cannot write {out}: {exc.strerror}", "check the output folder") from None
            try:
                with stream:
                    return _write(raw, regions, stream, level, workers)
            except BaseException:
                Path(out).unlink(missing_ok=True)  # no half-written image left behind
                raise
        return _write(raw, regions, out, level, workers)
    finally:
        raw.close()


def _write(raw: _Source, regions: list[Region], out: BinaryIO, level: int, workers: int) -> Written:
    position = 0  # bytes of data fork written so far
    data_crc = 0
    digest = hashlib.sha256()
    tables: list[tuple[Region, int, bytes]] = []

    def emit(start: int, count: int, future: Future) -> bytes:
        """Write one packed chunk; its 40-byte record."""
        nonlocal position, data_crc
        kind, packed = future.result()
        record = _RUN.pack(kind, 0, start, count, position, len(packed))
        if packed:
            out.write(packed)
            data_crc = zlib.crc32(packed, data_crc)
            digest.update(packed)
            position += len(packed)
        return record

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for region in regions:
            runs: list[bytes] = []
            crc = 0
            # Chunks in flight, oldest first: enough to keep every worker busy, few MiB held.
            pending: collections.deque[tuple[int, int, Future]] = collections.deque()
            for start in range(0, region.sector_count, CHUNK_SECTORS):
                count = min(CHUNK_SECTORS, region.sector_count - start)
                data = raw.read_at((region.first_sector + start) * SECTOR, count * SECTOR)
                crc = zlib.crc32(data, crc)
                pending.append((start, count, pool.submit(_pack_chunk, data, level)))
                if len(pending) > 2 * workers:
                    runs.append(emit(*pending.popleft()))
            while pending:
                runs.append(emit(*pending.popleft()))
            runs.append(_RUN.pack(TERMINATOR, 0, region.sector_count, 0, position, 0))
            header = _MISH.pack(
                b"mish", 1, region.first_sector, region.sector_count, 0,
                CHUNK_SECTORS + 8,  # decompress buffer, in sectors (libdmg-hfsplus: chunk + 8)
                region.id & 0xFFFFFFFF, bytes(24),
                CHECKSUM_CRC32, 32, struct.pack(">I", crc).ljust(128, b"\0"),
                len(runs),
            )
            tables.append((region, crc, header + b"".join(runs)))

    blkx = [{"Attributes": _ATTRIBUTES, "CFName": region.name, "Data": table,
             "ID": str(region.id), "Name": region.name} for region, _, table in tables]
    plst = [{"Attributes": _ATTRIBUTES, "Data": _PLST, "ID": "0", "Name": ""}]
    xml = plistlib.dumps({"resource-fork": {"blkx": blkx, "plst": plst}}, fmt=plistlib.FMT_XML, sort_keys=True)
    out.write(xml)
    digest.update(xml)

    master = zlib.crc32(b"".join(struct.pack(">I", crc) for _, crc, _ in tables))
    variant = VARIANT_PARTITION if regions[0].name.startswith("whole disk") else VARIANT_DEVICE
    out.write(_KOLY.pack(
        b"koly", KOLY_VERSION, KOLY_SIZE, FLAG_FLATTENED,
        0, 0, position,  # running data fork offset, data fork offset, length
        0, 0,  # no binary resource fork
        1, 1, _segment_id(digest.digest()),  # segment 1 of 1
        CHECKSUM_CRC32, 32, struct.pack(">I", data_crc).ljust(128, b"\0"),
        position, len(xml), bytes(120),
        CHECKSUM_CRC32, 32, struct.pack(">I", master).ljust(128, b"\0"),
        variant, raw.size // SECTOR, bytes(12),
    ))
    return Written(position + len(xml) + KOLY_SIZE, raw.size, position,
                   tuple(region.name for region in regions), master)


# --- reader -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    kind: int
    sector: int  # absolute, in the raw disk
    sector_count: int
    offset: int  # in the data fork
    length: int

    @property
    def kind_name(self) -> str:
        return _TYPE_NAMES.get(self.kind, f"0x{self.kind:08x}")


@dataclass(frozen=True)
class Partition:
    id: int
    name: str
    first_sector: int
    sector_count: int
    checksum_type: int
    checksum: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Image:
    """A UDIF image's trailer and tables, as `read` found them (the data is not decompressed)."""

    version: int
    flags: int
    variant: int
    sector_count: int
    data_fork_offset: int
    data_fork_length: int
    xml_offset: int
    xml_length: int
    segment_id: bytes
    data_checksum_type: int
    data_checksum: int
    master_checksum_type: int
    master_checksum: int
    partitions: tuple[Partition, ...]
    resources: tuple[str, ...]  # resource-fork keys: "blkx", "plst", ...

    @property
    def raw_size(self) -> int:
        return self.sector_count * SECTOR


class _Input:
    def __init__(self, source: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO):
        self._owned = False
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.stream: BinaryIO = io.BytesIO(bytes(source))
            self.label = "UDIF image"
        elif isinstance(source, (str, os.PathLike)):
            try:
                self.stream = open(source, "rb")
            except OSError as exc:
                raise FormatError(f"cannot read {source}: {exc.strerror}") from None
            self._owned = True
            self.label = f"UDIF image {Path(source).name}"
        else:
            self.stream = source
            self.label = "UDIF image"
        self.size = self.stream.seek(0, io.SEEK_END)

    def read_at(self, offset: int, length: int) -> bytes:
        self.stream.seek(offset)
        data = self.stream.read(length)
        if len(data) != length:
            raise FormatError(f"{self.label} is truncated: {length} bytes at offset {offset} run past its end")
        return data

    def close(self) -> None:
        if self._owned:
            self.stream.close()


def _checksum(kind: int, bits: int, data: bytes, what: str) -> int:
    if kind == CHECKSUM_NONE:
        return 0
    if kind != CHECKSUM_CRC32 or bits != 32:
        raise FormatError(f"{what} uses checksum type {kind} ({bits} bits); only CRC-32 (type 2) is supported")
    return struct.unpack_from(">I", data)[0]


def read(source: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO) -> Image:
    """Parse the koly trailer, the plist and every blkx table; check that they hang together."""
    src = _Input(source)
    try:
        return _read(src)
    finally:
        src.close()


def _read(src: _Input) -> Image:
    label = src.label
    if src.size < KOLY_SIZE:
        raise FormatError(f"{label} is truncated: {src.size} bytes, shorter than the 512-byte koly trailer")
    (signature, version, header_size, flags, _running, fork_offset, fork_length, _rsrc_offset,
     _rsrc_length, segment_number, segment_count, segment_id, data_ck_type, data_ck_bits, data_ck,
     xml_offset, xml_length, _reserved, master_ck_type, master_ck_bits, master_ck, variant,
     sector_count, _reserved2) = _KOLY.unpack(src.read_at(src.size - KOLY_SIZE, KOLY_SIZE))
    if signature != b"koly":
        raise FormatError(f"{label} has no koly trailer in its last 512 bytes (not a UDIF image, or truncated)")
    if version != KOLY_VERSION or header_size != KOLY_SIZE:
        raise FormatError(f"{label}: koly version {version}, header size {header_size}; expected 4 and 512")
    if segment_count > 1 or segment_number > 1:
        raise FormatError(f"{label} is segment {segment_number} of {segment_count}; segmented images are not supported")
    end = src.size - KOLY_SIZE
    if fork_offset + fork_length > end:
        raise FormatError(f"{label} is truncated or corrupt: the data fork ({fork_length} bytes at {fork_offset}) "
                          f"runs past the koly trailer at {end}")
    if xml_length == 0:
        raise FormatError(f"{label} has no XML plist (koly XML length 0)")
    if xml_offset + xml_length > end:
        raise FormatError(f"{label} is truncated or corrupt: the XML plist ({xml_length} bytes at {xml_offset}) "
                          f"runs past the koly trailer at {end}")
    data_checksum = _checksum(data_ck_type, data_ck_bits, data_ck, f"{label}: data fork")
    master_checksum = _checksum(master_ck_type, master_ck_bits, master_ck, f"{label}: master")

    xml = src.read_at(xml_offset, xml_length)
    try:
        plist = plistlib.loads(xml, fmt=plistlib.FMT_XML)
    except (ExpatError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        # plistlib's parser lets all of these escape on malformed XML (IndexError on a stray tag)
        raise FormatError(f"{label}: the XML plist at offset {xml_offset} is not a valid property list ({exc})") from None
    resources = plist.get("resource-fork") if isinstance(plist, dict) else None
    if not isinstance(resources, dict) or not isinstance(resources.get("blkx"), list) or not resources["blkx"]:
        raise FormatError(f"{label}: the plist has no resource-fork/blkx tables")

    partitions = []
    for index, entry in enumerate(resources["blkx"]):
        partitions.append(_parse_blkx(entry, index, fork_length, label))

    position = 0
    for part in partitions:
        if part.first_sector != position:
            raise FormatError(f"{label}: blkx table '{part.name}' starts at sector {part.first_sector}, "
                              f"expected {position} (tables must cover the disk in order)")
        position += part.sector_count
    if position != sector_count:
        raise FormatError(f"{label}: the blkx tables cover {position} sectors, the koly trailer says {sector_count}")

    return Image(version, flags, variant, sector_count, fork_offset, fork_length, xml_offset, xml_length,
                 segment_id, data_ck_type, data_checksum, master_ck_type, master_checksum,
                 tuple(partitions), tuple(resources))


def _parse_blkx(entry: object, index: int, fork_length: int, label: str) -> Partition:
    if not isinstance(entry, dict) or not isinstance(entry.get("Data"), bytes):
        raise FormatError(f"{label}: blkx entry {index} has no Data")
    name = str(entry.get("Name", entry.get("CFName", f"#{index}")))
    try:
        ident = int(entry.get("ID", index))
    except (TypeError, ValueError):
        raise FormatError(f"{label}: blkx entry {index} ('{name}') has a non-numeric ID") from None
    what = f"{label}: blkx table '{name}'"
    table = entry["Data"]
    if len(table) < _MISH.size:
        raise FormatError(f"{what} is truncated: {len(table)} bytes, the mish header alone is {_MISH.size}")
    (signature, _version, first_sector, sector_count, data_start, _buffers, _descriptor, _reserved,
     ck_type, ck_bits, ck, run_count) = _MISH.unpack_from(table)
    if signature != b"mish":
        raise FormatError(f"{what} lacks its 'mish' signature")
    if len(table) < _MISH.size + run_count * _RUN.size:
        raise FormatError(f"{what} is truncated: it lists {run_count} chunks but holds "
                          f"{(len(table) - _MISH.size) // _RUN.size}")
    checksum = _checksum(ck_type, ck_bits, ck, what)

    chunks = []
    position = 0
    for number in range(run_count):
        kind, _comment, start, count, offset, length = _RUN.unpack_from(table, _MISH.size + number * _RUN.size)
        if kind == TERMINATOR:
            break
        if kind == COMMENT:
            continue
        if start != position:
            raise FormatError(f"{what}: chunk {number} starts at sector {start}, expected {position}")
        if data_start + offset + length > fork_length:
            raise FormatError(f"{what}: chunk {number} ({length} bytes at {data_start + offset}) "
                              f"lies outside the data fork ({fork_length} bytes)")
        chunks.append(Chunk(kind, first_sector + start, count, data_start + offset, length))
        position += count
    else:
        raise FormatError(f"{what} has no terminator chunk")
    if position != sector_count:
        raise FormatError(f"{what}: its chunks cover {position} sectors, the table says {sector_count}")
    return Partition(ident, name, first_sector, sector_count, ck_type, checksum, tuple(chunks))


def _unpack_chunk(chunk: Chunk, packed: bytes, what: str) -> bytes:
    size = chunk.sector_count * SECTOR
    if chunk.kind in (ZERO_FILL, IGNORE):
        return _ZEROS[:size] if size <= len(_ZEROS) else bytes(size)
    if chunk.kind == RAW:
        data = packed
    elif chunk.kind in (ZLIB, BZIP2, LZMA):
        decompressor = {ZLIB: zlib.decompressobj, BZIP2: bz2.BZ2Decompressor, LZMA: lzma.LZMADecompressor}[chunk.kind]()
        try:
            data = decompressor.decompress(packed)
        except (zlib.error, OSError, lzma.LZMAError, EOFError) as exc:
            raise FormatError(f"{what}: {chunk.kind_name} data is corrupt ({exc})") from None
        if not decompressor.eof:
            raise FormatError(f"{what}: {chunk.kind_name} stream is cut short")
    else:
        raise FormatError(f"{what}: chunk type {chunk.kind_name} is not supported by this reader")
    if len(data) != size:
        raise FormatError(f"{what}: unpacks to {len(data)} bytes, expected {size}")
    return data


def extract(
    source: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO,
    out: str | os.PathLike[str] | BinaryIO | None,
) -> Image:
    """Decompress the image into the raw disk at `out` (a path or a binary stream; None only
    verifies), checking every chunk and the table, data fork and master checksums."""
    src = _Input(source)
    try:
        image = _read(src)
        if isinstance(out, (str, os.PathLike)):
            try:
                with open(out, "wb") as stream:
                    _extract(src, image, stream)
            except FormatError:
                Path(out).unlink(missing_ok=True)  # no half-written disk left behind
                raise
        else:
            _extract(src, image, out)
        return image
    finally:
        src.close()


def _extract(src: _Input, image: Image, out: BinaryIO | None) -> None:
    label = src.label
    fork_crc = 0
    if image.data_checksum_type == CHECKSUM_CRC32:
        remaining, offset = image.data_fork_length, image.data_fork_offset
        while remaining:
            block = src.read_at(offset, min(remaining, 1 << 22))
            fork_crc = zlib.crc32(block, fork_crc)
            offset += len(block)
            remaining -= len(block)
        if fork_crc != image.data_checksum:
            raise FormatError(f"{label}: data fork checksum mismatch (CRC-32 {fork_crc:08x}, "
                              f"koly says {image.data_checksum:08x}); the image is corrupt")
    for part in image.partitions:
        crc = 0
        for number, chunk in enumerate(part.chunks):
            what = f"{label}: blkx table '{part.name}' chunk {number}"
            packed = src.read_at(image.data_fork_offset + chunk.offset, chunk.length) if chunk.length else b""
            data = _unpack_chunk(chunk, packed, what)
            if chunk.kind != IGNORE:  # as hdiutil and 7-Zip count them: free sectors are not summed
                crc = zlib.crc32(data, crc)
            if out is not None:
                out.write(data)
        if part.checksum_type == CHECKSUM_CRC32 and crc != part.checksum:
            raise FormatError(f"{label}: blkx table '{part.name}' checksum mismatch (CRC-32 {crc:08x}, "
                              f"table says {part.checksum:08x}); the image is corrupt")
    if image.master_checksum_type == CHECKSUM_CRC32:
        master = zlib.crc32(b"".join(struct.pack(">I", part.checksum) for part in image.partitions
                                     if part.checksum_type == CHECKSUM_CRC32))
        if master != image.master_checksum:
            raise FormatError(f"{label}: master checksum mismatch (CRC-32 {master:08x}, "
                              f"koly says {image.master_checksum:08x})")


def unpack(source: bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO) -> bytes:
    """The raw disk the image holds, verified (for tests and inspection of small images)."""
    buffer = io.BytesIO()
    extract(source, buffer)
    return buffer.getvalue()
