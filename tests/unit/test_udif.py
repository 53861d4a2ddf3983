"""builder.binfmt.udif with bytes only: a synthetic Apple-partitioned disk, written and read back."""

from __future__ import annotations

import io
import plistlib
import random
import struct
import zlib

import pytest

from builder.binfmt import udif
from builder.errors import FormatError

BLOCK = 2048  # APM block size, as xorriso -apm-block-size 2048 writes it


def _apm_entry(count: int, start: int, blocks: int, name: bytes, kind: bytes) -> bytes:
    entry = b"PM" + bytes(2) + struct.pack(">III", count, start, blocks) + name.ljust(32, b"\0") + kind.ljust(32, b"\0")
    return entry.ljust(BLOCK, b"\0")


def make_disk(*, hfs_blocks: int = 1536, seed: int = 1) -> bytes:
    """DDM + 3-entry APM + a gap + an "ISO" region + an Apple_HFS region holding random,
    zero and repetitive megabytes + a trailing unmapped zero tail."""
    rng = random.Random(seed)
    entries = [  # (start block, blocks, name, type)
        (1, 3, b"Apple", b"Apple_partition_map"),
        (16, 16, b"Gap0", b"ISO9660_data"),
        (32, hfs_blocks, b"HFSPLUS_Hybrid", b"Apple_HFS"),
    ]
    total_blocks = 32 + hfs_blocks + 40
    disk = bytearray(total_blocks * BLOCK)
    disk[0:8] = b"ER" + struct.pack(">HI", BLOCK, total_blocks)
    for index, (start, blocks, name, kind) in enumerate(entries, 1):
        disk[index * BLOCK:(index + 1) * BLOCK] = _apm_entry(len(entries), start, blocks, name, kind)
    disk[16 * BLOCK:16 * BLOCK + 6] = b"\x01CD001"
    hfs, end = 32 * BLOCK, (32 + hfs_blocks) * BLOCK
    mib = 1 << 20
    text = b"".join(b"line %d of a repetitive text file\n" % i for i in range(40000))
    # incompressible (a raw chunk), zeros (a zero-fill chunk), repetitive (zlib chunks)
    content = rng.randbytes(mib) + bytes(mib) + text * 4
    disk[hfs:end] = content[:end - hfs]
    return bytes(disk)


@pytest.fixture(scope="module")
def disk() -> bytes:
    return make_disk()


@pytest.fixture(scope="module")
def dmg(disk) -> bytes:
    out = io.BytesIO()
    udif.write(disk, out)
    return out.getvalue()


def koly_of(image: bytes) -> tuple:
    return udif._KOLY.unpack(image[-512:])


def rewrap(image: bytes, mutate) -> bytes:
    """The image with its plist passed through `mutate(plist)` and the koly XML length fixed."""
    k = list(koly_of(image))
    xml_offset, xml_length = k[15], k[16]
    plist = plistlib.loads(image[xml_offset:xml_offset + xml_length])
    mutate(plist)
    xml = plistlib.dumps(plist)
    k[16] = len(xml)
    return image[:xml_offset] + xml + udif._KOLY.pack(*k)


def set_koly(image: bytes, **fields: int) -> bytes:
    names = ["sig", "version", "header_size", "flags", "running", "fork_offset", "fork_length", "rsrc_offset",
             "rsrc_length", "seg_number", "seg_count", "seg_id", "data_ck_type", "data_ck_bits", "data_ck",
             "xml_offset", "xml_length", "reserved", "master_ck_type", "master_ck_bits", "master_ck", "variant",
             "sectors", "reserved2"]
    k = list(koly_of(image))
    for name, value in fields.items():
        k[names.index(name)] = value
    return image[:-512] + udif._KOLY.pack(*k)


def table(plist: dict, name_part: str) -> dict:
    return next(e for e in plist["resource-fork"]["blkx"] if name_part in e["Name"])


# --- round trip and layout --------------------------------------------------------------------


def test_round_trip_gives_the_raw_disk_back(disk, dmg):
    assert udif.unpack(dmg) == disk
    assert len(dmg) < len(disk) // 2


def test_file_path_input_and_output_match_bytes(disk, dmg, tmp_path):
    raw = tmp_path / "disk.img"
    raw.write_bytes(disk)
    written = udif.write(raw, tmp_path / "disk.dmg", workers=1)
    assert (tmp_path / "disk.dmg").read_bytes() == dmg
    assert written.size == len(dmg) and written.raw_size == len(disk)
    udif.extract(tmp_path / "disk.dmg", tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == disk


def test_one_table_per_map_entry_and_gap_in_disk_order(disk, dmg):
    image = udif.read(dmg)
    spans = [(p.id, p.name, p.first_sector, p.sector_count) for p in image.partitions]
    hfs_sectors = 1536 * 4
    assert spans == [
        (-1, "Driver Descriptor Map (DDM : 0)", 0, 1),
        (0, " (Apple_Free : 1)", 1, 3),
        (1, "Apple (Apple_partition_map : 2)", 4, 12),
        (2, " (Apple_Free : 3)", 16, 48),
        (3, "Gap0 (ISO9660_data : 4)", 64, 64),
        (4, "HFSPLUS_Hybrid (Apple_HFS : 5)", 128, hfs_sectors),
        (5, " (Apple_Free : 6)", 128 + hfs_sectors, 160),
    ]
    assert image.sector_count * 512 == len(disk)
    assert image.variant == udif.VARIANT_DEVICE
    assert image.resources == ("blkx", "plst")


def test_chunk_kinds_raw_zero_fill_zlib(dmg):
    hfs = next(p for p in udif.read(dmg).partitions if "Apple_HFS" in p.name)
    kinds = [(c.kind, c.sector_count) for c in hfs.chunks]
    assert kinds == [(udif.RAW, 2048), (udif.ZERO_FILL, 2048), (udif.ZLIB, 2048)]
    zero = hfs.chunks[1]
    assert zero.length == 0
    assert hfs.chunks[0].length == 1 << 20
    assert hfs.chunks[2].length < 100_000
    # Unmapped all-zero regions cost no data-fork bytes either.
    tail = udif.read(dmg).partitions[-1]
    assert [(c.kind, c.length) for c in tail.chunks] == [(udif.ZERO_FILL, 0)]


def test_koly_trailer_fields(disk, dmg):
    (sig, version, header_size, flags, running, fork_offset, fork_length, rsrc_offset, rsrc_length, seg_number,
     seg_count, seg_id, data_ck_type, data_ck_bits, data_ck, xml_offset, xml_length, _, master_type, master_bits,
     master_ck, variant, sectors, _) = koly_of(dmg)
    assert (sig, version, header_size, flags) == (b"koly", 4, 512, 1)
    assert (running, fork_offset, rsrc_offset, rsrc_length) == (0, 0, 0, 0)
    assert (seg_number, seg_count) == (1, 1)
    assert seg_id[6] >> 4 == 8 and seg_id[8] >> 6 == 2  # a version-8, RFC-variant UUID
    assert xml_offset == fork_length and xml_offset + xml_length + 512 == len(dmg)
    assert (data_ck_type, data_ck_bits, master_type, master_bits) == (2, 32, 2, 32)
    assert struct.unpack(">I", data_ck[:4])[0] == zlib.crc32(dmg[:fork_length])
    assert data_ck[4:] == bytes(124)
    plist = plistlib.loads(dmg[xml_offset:xml_offset + xml_length])
    crcs = b"".join(e["Data"][0x48:0x4C] for e in plist["resource-fork"]["blkx"])
    assert struct.unpack(">I", master_ck[:4])[0] == zlib.crc32(crcs)
    assert variant == 1 and sectors * 512 == len(disk)


def test_plist_entries_as_hdiutil_writes_them(dmg):
    k = koly_of(dmg)
    xml = dmg[k[15]:k[15] + k[16]]
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>') and xml.rstrip().endswith(b"</plist>")
    plist = plistlib.loads(xml)
    entry = table(plist, "Apple_HFS")
    assert entry["Attributes"] == "0x0050" and entry["ID"] == "4" and entry["CFName"] == entry["Name"]
    # dmg2img finds each Name by searching forward from its Data: Data must come first.
    assert xml.index(b"<key>Data</key>") < xml.index(b"<key>Name</key>")
    mish = entry["Data"]
    assert mish[:4] == b"mish" and struct.unpack(">I", mish[4:8])[0] == 1
    assert struct.unpack(">I", mish[0x24:0x28])[0] == 4  # blocks descriptor = ID
    assert plist["resource-fork"]["plst"][0]["Data"][0x210:0x214] == b"\0\x01\0\x01"


def test_terminators_carry_the_absolute_data_fork_offset(dmg):
    """dmg2img switches to absolute chunk offsets only after a terminator with a non-zero offset."""
    plist = plistlib.loads(dmg[koly_of(dmg)[15]:-512])
    position = 0
    for entry in plist["resource-fork"]["blkx"]:
        mish = entry["Data"]
        count = struct.unpack(">I", mish[0xC8:0xCC])[0]
        runs = [udif._RUN.unpack_from(mish, 0xCC + 40 * i) for i in range(count)]
        for kind, _, _, _, offset, length in runs[:-1]:
            assert offset == position
            position += length
        assert runs[-1][0] == udif.TERMINATOR and runs[-1][4] == position > 0


def test_disk_without_partition_map_is_one_whole_disk_table():
    raw = random.Random(3).randbytes(4096) + bytes(8192)
    out = io.BytesIO()
    written = udif.write(raw, out)
    image = udif.read(out.getvalue())
    assert written.partitions == ("whole disk (unknown partition : 0)",)
    assert [(p.id, p.first_sector, p.sector_count) for p in image.partitions] == [(-1, 0, 24)]
    assert image.variant == udif.VARIANT_PARTITION
    assert udif.unpack(out.getvalue()) == raw


# --- determinism ------------------------------------------------------------------------------


def test_identical_input_gives_identical_bytes_whatever_the_thread_count(disk, dmg):
    for workers in (1, 3):
        out = io.BytesIO()
        udif.write(bytearray(disk), out, workers=workers)
        assert out.getvalue() == dmg


def test_segment_id_follows_the_content(disk, dmg):
    changed = bytearray(disk)
    changed[-40 * BLOCK] = 1  # one byte in the unmapped tail
    out = io.BytesIO()
    udif.write(changed, out)
    assert koly_of(out.getvalue())[11] != koly_of(dmg)[11]
    assert udif.unpack(out.getvalue()) == changed


def test_level_changes_only_the_compressed_chunks(disk):
    fast, small = io.BytesIO(), io.BytesIO()
    udif.write(disk, fast, level=1)
    udif.write(disk, small, level=9)
    assert udif.unpack(fast.getvalue()) == udif.unpack(small.getvalue()) == disk
    assert len(small.getvalue()) < len(fast.getvalue())


# --- writer input errors ----------------------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    (b"", "not a whole number"),
    (bytes(1000), "not a whole number"),
])
def test_writer_rejects_partial_sectors(raw, message):
    with pytest.raises(FormatError, match=message):
        udif.write(raw, io.BytesIO())


def test_writer_rejects_a_partition_outside_the_disk():
    disk = bytearray(make_disk(hfs_blocks=16))
    disk[3 * BLOCK:4 * BLOCK] = _apm_entry(3, 32, 10_000, b"HFSPLUS_Hybrid", b"Apple_HFS")
    with pytest.raises(FormatError, match="outside the image"):
        udif.write(bytes(disk), io.BytesIO())


def test_writer_rejects_overlapping_partitions():
    disk = bytearray(make_disk(hfs_blocks=16))
    disk[2 * BLOCK:3 * BLOCK] = _apm_entry(3, 16, 20, b"Gap0", b"ISO9660_data")
    with pytest.raises(FormatError, match="overlaps"):
        udif.write(bytes(disk), io.BytesIO())


def test_writer_rejects_a_ddm_without_partition_map():
    disk = bytearray(make_disk(hfs_blocks=16))
    disk[BLOCK:BLOCK + 2] = b"XX"
    with pytest.raises(FormatError, match="no Apple Partition Map"):
        udif.write(bytes(disk), io.BytesIO())


# --- reader: truncated and corrupted images ---------------------------------------------------


def test_truncated_image_has_no_koly(dmg):
    with pytest.raises(FormatError, match="no koly trailer"):
        udif.read(dmg[:-100])
    with pytest.raises(FormatError, match="shorter than the 512-byte koly"):
        udif.read(dmg[-300:])


def test_image_cut_before_its_plist(dmg):
    fork_length = koly_of(dmg)[6]
    cut = dmg[:fork_length // 2] + dmg[-512:]
    with pytest.raises(FormatError, match="data fork .* runs past"):
        udif.read(cut)


def test_bad_koly_version(dmg):
    with pytest.raises(FormatError, match="koly version 3"):
        udif.read(set_koly(dmg, version=3))


def test_xml_length_past_the_end(dmg):
    with pytest.raises(FormatError, match="XML plist .* runs past"):
        udif.read(set_koly(dmg, xml_length=len(dmg)))


def test_corrupted_plist(dmg):
    k = koly_of(dmg)
    start = dmg.index(b"<dict>", k[15])
    broken = dmg[:start] + b"<dixt>" + dmg[start + 6:]
    with pytest.raises(FormatError, match="not a valid property list"):
        udif.read(broken)


def test_plist_without_blkx(dmg):
    bad = rewrap(dmg, lambda p: p["resource-fork"].pop("blkx"))
    with pytest.raises(FormatError, match="no resource-fork/blkx"):
        udif.read(bad)


def test_corrupted_chunk_fails_the_data_fork_checksum(dmg):
    hfs = next(p for p in udif.read(dmg).partitions if "Apple_HFS" in p.name)
    at = hfs.chunks[2].offset + 100  # inside the zlib chunk
    bad = dmg[:at] + bytes([dmg[at] ^ 0xFF]) + dmg[at + 1:]
    udif.read(bad)  # the structure is intact...
    with pytest.raises(FormatError, match="data fork checksum mismatch"):
        udif.extract(bad, None)  # ...the data is not


def test_corrupted_zlib_chunk_is_caught_without_the_fork_checksum(dmg):
    hfs = next(p for p in udif.read(dmg).partitions if "Apple_HFS" in p.name)
    at = hfs.chunks[2].offset + 100
    bad = set_koly(dmg[:at] + bytes([dmg[at] ^ 0xFF]) + dmg[at + 1:], data_ck_type=0)
    with pytest.raises(FormatError, match=r"'HFSPLUS_Hybrid \(Apple_HFS : 5\)' chunk 2"):
        udif.extract(bad, None)


def test_corrupted_raw_chunk_fails_the_table_checksum(dmg):
    hfs = next(p for p in udif.read(dmg).partitions if "Apple_HFS" in p.name)
    at = hfs.chunks[0].offset + 5  # raw chunk: no decompressor to notice
    bad = set_koly(dmg[:at] + bytes([dmg[at] ^ 0x01]) + dmg[at + 1:], data_ck_type=0)
    with pytest.raises(FormatError, match=r"'HFSPLUS_Hybrid \(Apple_HFS : 5\)' checksum mismatch"):
        udif.extract(bad, None)


def test_master_checksum_mismatch(dmg):
    bad = set_koly(dmg, master_ck=b"\xde\xad\xbe\xef".ljust(128, b"\0"))
    with pytest.raises(FormatError, match="master checksum mismatch"):
        udif.extract(bad, None)


def _edit_mish(dmg: bytes, name_part: str, edit) -> bytes:
    def mutate(plist):
        entry = table(plist, name_part)
        entry["Data"] = edit(bytearray(entry["Data"]))
    return rewrap(dmg, mutate)


def test_bad_mish_signature(dmg):
    bad = _edit_mish(dmg, "Apple_HFS", lambda m: b"MISH" + m[4:])
    with pytest.raises(FormatError, match="lacks its 'mish' signature"):
        udif.read(bad)


def test_truncated_chunk_table(dmg):
    bad = _edit_mish(dmg, "Apple_HFS", lambda m: bytes(m[:-50]))
    with pytest.raises(FormatError, match="is truncated: it lists 4 chunks"):
        udif.read(bad)


def test_chunk_outside_the_data_fork(dmg):
    def edit(m):
        struct.pack_into(">Q", m, 0xCC + 24, 1 << 40)  # first chunk's offset
        return bytes(m)
    with pytest.raises(FormatError, match="lies outside the data fork"):
        udif.read(_edit_mish(dmg, "Apple_HFS", edit))


def test_tables_with_a_hole(dmg):
    def edit(m):
        struct.pack_into(">Q", m, 8, struct.unpack_from(">Q", m, 8)[0] + 4)  # first sector
        return bytes(m)
    with pytest.raises(FormatError, match="starts at sector 132, expected 128"):
        udif.read(_edit_mish(dmg, "Apple_HFS", edit))


def test_unsupported_chunk_type(dmg):
    def edit(m):
        struct.pack_into(">I", m, 0xCC + 2 * 40, udif.ADC)  # the zlib chunk claims ADC
        return bytes(m)
    with pytest.raises(FormatError, match="chunk type ADC is not supported"):
        udif.extract(_edit_mish(dmg, "Apple_HFS", edit), None)


def test_ignore_chunks_read_as_zeros_and_stay_out_of_the_checksum(dmg, disk):
    """hdiutil marks free space "ignore" (type 2) and sums only the other chunks."""
    def edit(m):
        struct.pack_into(">I", m, 0xCC + 40, udif.IGNORE)  # the zero-fill chunk
        raw_mib = disk[128 * 512:128 * 512 + (1 << 20)]
        compressible = disk[128 * 512 + (2 << 20):128 * 512 + 1536 * BLOCK]
        struct.pack_into(">I", m, 0x48, zlib.crc32(compressible, zlib.crc32(raw_mib)))
        return bytes(m)

    def fix_master(image):
        plist = plistlib.loads(image[koly_of(image)[15]:-512])
        crcs = b"".join(e["Data"][0x48:0x4C] for e in plist["resource-fork"]["blkx"])
        return set_koly(image, master_ck=struct.pack(">I", zlib.crc32(crcs)).ljust(128, b"\0"))

    image = fix_master(_edit_mish(dmg, "Apple_HFS", edit))
    assert udif.unpack(image) == disk
