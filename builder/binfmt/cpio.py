"""POSIX cpio "odc" archives (magic 070707), the format of a flat package's Payload and Scripts.

Apple's Installer extracts `Payload` as a (gzip-compressed) odc cpio whose names are "." and
"./relative/path", owned by root. This module scans a directory tree once into `TreeEntry`
records (sorted, owners and times fixed, modes normalised) that both this writer and the BOM
writer (`builder.binfmt.bom`) use, so the Payload and its Bom describe the same tree.

odc header: "070707" then dev, ino, mode, uid, gid, nlink, rdev (6 octal digits each), mtime
(11), namesize (6, including the NUL), filesize (11); then the name and NUL, then the data.
No alignment padding. The archive ends with an entry named "TRAILER!!!".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from builder.errors import FormatError, PayloadError

MAGIC = b"070707"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 76
DEFAULT_UID = 0  # root
DEFAULT_GID = 80  # what Fleet and bomutils' guides use; on macOS gid 80 is "admin", 0 is "wheel"
DIR_MODE = 0o755
EXEC_MODE = 0o755
FILE_MODE = 0o644
_CHUNK = 1 << 20
_BLOCK = 512  # GNU and BSD cpio pad the archive to a whole 512-byte block; kept for parity

# Field widths in octal digits, in header order.
_FIELDS = (
    ("dev", 6),
    ("ino", 6),
    ("mode", 6),
    ("uid", 6),
    ("gid", 6),
    ("nlink", 6),
    ("rdev", 6),
    ("mtime", 11),
    ("namesize", 6),
    ("filesize", 11),
)

Kind = Literal["dir", "file", "symlink"]


@dataclass(frozen=True)
class TreeEntry:
    """One path of a payload tree, with the metadata both the Payload and the Bom record."""

    path: str  # "" for the root, else "a/b" (POSIX separators, relative)
    kind: Kind
    mode: int  # full st_mode: type bits | permission bits
    uid: int
    gid: int
    mtime: int
    size: int  # file length, symlink target length, 0 for a directory
    source: Path | None = None  # the file to stream from (regular files only)
    link_target: bytes | None = None  # symlinks only

    @property
    def archive_name(self) -> str:
        """The name as the Payload stores it: "." or "./a/b"."""
        return "./" + self.path if self.path else "."


@dataclass(frozen=True)
class PayloadStats:
    """What PackageInfo's <payload numberOfFiles=... installKBytes=...> wants."""

    number_of_files: int  # every entry, "." included (what `lsbom -s | wc -l` counts)
    install_kbytes: int  # file and symlink bytes, rounded up to whole KiB


@dataclass(frozen=True)
class CpioEntry:
    """One entry read back from an odc archive."""

    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    ino: int = 0
    nlink: int = 0
    data: bytes | None = None  # only when read with `with_data=True`


def _normalised_mode(kind: Kind, st_mode: int) -> int:
    if kind == "dir":
        return stat.S_IFDIR | DIR_MODE
    if kind == "symlink":
        return stat.S_IFLNK | EXEC_MODE
    executable = st_mode & 0o111
    return stat.S_IFREG | (EXEC_MODE if executable else FILE_MODE)


def _override_key(key: str) -> str:
    key = key.strip("/")
    while key.startswith("./"):
        key = key[2:]
    return "" if key == "." else key


def scan_tree(
    root: str | os.PathLike[str],
    *,
    mtime: int,
    uid: int = DEFAULT_UID,
    gid: int = DEFAULT_GID,
    modes: Mapping[str, int] | None = None,
) -> list[TreeEntry]:
    """Every path under `root` (root itself first as ""), depth-first, children sorted by name.

    Directories become 0755, files 0755 if any execute bit is set else 0644, symlinks 0755
    (symlinks are stored, never followed). `modes` maps a relative path ("" or "." for the root)
    to the permission bits to use instead. Owner and mtime are the same for every entry.
    """
    base = Path(root)
    if not base.is_dir():
        raise PayloadError(f"payload folder {base} does not exist or is not a folder",
                           hint="point the build at the folder that holds the files to install")
    for name, value in (("mtime", mtime), ("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or value < 0:
            raise PayloadError(f"{name} must be a non-negative integer, got {value!r}")
    overrides = {_override_key(key): value for key, value in (modes or {}).items()}

    entries: list[TreeEntry] = []

    def visit(path: Path, rel: str) -> None:
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            kind: Kind = "dir"
        elif stat.S_ISREG(st.st_mode):
            kind = "file"
        elif stat.S_ISLNK(st.st_mode):
            kind = "symlink"
        else:
            raise PayloadError(f"{path} is neither a file, a folder nor a symlink",
                               hint="remove devices, sockets and pipes from the payload folder")
        mode = _normalised_mode(kind, st.st_mode)
        if rel in overrides:
            mode = stat.S_IFMT(mode) | (overrides.pop(rel) & 0o7777)
        if kind == "file":
            entries.append(TreeEntry(rel, kind, mode, uid, gid, mtime, st.st_size, source=path))
        elif kind == "symlink":
            target = os.fsencode(os.readlink(path))
            entries.append(TreeEntry(rel, kind, mode, uid, gid, mtime, len(target),
                                     link_target=target))
        else:
            entries.append(TreeEntry(rel, kind, mode, uid, gid, mtime, 0))
            children = sorted(os.listdir(path), key=os.fsencode)
            for child in children:
                visit(path / child, f"{rel}/{child}" if rel else child)

    visit(base, "")
    if overrides:
        unknown = ", ".join(sorted(overrides))
        raise PayloadError(f"mode overrides name paths that are not in {base}: {unknown}",
                           hint="give paths relative to the payload folder, e.g. 'bin/agent'")
    return entries


def payload_stats(entries: Sequence[TreeEntry]) -> PayloadStats:
    total = sum(entry.size for entry in entries if entry.kind != "dir")
    return PayloadStats(number_of_files=len(entries), install_kbytes=(total + 1023) // 1024)


def _header(*, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int,
            namesize: int, filesize: int, what: str) -> bytes:
    values = {"dev": 0, "ino": ino, "mode": mode, "uid": uid, "gid": gid, "nlink": nlink,
              "rdev": 0, "mtime": mtime, "namesize": namesize, "filesize": filesize}
    out = bytearray(MAGIC)
    for field, width in _FIELDS:
        value = values[field]
        if value >= 8 ** width:
            raise PayloadError(f"{what}: {field} {value} does not fit the cpio odc header "
                               f"({width} octal digits)")
        out += b"%0*o" % (width, value)
    return bytes(out)


def write_cpio_entries(entries: Sequence[TreeEntry], out: BinaryIO) -> PayloadStats:
    """Write `entries` in order as an odc archive to `out`, streaming file contents."""
    written = 0
    for ino, entry in enumerate(entries, start=1):
        name = os.fsencode(entry.archive_name) + b"\0"
        header = _header(ino=ino, mode=entry.mode, uid=entry.uid, gid=entry.gid,
                         nlink=2 if entry.kind == "dir" else 1, mtime=entry.mtime,
                         namesize=len(name), filesize=entry.size, what=entry.archive_name)
        out.write(header)
        out.write(name)
        written += len(header) + len(name)
        if entry.kind == "symlink":
            assert entry.link_target is not None
            out.write(entry.link_target)
            written += len(entry.link_target)
        elif entry.kind == "file":
            assert entry.source is not None
            written += _copy_exact(entry.source, entry.size, out)
    name = TRAILER.encode() + b"\0"
    trailer = _header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, namesize=len(name),
                      filesize=0, what=TRAILER)
    out.write(trailer + name)
    written += len(trailer) + len(name)
    out.write(b"\0" * (-written % _BLOCK))
    return payload_stats(entries)


def _copy_exact(source: Path, size: int, out: BinaryIO) -> int:
    remaining = size
    with open(source, "rb") as stream:
        while remaining:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                break
            out.write(chunk)
            remaining -= len(chunk)
        grew = bool(stream.read(1))
    if remaining or grew:
        raise PayloadError(f"{source} changed size while it was archived ({size} bytes expected)",
                           hint="do not modify the payload folder during a build")
    return size


def write_cpio(
    root: str | os.PathLike[str],
    out: BinaryIO,
    *,
    mtime: int,
    uid: int = DEFAULT_UID,
    gid: int = DEFAULT_GID,
    modes: Mapping[str, int] | None = None,
) -> PayloadStats:
    """Scan `root` (see `scan_tree`) and write it to `out` as an odc cpio archive."""
    return write_cpio_entries(scan_tree(root, mtime=mtime, uid=uid, gid=gid, modes=modes), out)


def iter_cpio(stream: BinaryIO, *, with_data: bool = False,
              name: str = "cpio archive") -> Iterator[CpioEntry]:
    """Entries of an odc archive read from `stream`, up to (not including) the trailer.

    `name` is the file name used in error messages.
    """
    offset = 0
    while True:
        header = stream.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise FormatError(f"{name}: truncated cpio header at offset {offset} "
                              f"({len(header)} of {HEADER_SIZE} bytes)",
                              hint="the archive is incomplete; rebuild or re-download it")
        if header[:6] != MAGIC:
            found = header[:6].decode("ascii", "replace")
            kind = " (newc/crc cpio is not supported)" if found in ("070701", "070702") else ""
            raise FormatError(f"{name}: bad cpio magic {found!r} at offset {offset}, "
                              f"expected '070707' (odc){kind}")
        values: dict[str, int] = {}
        pos = 6
        for field, width in _FIELDS:
            raw = header[pos:pos + width]
            try:
                values[field] = int(raw, 8)
            except ValueError:
                raise FormatError(f"{name}: cpio header field {field} at offset {offset + pos} "
                                  f"is not octal: {raw!r}") from None
            pos += width
        raw_name = stream.read(values["namesize"])
        if len(raw_name) != values["namesize"] or not raw_name.endswith(b"\0"):
            raise FormatError(f"{name}: truncated or unterminated entry name at offset "
                              f"{offset + HEADER_SIZE}")
        entry_name = os.fsdecode(raw_name[:-1])
        size = values["filesize"]
        if entry_name == TRAILER:
            return
        data: bytes | None = None
        if with_data:
            data = stream.read(size)
            got = len(data)
        else:
            got = _skip(stream, size)
        if got != size:
            raise FormatError(f"{name}: entry {entry_name!r} is truncated "
                              f"({got} of {size} bytes)")
        offset += HEADER_SIZE + len(raw_name) + size
        yield CpioEntry(name=entry_name, mode=values["mode"], uid=values["uid"],
                        gid=values["gid"], size=size, mtime=values["mtime"], ino=values["ino"],
                        nlink=values["nlink"], data=data)


def _skip(stream: BinaryIO, size: int) -> int:
    skipped = 0
    while skipped < size:
        chunk = stream.read(min(_CHUNK, size - skipped))
        if not chunk:
            break
        skipped += len(chunk)
    return skipped


def read_cpio(stream: BinaryIO, *, with_data: bool = False,
              name: str = "cpio archive") -> list[CpioEntry]:
    """All entries of an odc archive (see `iter_cpio`)."""
    return list(iter_cpio(stream, with_data=with_data, name=name))
