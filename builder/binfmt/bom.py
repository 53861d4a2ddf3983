"""Apple BOM ("BOMStore") files: the `Bom` of a component package, as mkbom writes it.

A BOM is a 512-byte header, a table of named variables, numbered blocks, and an index giving each
block's offset and length (big-endian throughout). Block 0 is the null block. The variables are
`BomInfo`, `Paths`, `HLIndex`, `VIndex` and `Size64`; block numbers follow what Apple's mkbom
uses (1 BomInfo, 2-3 Paths, 4-5 HLIndex, 6-8 VIndex, 9-10 Size64, then one (record, name, id)
triple per path), so a BOM from here diffs cleanly against one from macOS.

`Paths` is a B-tree: leaf nodes of `BLOCK_SIZE` bytes list up to `LEAF_CAPACITY` paths, linked
forward and backward; above them index nodes point at children. Each path has an id (1 for ".",
then breadth-first in name order), a name block (parent id + leaf name) and a record (type, mode,
uid, gid, mtime, size, and for files the POSIX `cksum` CRC). Leaves list parents before children,
as the readers resolve a path through its parent's id.

Not written: per-architecture Mach-O records (Installer does not need them), hard links (each
link is recorded as a separate file), and files of 4 GiB or more (Size64 stays empty).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from builder.binfmt.cksum import cksum, cksum_file
from builder.binfmt.cpio import DEFAULT_GID, DEFAULT_UID, TreeEntry, scan_tree
from builder.errors import PayloadError

MAGIC = b"BOMStore"
HEADER_SIZE = 512
BLOCK_SIZE = 4096  # node size of the Paths, HLIndex and Size64 trees
VINDEX_BLOCK_SIZE = 128  # the VIndex tree uses small nodes
LEAF_CAPACITY = 256  # paths per leaf node, as bomutils' mkbom (Apple's nodes hold up to 510)
INDEX_CAPACITY = 256  # children per index node

_TYPE = {"file": 1, "dir": 2, "symlink": 3}
# Record flags: low nibble 0xF = full (not path-only) record; high nibble = Mach-O kind, 0 here.
_RECORD_FLAGS = 0x000F
_NODE = struct.Struct(">HHII")  # is_leaf, count, forward, backward
_TREE = struct.Struct(">4sIIIIB")  # "tree", version, root node block, block size, paths, 0
_RECORD = struct.Struct(">BBHHIIIIB")  # type, 1, flags, mode, uid, gid, mtime, size, 1
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class _Path:
    entry: TreeEntry
    path_id: int
    parent_id: int
    name: bytes


class _Blocks:
    """Numbered blocks; numbers can be reserved first and filled later."""

    def __init__(self) -> None:
        self._data: list[bytes | None] = [b""]  # block 0: the null block

    def reserve(self) -> int:
        self._data.append(None)
        return len(self._data) - 1

    def add(self, data: bytes) -> int:
        self._data.append(data)
        return len(self._data) - 1

    def set(self, index: int, data: bytes) -> None:
        self._data[index] = data

    def __iter__(self):
        for index, data in enumerate(self._data):
            assert data is not None, f"BOM block {index} reserved but never written"
            yield data

    def __len__(self) -> int:
        return len(self._data)


def _breadth_first(entries: Sequence[TreeEntry]) -> list[_Path]:
    """Assign path ids breadth-first, children in byte order of their names."""
    by_path = {entry.path: entry for entry in entries}
    if "" not in by_path:
        raise PayloadError("the BOM needs the root entry '.' of the payload tree")
    children: dict[str, list[str]] = {}
    for entry in entries:
        if entry.path:
            parent = entry.path.rpartition("/")[0]
            if parent not in by_path or by_path[parent].kind != "dir":
                raise PayloadError(f"{entry.path!r} has no parent folder in the payload tree")
            children.setdefault(parent, []).append(entry.path)
    ordered = [_Path(by_path[""], 1, 0, b".")]
    cursor = 0
    while cursor < len(ordered):
        parent = ordered[cursor]
        cursor += 1
        for path in sorted(children.get(parent.entry.path, ()), key=os.fsencode):
            name = os.fsencode(path.rpartition("/")[2])
            ordered.append(_Path(by_path[path], len(ordered) + 1, parent.path_id, name))
    return ordered


def _record(path: _Path) -> bytes:
    entry = path.entry
    if entry.size > 0xFFFFFFFF:
        raise PayloadError(f"{entry.archive_name} is {entry.size} bytes; files of 4 GiB or more "
                           "are not supported in a BOM")
    for field in ("uid", "gid", "mtime"):
        if getattr(entry, field) > 0xFFFFFFFF:
            raise PayloadError(f"{entry.archive_name}: {field} {getattr(entry, field)} does not "
                               "fit the BOM's 32-bit field")
    head = _RECORD.pack(_TYPE[entry.kind], 1, _RECORD_FLAGS, entry.mode & 0xFFFF, entry.uid,
                        entry.gid, entry.mtime, entry.size, 1)
    if entry.kind == "dir":
        return head + bytes(8)
    if entry.kind == "file":
        assert entry.source is not None
        crc, size = cksum_file(entry.source)
        if size != entry.size:
            raise PayloadError(f"{entry.source} changed size while the BOM was written",
                               hint="do not modify the payload folder during a build")
        return head + _U32.pack(crc) + bytes(8)
    target = entry.link_target or b""
    return (head + _U32.pack(cksum(target)) + _U32.pack(len(target) + 1) + target + b"\0"
            + bytes(8))


def _node(is_leaf: bool, pairs: Sequence[tuple[int, int]], forward: int, backward: int,
          size: int) -> bytes:
    body = _NODE.pack(int(is_leaf), len(pairs), forward, backward)
    body += b"".join(_U32.pack(a) + _U32.pack(b) for a, b in pairs)
    assert len(body) <= size
    return body + bytes(size - len(body))


def _write_level(blocks: _Blocks, nodes: list[tuple[int, list[tuple[int, int]]]],
                 is_leaf: bool) -> None:
    """Write sibling nodes (block number, entries), linked forward and backward."""
    for i, (index, pairs) in enumerate(nodes):
        forward = nodes[i + 1][0] if i + 1 < len(nodes) else 0
        backward = nodes[i - 1][0] if i > 0 else 0
        blocks.set(index, _node(is_leaf, pairs, forward, backward, BLOCK_SIZE))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def build_bom_entries(entries: Sequence[TreeEntry]) -> bytes:
    """A BOM describing `entries` (as from `builder.binfmt.cpio.scan_tree`)."""
    paths = _breadth_first(entries)
    blocks = _Blocks()

    info_block = blocks.reserve()  # 1
    paths_tree = blocks.reserve()  # 2
    paths_root = blocks.reserve()  # 3
    hl_tree = blocks.reserve()  # 4
    hl_leaf = blocks.reserve()  # 5
    vindex = blocks.reserve()  # 6
    v_tree = blocks.reserve()  # 7
    v_leaf = blocks.reserve()  # 8
    size64_tree = blocks.reserve()  # 9
    size64_leaf = blocks.reserve()  # 10

    # (path info block, name block) per path, in leaf order.
    pairs: list[tuple[int, int]] = []
    for path in paths:
        record = blocks.add(_record(path))
        name = blocks.add(_U32.pack(path.parent_id) + path.name + b"\0")
        info = blocks.add(_U32.pack(path.path_id) + _U32.pack(record))
        pairs.append((info, name))

    # Leaves, then index levels up to a single root, which always sits in block 3.
    level = _chunks(pairs, LEAF_CAPACITY)
    is_leaf = True
    while True:
        if len(level) == 1:
            _write_level(blocks, [(paths_root, level[0])], is_leaf)
            break
        numbered = [(blocks.reserve(), node) for node in level]
        _write_level(blocks, numbered, is_leaf)
        # An index entry: (child node, the last name block under that child).
        parents = [(index, node[-1][1]) for index, node in numbered]
        level = _chunks(parents, INDEX_CAPACITY)
        is_leaf = False

    files_and_links = sum(p.entry.size for p in paths if p.entry.kind != "dir") & 0xFFFFFFFF
    # BomInfo: version, number of paths + 1 (as Apple counts), then one (cpu type, 0, bytes, 0)
    # entry; cpu type 0 covers every non-Mach-O file.
    blocks.set(info_block, struct.pack(">IIIIIII", 1, len(paths) + 1, 1, 0, 0, files_and_links, 0))
    blocks.set(paths_tree, _TREE.pack(b"tree", 1, paths_root, BLOCK_SIZE, len(paths), 0))
    blocks.set(hl_tree, _TREE.pack(b"tree", 1, hl_leaf, BLOCK_SIZE, 0, 0))
    blocks.set(hl_leaf, _node(True, [], 0, 0, BLOCK_SIZE))
    blocks.set(vindex, struct.pack(">IIIB", 1, v_tree, 0, 0))
    blocks.set(v_tree, _TREE.pack(b"tree", 1, v_leaf, VINDEX_BLOCK_SIZE, 0, 0))
    blocks.set(v_leaf, _node(True, [], 0, 0, VINDEX_BLOCK_SIZE))
    blocks.set(size64_tree, _TREE.pack(b"tree", 1, size64_leaf, BLOCK_SIZE, 0, 0))
    blocks.set(size64_leaf, _node(True, [], 0, 0, BLOCK_SIZE))

    variables = [("BomInfo", info_block), ("Paths", paths_tree), ("HLIndex", hl_tree),
                 ("VIndex", vindex), ("Size64", size64_tree)]
    vars_data = _U32.pack(len(variables)) + b"".join(
        _U32.pack(index) + bytes([len(name)]) + name.encode("ascii") for name, index in variables)

    vars_offset = HEADER_SIZE
    offset = vars_offset + len(vars_data)
    body = bytearray()
    table = bytearray(_U32.pack(len(blocks)))
    for data in blocks:
        if data:
            table += _U32.pack(offset + len(body)) + _U32.pack(len(data))
            body += data
        else:
            table += bytes(8)  # the null block
    # Free list: no free blocks, and two empty slots as mkbom leaves them.
    table += _U32.pack(0) + bytes(16)
    index_offset = offset + len(body)

    header = struct.pack(">8sIIIIII", MAGIC, 1, len(blocks) - 1, index_offset, len(table),
                         vars_offset, len(vars_data))
    return header.ljust(HEADER_SIZE, b"\0") + vars_data + bytes(body) + bytes(table)


def build_bom(
    root: str | os.PathLike[str],
    *,
    mtime: int,
    uid: int = DEFAULT_UID,
    gid: int = DEFAULT_GID,
    modes: Mapping[str, int] | None = None,
) -> bytes:
    """A BOM for the tree at `root`, with the same scan and overrides as the Payload's cpio."""
    return build_bom_entries(scan_tree(root, mtime=mtime, uid=uid, gid=gid, modes=modes))
