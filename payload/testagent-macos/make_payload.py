"""TEST macOS payload: writes payload/build/macos/Agent.app (see README.md here). Not a product.

    python3 payload/testagent-macos/make_payload.py [--out DIR] [--version 1.0.0]

The bundle's executable is a minimal universal Mach-O (x86_64 + arm64) written byte by byte
here, because no Mach-O linker exists on these Linux machines. It carries the main load
commands ld64 writes for `int main(void) { return 0; }` -- __PAGEZERO, __TEXT, __LINKEDIT with
room for a code signature, dyld, libSystem, LC_MAIN -- so that the signing code
(apple-platform-py / rcodesign) signs and verifies it as it does a real agent. It lacks what
ld64 adds besides (fixups, exports trie, function starts) and has never been run on a Mac: it
exists to be signed, packaged and verified, not to do anything.

Output depends only on this file and --version: same inputs, same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import plistlib
import re
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "build" / "macos"

BUNDLE = "Agent.app"
EXECUTABLE = "agent"
BUNDLE_ID = "com.example.remoteagent.testagent"

MH_MAGIC_64 = 0xFEEDFACF
FAT_MAGIC = 0xCAFEBABE
MH_EXECUTE = 2
MH_NOUNDEFS, MH_DYLDLINK, MH_TWOLEVEL, MH_PIE = 0x1, 0x4, 0x80, 0x200000
LC_SEGMENT_64 = 0x19
LC_SYMTAB = 0x2
LC_DYSYMTAB = 0xB
LC_LOAD_DYLINKER = 0xE
LC_LOAD_DYLIB = 0xC
LC_UUID = 0x1B
LC_BUILD_VERSION = 0x32
LC_MAIN = 0x80000028
VM_PROT_R, VM_PROT_X = 1, 4
S_ATTR_PURE_INSTRUCTIONS, S_ATTR_SOME_INSTRUCTIONS = 0x80000000, 0x400
PLATFORM_MACOS = 1
BASE = 0x100000000  # __TEXT's address after the 4 GiB __PAGEZERO, as ld64 lays it out

# (name, cputype, cpusubtype, page size, code of `main`: return 0)
ARCHES = (
    ("x86_64", 0x01000007, 3, 0x1000, bytes.fromhex("31c0c3")),  # xor eax,eax; ret
    ("arm64", 0x0100000C, 0, 0x4000, bytes.fromhex("00008052c0035fd6")),  # mov w0,#0; ret
)


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def _segment(name: str, vmaddr: int, vmsize: int, fileoff: int, filesize: int, prot: int,
             sections: list[bytes]) -> bytes:
    return struct.pack("<II16sQQQQiiII", LC_SEGMENT_64, 72 + 80 * len(sections), name.encode(),
                       vmaddr, vmsize, fileoff, filesize, prot, prot, len(sections), 0) + b"".join(sections)


def _dylinker(path: str) -> bytes:
    """LC_LOAD_DYLINKER: the name follows the 12-byte command, padded to 8 bytes."""
    name = path.encode() + b"\0"
    size = 12 + len(name)
    size += -size % 8
    return struct.pack("<III", LC_LOAD_DYLINKER, size, 12) + name + bytes(size - 12 - len(name))


def _dylib(path: str) -> bytes:
    """LC_LOAD_DYLIB: name offset 24, timestamp 2, current and compatibility version 1.0.0."""
    name = path.encode() + b"\0"
    size = 24 + len(name)
    size += -size % 8
    return (struct.pack("<IIIIII", LC_LOAD_DYLIB, size, 24, 2, 0x10000, 0x10000)
            + name + bytes(size - 24 - len(name)))


def macho(cputype: int, cpusubtype: int, page: int, code: bytes, version: str) -> bytes:
    """One thin MH_EXECUTE Mach-O: __PAGEZERO, __TEXT (code at the end of its first page),
    __LINKEDIT (a tiny string table), dyld, libSystem, LC_MAIN."""
    text_size = page
    code_offset = text_size - 16  # ld64 also puts __text at the end of the page
    linkedit = _pad8(b" \0" + f"testagent {version}".encode() + b"\0")
    uuid = bytearray(hashlib.sha256(f"{cputype}:{version}".encode()).digest()[:16])
    uuid[6] = (uuid[6] & 0x0F) | 0x80
    uuid[8] = (uuid[8] & 0x3F) | 0x80
    text_section = struct.pack("<16s16sQQIIIIIIII", b"__text", b"__TEXT", BASE + code_offset, len(code),
                               code_offset, 4, 0, 0, S_ATTR_PURE_INSTRUCTIONS | S_ATTR_SOME_INSTRUCTIONS, 0, 0, 0)
    commands = [
        _segment("__PAGEZERO", 0, BASE, 0, 0, 0, []),
        _segment("__TEXT", BASE, text_size, 0, text_size, VM_PROT_R | VM_PROT_X, [text_section]),
        _segment("__LINKEDIT", BASE + text_size, page, text_size, len(linkedit), VM_PROT_R, []),
        struct.pack("<IIIIII", LC_SYMTAB, 24, 0, 0, text_size, len(linkedit)),
        struct.pack("<II18I", LC_DYSYMTAB, 80, *([0] * 18)),
        _dylinker("/usr/lib/dyld"),
        struct.pack("<II16s", LC_UUID, 24, bytes(uuid)),
        # macOS 11.0 minimum (arm64's first), SDK 11.0, no tools.
        struct.pack("<IIIIII", LC_BUILD_VERSION, 24, PLATFORM_MACOS, 0x000B0000, 0x000B0000, 0),
        struct.pack("<IIQQ", LC_MAIN, 24, code_offset, 0),
        _dylib("/usr/lib/libSystem.B.dylib"),
    ]
    sizeofcmds = sum(len(c) for c in commands)
    header = struct.pack("<IiiIIIII", MH_MAGIC_64, cputype, cpusubtype, MH_EXECUTE, len(commands), sizeofcmds,
                         MH_NOUNDEFS | MH_DYLDLINK | MH_TWOLEVEL | MH_PIE, 0)
    head = header + b"".join(commands)
    assert len(head) + 256 < code_offset, "load commands must leave room for LC_CODE_SIGNATURE"
    text = head + bytes(code_offset - len(head)) + code
    text += bytes(text_size - len(text))
    return text + linkedit


def universal(version: str) -> bytes:
    """A fat binary of every ARCHES slice, each at a 16 KiB (2^14) boundary, as lipo does."""
    align = 14
    out = bytearray(struct.pack(">II", FAT_MAGIC, len(ARCHES)))
    slices = []
    offset = 1 << align
    for _name, cputype, subtype, page, code in ARCHES:
        data = macho(cputype, subtype, page, code, version)
        out += struct.pack(">iiIII", cputype, subtype, offset, len(data), align)
        slices.append((offset, data))
        offset += len(data) + (-len(data) % (1 << align))
    for at, data in slices:
        out += bytes(at - len(out)) + data
    return bytes(out)


def info_plist(version: str) -> bytes:
    return plistlib.dumps({
        "CFBundleDevelopmentRegion": "en",
        "CFBundleExecutable": EXECUTABLE,
        "CFBundleIdentifier": BUNDLE_ID,
        "CFBundleInfoDictionaryVersion": "6.0",
        "CFBundleName": "Agent",
        "CFBundlePackageType": "APPL",
        "CFBundleShortVersionString": version,
        "CFBundleVersion": version,
        "LSBackgroundOnly": True,
        "LSMinimumSystemVersion": "11.0",
    }, fmt=plistlib.FMT_XML, sort_keys=True)


def write_payload(out: Path, version: str) -> Path:
    """(Re)write `out`/Agent.app; files are replaced only when their bytes change."""
    if not re.fullmatch(r"[0-9]+(\.[0-9]+){0,2}", version):
        raise SystemExit("--version must be like 1.2.3")
    app = out / BUNDLE
    files = {
        app / "Contents" / "Info.plist": (info_plist(version), 0o644),
        app / "Contents" / "PkgInfo": (b"APPL????", 0o644),
        app / "Contents" / "MacOS" / EXECUTABLE: (universal(version), 0o755),
        app / "Contents" / "Resources" / "TEST-PAYLOAD.txt": (
            b"This is the builder project's TEST macOS payload, not a product.\n", 0o644),
    }
    for path, (data, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        os.chmod(path, mode)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--version", default=os.environ.get("AGENT_VERSION", "1.0.0"))
    args = parser.parse_args(argv)
    app = write_payload(args.out, args.version)
    print(app, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
