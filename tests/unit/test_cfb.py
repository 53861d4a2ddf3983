import io
import os
import struct

import olefile
import pytest

from builder.binfmt import cfb
from builder.errors import FormatError

FREESECT, ENDOFCHAIN, FATSECT, DIFSECT, NOSTREAM = (
    0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFC, 0xFFFFFFFF)
SIGNATURE_STREAM = "\x05DigitalSignature"


def make_cfb(streams: dict[str, bytes], *, shift: int = 9, interleave: bool = False,
             min_fat: int = 0) -> bytes:
    """A compound file holding `streams` ("a/b" is stream b in storage a).

    interleave=True allocates the big streams' sectors round-robin, so no chain is contiguous;
    min_fat forces that many FAT sectors (more than 109 need DIFAT sectors).
    """
    size = 1 << shift
    per = size // 4
    sectors: list[bytes] = []
    links: dict[int, int] = {}

    def chain(sector_ids: list[int]) -> int:
        for a, b in zip(sector_ids, sector_ids[1:] + [ENDOFCHAIN]):
            links[a] = b
        return sector_ids[0] if sector_ids else ENDOFCHAIN

    def chunks(data: bytes, unit: int) -> list[bytes]:
        return [data[i:i + unit].ljust(unit, b"\0") for i in range(0, len(data), unit)]

    # The directory tree: storages are dicts, streams are bytes.
    tree: dict = {}
    for path, data in streams.items():
        node = tree
        *storages, leaf = path.split("/")
        for part in storages:
            node = node.setdefault(part, {})
        node[leaf] = data

    big = [(path, data) for path, data in streams.items() if len(data) >= 4096]
    pending = {path: chunks(data, size) for path, data in big}
    ids: dict[str, list[int]] = {path: [] for path, _ in big}
    while any(pending.values()):
        for path in pending:
            for _ in range(1 if interleave else len(pending[path])):
                if pending[path]:
                    ids[path].append(len(sectors))
                    sectors.append(pending[path].pop(0))
    starts = {path: chain(sector_ids) for path, sector_ids in ids.items()}

    mini = bytearray()
    minifat: list[int] = []
    for path, data in streams.items():
        if 0 < len(data) < 4096:
            first = len(mini) // 64
            count = -(-len(data) // 64)
            minifat += [first + i + 1 for i in range(count - 1)] + [ENDOFCHAIN]
            mini += data.ljust(count * 64, b"\0")
            starts[path] = first
    container = list(range(len(sectors), len(sectors) + len(chunks(bytes(mini), size))))
    sectors += chunks(bytes(mini), size)
    mini_start = chain(container)
    raw_minifat = struct.pack(f"<{len(minifat)}I", *minifat)
    minifat_ids = list(range(len(sectors), len(sectors) + len(chunks(raw_minifat, size))))
    sectors += chunks(raw_minifat, size)
    minifat_start = chain(minifat_ids)

    entries: list[bytes] = []

    def entry(name: str, kind: int, child: int, start: int, length: int) -> bytes:
        raw = name.encode("utf-16-le") + b"\0\0"
        return struct.pack("<64sHBBIII16sIQQIQ", raw, len(raw), kind, 1, NOSTREAM, NOSTREAM,
                           child, bytes(16), 0, 0, 0, start, length)

    def add(name: str, node, path: str) -> int:
        index = len(entries)
        entries.append(b"")
        if isinstance(node, dict):
            names = sorted(node, key=lambda n: (len(n), n.upper()))
            kids = [add(n, node[n], f"{path}{n}" if not path else f"{path}/{n}") for n in names]
            for a, b in zip(kids, kids[1:]):  # a right-leaning chain is a valid search tree
                entries[a] = entries[a][:72] + struct.pack("<I", b) + entries[a][76:]
            kind, start, length = (5, mini_start, len(mini)) if index == 0 else (1, 0, 0)
            entries[index] = entry(name, kind, kids[0] if kids else NOSTREAM, start, length)
        else:
            start = starts.get(path, ENDOFCHAIN) if node else ENDOFCHAIN
            entries[index] = entry(name, 2, NOSTREAM, start, len(node))
        return index

    add("Root Entry", tree, "")
    unused = struct.pack("<64sHBBIII16sIQQIQ", b"", 0, 0, 0, NOSTREAM, NOSTREAM, NOSTREAM,
                         bytes(16), 0, 0, 0, 0, 0)
    while len(entries) * 128 % size:
        entries.append(unused)
    dir_chunks = chunks(b"".join(entries), size)
    dir_ids = list(range(len(sectors), len(sectors) + len(dir_chunks)))
    sectors += dir_chunks
    dir_start = chain(dir_ids)

    fat_count, difat_count = max(min_fat, 1), 0
    while True:
        total = len(sectors) + fat_count + difat_count
        need_difat = -(-max(fat_count - 109, 0) // (per - 1))
        if fat_count * per >= total and difat_count >= need_difat:
            break
        fat_count, difat_count = max(fat_count, -(-total // per)), need_difat
    fat_ids = list(range(len(sectors), len(sectors) + fat_count))
    difat_ids = list(range(fat_ids[-1] + 1, fat_ids[-1] + 1 + difat_count))
    fat = [FREESECT] * (fat_count * per)
    for a, b in links.items():
        fat[a] = b
    for s in fat_ids:
        fat[s] = FATSECT
    for s in difat_ids:
        fat[s] = DIFSECT
    sectors += chunks(struct.pack(f"<{len(fat)}I", *fat), size)
    rest = fat_ids[109:]
    for i, s in enumerate(difat_ids):
        body = rest[i * (per - 1):(i + 1) * (per - 1)]
        body += [FREESECT] * (per - 1 - len(body))
        nxt = difat_ids[i + 1] if i + 1 < len(difat_ids) else ENDOFCHAIN
        sectors.append(struct.pack(f"<{per}I", *body, nxt))

    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII", cfb.SIGNATURE, bytes(16), 0x3E, 3 if shift == 9 else 4,
        0xFFFE, shift, 6, bytes(6), len(dir_ids) if shift == 12 else 0, fat_count, dir_start, 0,
        4096, minifat_start, len(minifat_ids), difat_ids[0] if difat_ids else ENDOFCHAIN,
        difat_count)
    head_difat = (fat_ids[:109] + [FREESECT] * 109)[:109]
    header += struct.pack("<109I", *head_difat)
    return header.ljust(size, b"\0") + b"".join(sectors)


STREAMS = {
    SIGNATURE_STREAM: os.urandom(11800),
    "\x05SummaryInformation": os.urandom(496),
    "\u4840\u3b3f\u43f2\u4438\u45b1": os.urandom(4096),  # an MSI-encoded table name
    "tiny": b"x",
    "exactly_below_cutoff": os.urandom(4095),
    "big": os.urandom(40000),
    "empty": b"",
    "Storage/inner": os.urandom(5000),
    "Storage/small": os.urandom(100),
}


def olefile_streams(data: bytes) -> dict[str, bytes]:
    with olefile.OleFileIO(io.BytesIO(data)) as ole:
        return {"/".join(p): ole.openstream(p).read() for p in ole.listdir(storages=False)}


@pytest.mark.parametrize("shift", [9, 12])
@pytest.mark.parametrize("interleave", [False, True])
def test_streams_agree_with_olefile(shift, interleave):
    data = make_cfb(STREAMS, shift=shift, interleave=interleave)
    assert olefile_streams(data) == STREAMS
    for name, content in STREAMS.items():
        assert cfb.read_stream(data, name) == content
        extents = cfb.stream_extents(data, name)
        assert sum(length for _, length in extents) == len(content)
        assert b"".join(data[o:o + n] for o, n in extents) == content


def test_contiguous_stream_is_one_extent():
    data = make_cfb(STREAMS)
    assert len(cfb.stream_extents(data, "big")) == 1
    assert len(cfb.stream_extents(data, "exactly_below_cutoff")) == 1  # mini sectors too


def test_interleaved_stream_has_several_extents_in_stream_order():
    data = make_cfb(STREAMS, interleave=True)
    extents = cfb.stream_extents(data, SIGNATURE_STREAM)
    assert len(extents) == -(-len(STREAMS[SIGNATURE_STREAM]) // 512)
    assert all(length == 512 for _, length in extents[:-1])
    assert extents[-1][1] == len(STREAMS[SIGNATURE_STREAM]) % 512


def test_mini_stream_extents_point_into_the_mini_stream_container():
    data = make_cfb(STREAMS)
    (offset, length), = cfb.stream_extents(data, "\x05SummaryInformation")
    assert length == 496 and data[offset:offset + length] == STREAMS["\x05SummaryInformation"]


def test_empty_stream_has_no_extents():
    assert cfb.stream_extents(make_cfb(STREAMS), "empty") == []


def test_difat_sectors_are_followed():
    streams = {SIGNATURE_STREAM: os.urandom(9000), "other": os.urandom(5000)}
    data = make_cfb(streams, min_fat=300, interleave=True)  # 300 FAT sectors: 2 DIFAT sectors
    assert struct.unpack_from("<I", data, 0x48)[0] == 2
    assert olefile_streams(data) == streams
    assert cfb.read_stream(data, SIGNATURE_STREAM) == streams[SIGNATURE_STREAM]


def test_names_compare_without_case():
    data = make_cfb(STREAMS)
    assert cfb.read_stream(data, "\x05digitalsignature") == STREAMS[SIGNATURE_STREAM]
    assert cfb.read_stream(data, "STORAGE/Inner") == STREAMS["Storage/inner"]


def test_missing_stream_and_storage_raise_format_error():
    data = make_cfb(STREAMS)
    with pytest.raises(FormatError, match="no stream"):
        cfb.stream_extents(data, "nope")
    with pytest.raises(FormatError, match="storage"):
        cfb.stream_extents(data, "Storage")


def test_not_a_compound_file_raises_format_error():
    with pytest.raises(FormatError, match="x.exe is not an MSI"):
        cfb.stream_extents(b"MZ" + bytes(1000), SIGNATURE_STREAM, "x.exe")
    with pytest.raises(FormatError):
        cfb.stream_extents(b"", SIGNATURE_STREAM)


@pytest.mark.parametrize("keep", [8, 100, 511, 2048, 0.5, 0.9, -1])
def test_truncated_file_raises_format_error(keep):
    data = make_cfb(STREAMS, interleave=True)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    with pytest.raises(FormatError):
        for name in STREAMS:
            cfb.stream_extents(data[:cut], name)


def test_unsupported_version_raises_format_error():
    data = bytearray(make_cfb(STREAMS))
    struct.pack_into("<H", data, 0x1A, 5)
    with pytest.raises(FormatError, match="unsupported"):
        cfb.stream_extents(bytes(data), "big")


def test_fat_loop_raises_format_error():
    streams = {"big": os.urandom(8192)}
    data = bytearray(make_cfb(streams))
    start = cfb.stream_extents(bytes(data), "big")[0][0] // 512 - 1
    fat = (struct.unpack_from("<I", data, 0x4C)[0] + 1) * 512
    struct.pack_into("<I", data, fat + 4 * start, start)  # the first sector points at itself
    with pytest.raises(FormatError, match="loops|shorter|broken"):
        cfb.read_stream(bytes(data), "big")


def test_mini_fat_loop_raises_format_error():
    data = bytearray(make_cfb({"small": os.urandom(300)}))
    minifat = (struct.unpack_from("<I", data, 0x3C)[0] + 1) * 512
    struct.pack_into("<I", data, minifat + 4, 0)  # mini sector 1 points back at 0
    with pytest.raises(FormatError, match="loops"):
        cfb.read_stream(bytes(data), "small")


def test_directory_loop_raises_format_error():
    data = bytearray(make_cfb({"a": b"1", "b": b"2"}))
    first_dir = struct.unpack_from("<I", data, 0x30)[0]
    entry_a = (first_dir + 1) * 512 + 128
    struct.pack_into("<I", data, entry_a + 0x44, 1)  # "a"'s left sibling is "a"
    with pytest.raises(FormatError, match="loops"):
        cfb.read_stream(bytes(data), "zzz")
