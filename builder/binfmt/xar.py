"""xar archives: the container of a flat macOS package (.pkg).

Layout: a 28-byte big-endian header ("xar!", header size, version 1, compressed and uncompressed
TOC sizes, checksum algorithm), the zlib-compressed XML table of contents (TOC), then the heap.
The TOC checksum (SHA-1 of the compressed TOC) is the first thing in the heap, at offset 0. A
signed package adds <signature style="RSA"> (an RSA PKCS#1 v1.5 signature of that 20-byte
digest, with the signer's certificate chain) and usually <x-signature style="CMS"> to the TOC,
their bytes following the checksum in the heap.

The writer stores members uncompressed ("application/octet-stream", SHA-1 archived and extracted
checksums) as Fleet's packaging does; a Payload is compressed already. Output depends only on the
members and the epoch given, so identical inputs give identical bytes. The reader also accepts
the zlib ("application/x-gzip"), bzip2 and xz encodings Apple's tools use for small members.
"""

from __future__ import annotations

import base64
import bz2
import datetime
import hashlib
import io
import lzma
import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Union

from builder.errors import FormatError, PayloadError

MAGIC = b"xar!"
HEADER = struct.Struct(">4sHHQQI")  # magic, header size, version, TOC compressed, TOC plain, alg
HEADER_SIZE = HEADER.size  # 28
VERSION = 1
CKSUM_NONE, CKSUM_SHA1, CKSUM_MD5, CKSUM_OTHER = 0, 1, 2, 3
OCTET_STREAM = "application/octet-stream"
DIR_MODE = 0o755
FILE_MODE = 0o644
MAX_TOC_SIZE = 64 << 20  # a TOC is kilobytes; refuse to inflate anything absurd
_CHUNK = 1 << 20
_DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"

_HASHES = {"sha1": "sha1", "md5": "md5", "sha256": "sha256", "sha512": "sha512"}
_HEADER_ALGS = {CKSUM_NONE: "none", CKSUM_SHA1: "sha1", CKSUM_MD5: "md5"}

MemberData = Union[bytes, bytearray, memoryview, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Writer


@dataclass
class _Node:
    name: str
    data: MemberData | None = None  # None for a directory
    children: dict[str, _Node] | None = None
    # Filled while laying out the heap.
    id: int = 0
    offset: int = 0
    size: int = 0
    sha1: str = ""

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _build_tree(members: Sequence[tuple[str, MemberData]]) -> _Node:
    root = _Node("", children={})
    for name, data in members:
        if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview,
                                                          os.PathLike)):
            raise TypeError(f"xar member {name!r}: give bytes, or a pathlib.Path to stream from "
                            f"(got {type(data).__name__})")
        parts = name.split("/")
        if not name or any(part in ("", ".", "..") for part in parts):
            raise FormatError(f"xar member name {name!r} is not a relative path of plain names",
                              hint="use names like 'Distribution' or 'agent.pkg/Payload'")
        node = root
        for depth, part in enumerate(parts):
            assert node.children is not None
            last = depth == len(parts) - 1
            child = node.children.get(part)
            if child is None:
                child = _Node(part, data=data) if last else _Node(part, children={})
                node.children[part] = child
            elif last or not child.is_dir:
                raise FormatError(f"xar member {name!r} clashes with another member of the same "
                                  f"name ({'/'.join(parts[:depth + 1])!r})")
            node = child
    return root


def _walk(node: _Node) -> Iterator[_Node]:
    """Depth-first, in the order members were given: the order of ids and of heap data."""
    for child in (node.children or {}).values():
        yield child
        yield from _walk(child)


def _open_data(data: MemberData) -> BinaryIO:
    if isinstance(data, os.PathLike):
        return open(data, "rb")
    return io.BytesIO(bytes(data))


def _hash_data(data: MemberData) -> tuple[int, str]:
    digest = hashlib.sha1()
    size = 0
    with _open_data(data) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _toc_xml(root: _Node, epoch: int) -> bytes:
    xar = ET.Element("xar")
    toc = _sub(xar, "toc")
    checksum = _sub(toc, "checksum", style="sha1")
    _sub(checksum, "offset", "0")
    _sub(checksum, "size", str(hashlib.sha1().digest_size))
    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    _sub(toc, "creation-time", created.strftime("%Y-%m-%dT%H:%M:%S"))
    mtime = created.strftime("%Y-%m-%dT%H:%M:%SZ")  # extractors (bsdtar, 7z) restore it

    def add(parent: ET.Element, node: _Node) -> None:
        element = _sub(parent, "file", id=str(node.id))
        _sub(element, "name", node.name)
        if node.is_dir:
            _sub(element, "type", "directory")
            _sub(element, "mode", f"0{DIR_MODE:o}")
            _sub(element, "mtime", mtime)
            for child in (node.children or {}).values():
                add(element, child)
            return
        _sub(element, "type", "file")
        _sub(element, "mode", f"0{FILE_MODE:o}")
        _sub(element, "mtime", mtime)
        data = _sub(element, "data")
        _sub(data, "archived-checksum", node.sha1, style="sha1")
        _sub(data, "extracted-checksum", node.sha1, style="sha1")
        _sub(data, "encoding", style=OCTET_STREAM)
        _sub(data, "size", str(node.size))
        _sub(data, "offset", str(node.offset))
        _sub(data, "length", str(node.size))

    for child in (root.children or {}).values():
        add(toc, child)
    ET.indent(xar, space=" ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(xar, encoding="utf-8",
                                                                   xml_declaration=False) + b"\n"


def write_xar(out: BinaryIO, members: Sequence[tuple[str, MemberData]], *, epoch: int) -> None:
    """Write a xar of `members` to `out`.

    Each member is (name in the archive, content); "a/b" names imply directory "a". Content is
    bytes, or an os.PathLike to a file that is read twice (checksum, then copy) in chunks.
    `epoch` (e.g. SOURCE_DATE_EPOCH) becomes the TOC's <creation-time>.
    """
    if not isinstance(epoch, int) or epoch < 0:
        raise PayloadError(f"the xar creation time must be a non-negative integer, got {epoch!r}")
    root = _build_tree(members)
    offset = hashlib.sha1().digest_size  # the TOC checksum comes first in the heap
    files = []
    for number, node in enumerate(_walk(root), start=1):
        node.id = number
        if not node.is_dir:
            node.size, node.sha1 = _hash_data(node.data)  # type: ignore[arg-type]
            node.offset = offset
            offset += node.size
            files.append(node)

    toc = _toc_xml(root, epoch)
    compressed = zlib.compress(toc, 9)
    out.write(HEADER.pack(MAGIC, HEADER_SIZE, VERSION, len(compressed), len(toc), CKSUM_SHA1))
    out.write(compressed)
    out.write(hashlib.sha1(compressed).digest())
    for node in files:
        _copy_verified(node, out)


def _copy_verified(node: _Node, out: BinaryIO) -> None:
    digest = hashlib.sha1()
    size = 0
    with _open_data(node.data) as stream:  # type: ignore[arg-type]
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != node.size or digest.hexdigest() != node.sha1:
        raise PayloadError(f"xar member {node.name!r} ({node.data}) changed while the archive "
                           "was written", hint="do not modify the inputs during a build")


def build_xar(members: Sequence[tuple[str, MemberData]], *, epoch: int) -> bytes:
    """`write_xar` into memory."""
    buffer = io.BytesIO()
    write_xar(buffer, members, epoch=epoch)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True)
class XarHeader:
    header_size: int
    version: int
    toc_compressed_size: int
    toc_uncompressed_size: int
    checksum_algorithm: int
    checksum_name: str  # "sha1", "md5", "sha256"... as the header names it


@dataclass(frozen=True)
class XarMember:
    """One <file> of the TOC. Offsets are relative to the heap; `length` is the stored size."""

    id: int
    name: str  # full path inside the archive, "/"-separated
    type: str  # "file", "directory", "symlink", "hardlink"
    mode: int | None
    offset: int | None  # heap offset of the stored data (None: no <data>)
    length: int  # stored (archived) bytes
    size: int  # extracted bytes
    encoding: str | None
    archived_checksum: tuple[str, str] | None  # (style, hex)
    extracted_checksum: tuple[str, str] | None


@dataclass(frozen=True)
class XarSignature:
    """A TOC <signature> or <x-signature>: where its bytes sit in the heap and its certificates."""

    style: str  # "RSA" for <signature>, "CMS" for Apple's <x-signature>
    offset: int  # heap offset
    size: int
    certificates: tuple[str, ...]  # base64 DER, leaf first, whitespace removed

    @property
    def certificates_der(self) -> tuple[bytes, ...]:
        return tuple(base64.b64decode(cert) for cert in self.certificates)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _int_text(element: ET.Element | None, what: str, source: str) -> int:
    if element is None or element.text is None:
        raise FormatError(f"{source}: TOC has no {what}")
    try:
        value = int(element.text.strip(), 10)
    except ValueError:
        raise FormatError(f"{source}: TOC {what} is not a number: {element.text!r}") from None
    if value < 0:
        raise FormatError(f"{source}: TOC {what} is negative")
    return value


class XarArchive:
    """A xar opened for reading: header, TOC, verified TOC checksum, members, signatures.

    Give bytes, a path, or a seekable binary stream; `name` is used in error messages (the path
    by default). Opening checks the header, inflates the TOC, verifies the TOC checksum and that
    every member lies inside the file; each read verifies the member's checksums.
    """

    def __init__(self, source: bytes | bytearray | str | os.PathLike[str] | BinaryIO, *,
                 name: str | None = None):
        self._owned: BinaryIO | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._stream: BinaryIO = io.BytesIO(bytes(source))
            self.name = name or "xar archive"
        elif isinstance(source, (str, os.PathLike)):
            self._stream = self._owned = open(source, "rb")
            self.name = name or os.fspath(source)
        else:
            self._stream = source
            self.name = name or getattr(source, "name", None) or "xar archive"
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- lifecycle
    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> XarArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- parsing
    def _fail(self, message: str, hint: str | None = None) -> FormatError:
        return FormatError(f"{self.name}: {message}", hint=hint)

    def _read_at(self, offset: int, size: int, what: str) -> bytes:
        self._stream.seek(offset)
        data = self._stream.read(size)
        if len(data) != size:
            raise self._fail(f"truncated: {what} needs {size} bytes at offset {offset}, "
                             f"{len(data)} present", hint="the file is incomplete; rebuild or "
                             "download it again")
        return data

    def _load(self) -> None:
        self._stream.seek(0, os.SEEK_END)
        self.file_size = self._stream.tell()
        self._stream.seek(0)
        raw = self._stream.read(HEADER_SIZE)
        if len(raw) >= 4 and raw[:4] != MAGIC:
            raise self._fail(f"bad magic {raw[:4]!r} in the xar header, expected {MAGIC!r}",
                             hint="this is not a xar archive or flat package")
        if len(raw) < HEADER_SIZE:
            raise self._fail(f"truncated xar header: {len(raw)} of {HEADER_SIZE} bytes")
        _, header_size, version, toc_size, toc_plain, alg = HEADER.unpack(raw)
        if header_size < HEADER_SIZE:
            raise self._fail(f"xar header size field is {header_size}, less than {HEADER_SIZE}")
        if version != VERSION:
            raise self._fail(f"xar header version field is {version}, only {VERSION} is known")
        if alg in _HEADER_ALGS:
            alg_name = _HEADER_ALGS[alg]
        elif alg == CKSUM_OTHER and header_size > HEADER_SIZE:
            extra = self._read_at(HEADER_SIZE, header_size - HEADER_SIZE, "checksum name")
            alg_name = extra.split(b"\0", 1)[0].decode("ascii", "replace").lower()
        else:
            raise self._fail(f"xar header checksum algorithm field is {alg}, which is unknown")
        if toc_plain > MAX_TOC_SIZE:
            raise self._fail(f"TOC uncompressed size field is {toc_plain} bytes, over the "
                             f"{MAX_TOC_SIZE}-byte limit")
        self.header = XarHeader(header_size, version, toc_size, toc_plain, alg, alg_name)
        self.toc_compressed = self._read_at(header_size, toc_size, "the compressed TOC")
        self.heap_start = header_size + toc_size

        inflater = zlib.decompressobj()
        try:
            toc = inflater.decompress(self.toc_compressed, toc_plain + 1)
        except zlib.error as exc:
            raise self._fail(f"TOC does not inflate: {exc}") from None
        if len(toc) != toc_plain or not inflater.eof:
            raise self._fail(f"TOC inflates to {len(toc)}{'+' if not inflater.eof else ''} bytes, "
                             f"the header's TOC uncompressed size field says {toc_plain}")
        if b"<!DOCTYPE" in toc or b"<!ENTITY" in toc:
            raise self._fail("TOC has a DOCTYPE or entity declaration, which xar never writes")
        self.toc_xml = toc
        try:
            document = ET.fromstring(toc)
        except ET.ParseError as exc:
            raise self._fail(f"TOC is not well-formed XML: {exc}") from None
        toc_element = document.find("toc")
        if document.tag != "xar" or toc_element is None:
            raise self._fail("TOC XML has no <xar><toc> root")
        self._toc = toc_element

        self.creation_time = toc_element.findtext("creation-time")
        self._verify_toc_checksum(toc_element)
        self.signature = self._signature(toc_element.find("signature"))
        self.x_signature = self._signature(toc_element.find("x-signature"))
        self.members = self._members(toc_element)
        self._by_name = {member.name: member for member in self.members}
        heap_size = self.file_size - self.heap_start
        for member in self.members:
            if member.offset is not None and member.offset + member.length > heap_size:
                raise self._fail(f"truncated: member {member.name!r} needs heap bytes "
                                 f"{member.offset}..{member.offset + member.length}, the heap "
                                 f"has {heap_size}", hint="the file is incomplete; rebuild or "
                                 "download it again")
        for label, signature in (("signature", self.signature), ("x-signature",
                                                                 self.x_signature)):
            if signature is not None and signature.offset + signature.size > heap_size:
                raise self._fail(f"truncated: the {label} lies past the end of the heap")

    def _verify_toc_checksum(self, toc: ET.Element) -> None:
        checksum = toc.find("checksum")
        if checksum is None:
            if self.header.checksum_name == "none":
                self.checksum_style, self.checksum_offset, self.checksum_size = "none", 0, 0
                self.stored_toc_checksum = b""
                return
            raise self._fail("TOC has no <checksum> though the header names "
                             f"{self.header.checksum_name}")
        style = (checksum.get("style") or "").lower()
        if style != self.header.checksum_name:
            raise self._fail(f"TOC <checksum style={style!r}> disagrees with the header's "
                             f"checksum algorithm field ({self.header.checksum_name})")
        if style not in _HASHES:
            raise self._fail(f"TOC checksum style {style!r} is not supported")
        self.checksum_style = style
        self.checksum_offset = _int_text(checksum.find("offset"), "<checksum><offset>", self.name)
        self.checksum_size = _int_text(checksum.find("size"), "<checksum><size>", self.name)
        computed = hashlib.new(_HASHES[style], self.toc_compressed).digest()
        if self.checksum_size != len(computed):
            raise self._fail(f"TOC <checksum><size> is {self.checksum_size}, a {style} digest is "
                             f"{len(computed)} bytes")
        stored = self._read_at(self.heap_start + self.checksum_offset, self.checksum_size,
                               "the TOC checksum")
        if stored != computed:
            raise self._fail(f"TOC checksum mismatch: heap offset {self.checksum_offset} holds "
                             f"{stored.hex()}, the {style} of the compressed TOC is "
                             f"{computed.hex()}", hint="the package is corrupted or was altered")
        self.stored_toc_checksum = stored

    def _signature(self, element: ET.Element | None) -> XarSignature | None:
        if element is None:
            return None
        label = f"<{element.tag}>"
        certificates = tuple(
            re.sub(r"\s+", "", cert.text or "") for cert in element.iter()
            if _local(cert.tag) == "X509Certificate")
        return XarSignature(
            style=element.get("style") or "",
            offset=_int_text(element.find("offset"), f"{label}<offset>", self.name),
            size=_int_text(element.find("size"), f"{label}<size>", self.name),
            certificates=certificates,
        )

    def _members(self, toc: ET.Element) -> list[XarMember]:
        members: list[XarMember] = []

        def visit(element: ET.Element, prefix: str) -> None:
            names = element.findall("name")
            if not names or not (names[-1].text or ""):
                raise self._fail(f"TOC <file id={element.get('id')!r}> has no <name>")
            leaf = names[-1].text or ""
            if "/" in leaf or leaf in (".", ".."):
                raise self._fail(f"TOC file name {leaf!r} is not a plain name")
            full = f"{prefix}/{leaf}" if prefix else leaf
            try:
                member_id = int(element.get("id", ""))
            except ValueError:
                raise self._fail(f"TOC <file> {full!r} has no numeric id") from None
            mode_text = element.findtext("mode")
            try:
                mode = int(mode_text, 8) if mode_text else None
            except ValueError:
                raise self._fail(f"TOC <mode> of {full!r} is not octal: {mode_text!r}") from None
            data = element.find("data")
            if data is not None:
                encoding_element = data.find("encoding")
                members.append(XarMember(
                    id=member_id, name=full, type=element.findtext("type") or "file", mode=mode,
                    offset=_int_text(data.find("offset"), f"<data><offset> of {full!r}",
                                     self.name),
                    length=_int_text(data.find("length"), f"<data><length> of {full!r}",
                                     self.name),
                    size=_int_text(data.find("size"), f"<data><size> of {full!r}", self.name),
                    encoding=None if encoding_element is None else encoding_element.get("style"),
                    archived_checksum=self._member_checksum(data.find("archived-checksum")),
                    extracted_checksum=self._member_checksum(data.find("extracted-checksum")),
                ))
            else:
                members.append(XarMember(
                    id=member_id, name=full, type=element.findtext("type") or "file", mode=mode,
                    offset=None, length=0, size=0, encoding=None, archived_checksum=None,
                    extracted_checksum=None))
            for child in element.findall("file"):
                visit(child, full)

        for element in toc.findall("file"):
            visit(element, "")
        members.sort(key=lambda member: member.id)
        return members

    @staticmethod
    def _member_checksum(element: ET.Element | None) -> tuple[str, str] | None:
        if element is None:
            return None
        return (element.get("style") or "").lower(), (element.text or "").strip().lower()

    # -- access
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def member(self, name: str) -> XarMember:
        try:
            return self._by_name[name]
        except KeyError:
            raise self._fail(f"no member {name!r} in the archive",
                             hint=f"members are: {', '.join(self.names())}") from None

    def extract(self, name: str, out: BinaryIO) -> int:
        """Decode member `name` into `out` in chunks, verifying its checksums; returns bytes."""
        member = self.member(name)
        if member.offset is None:
            if member.type == "directory":
                raise self._fail(f"member {name!r} is a directory and has no data")
            return 0
        decode, finish = self._decoder(member)
        archived = _checksum(member.archived_checksum, f"{name!r} archived", self)
        extracted = _checksum(member.extracted_checksum, f"{name!r} extracted", self)
        self._stream.seek(self.heap_start + member.offset)
        remaining = member.length
        written = 0
        while remaining:
            chunk = self._stream.read(min(_CHUNK, remaining))
            if not chunk:
                raise self._fail(f"truncated: member {name!r} ends early")
            remaining -= len(chunk)
            if archived:
                archived.update(chunk)
            try:
                plain = decode(chunk) if remaining else decode(chunk) + finish()
            except (zlib.error, OSError, lzma.LZMAError, ValueError, EOFError) as exc:
                raise self._fail(f"member {name!r} does not decode as {member.encoding}: "
                                 f"{exc}") from None
            if extracted:
                extracted.update(plain)
            out.write(plain)
            written += len(plain)
        for digest, expected, what in ((archived, member.archived_checksum, "archived"),
                                       (extracted, member.extracted_checksum, "extracted")):
            if digest is not None and expected is not None and digest.hexdigest() != expected[1]:
                raise self._fail(f"member {name!r}: {what}-checksum mismatch ({expected[0]} "
                                 f"{digest.hexdigest()}, the TOC says {expected[1]})",
                                 hint="the package is corrupted or was altered")
        if written != member.size:
            raise self._fail(f"member {name!r} decodes to {written} bytes, its <size> is "
                             f"{member.size}")
        return written

    def read(self, name: str) -> bytes:
        """Member `name`, decoded and verified."""
        buffer = io.BytesIO()
        self.extract(name, buffer)
        return buffer.getvalue()

    def _decoder(self, member: XarMember) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
        """(decode a chunk, flush what is left) for the member's encoding."""
        encoding = member.encoding or OCTET_STREAM
        if encoding == OCTET_STREAM:
            return (lambda chunk: chunk), (lambda: b"")
        if encoding == "application/x-gzip":  # xar's "gzip" is a zlib stream
            inflater = zlib.decompressobj()
            return inflater.decompress, inflater.flush
        if encoding == "application/x-bzip2":
            return bz2.BZ2Decompressor().decompress, (lambda: b"")
        if encoding in ("application/x-lzma", "application/x-xz"):
            return lzma.LZMADecompressor().decompress, (lambda: b"")
        raise self._fail(f"member {member.name!r} has unsupported encoding {encoding!r}")

    def signature_bytes(self, which: str = "signature") -> bytes:
        """The bytes of the <signature> ("signature") or <x-signature> ("x-signature")."""
        signature = self.signature if which == "signature" else self.x_signature
        if signature is None:
            raise self._fail(f"the TOC has no <{which}> element; the package is not signed",
                             hint="sign the package, or do not require a signature")
        return self._read_at(self.heap_start + signature.offset, signature.size,
                             f"the {which} data")


def _checksum(spec: tuple[str, str] | None, what: str, archive: XarArchive):
    if spec is None or spec[0] in ("", "none"):
        return None
    if spec[0] not in _HASHES:
        raise archive._fail(f"member {what} checksum style {spec[0]!r} is not supported")
    return hashlib.new(_HASHES[spec[0]])


def read_xar(source: bytes | bytearray | str | os.PathLike[str] | BinaryIO, *,
             name: str | None = None) -> XarArchive:
    """Open a xar for reading (see `XarArchive`)."""
    return XarArchive(source, name=name)


def toc_checksum(data: bytes, *, name: str = "xar archive") -> bytes:
    """The verified TOC checksum of the xar `data`: what a pkg's RSA <signature> signs.

    The <signature style="RSA"> is RSA PKCS#1 v1.5 over these 20 bytes. Two hash conventions
    exist: Apple's xar/productsign treat them as the SHA-1 hash itself (cryptography:
    `verify(sig, digest, PKCS1v15(), Prehashed(SHA1()))`), while rcodesign (apple-platform-py)
    signs them as a message with SHA-256 (`verify(sig, digest, PKCS1v15(), SHA256())`, or
    `openssl dgst -sha256 -verify`). The <x-signature style="CMS"> is a detached CMS
    SignedData over the same 20 bytes.
    """
    return XarArchive(data, name=name).stored_toc_checksum


def signature_bytes(data: bytes, *, name: str = "xar archive") -> bytes:
    """The RSA <signature> bytes of the xar `data`; FormatError when it is unsigned."""
    return XarArchive(data, name=name).signature_bytes("signature")

