"""POSIX `cksum` CRC, as stored per file in an Apple BOM.

The POSIX CRC is CRC-32/CKSUM: polynomial 0x04C11DB7 fed most-significant bit first, register
starting at 0, the data length appended (least significant byte first, as few bytes as it needs),
then complemented. zlib's CRC-32 uses the same polynomial but bit-reflected (least significant
bit first), so it computes the same remainder on bit-reversed input with a bit-reversed register.
A pure-Python byte loop took 9 s on 30 MB; bytes.translate + zlib.crc32 takes well under 0.1 s.
"""

from __future__ import annotations

import os
import zlib
from typing import BinaryIO

_MASK = 0xFFFFFFFF
_CHUNK = 1 << 20

# Byte i -> byte i with its 8 bits in reverse order.
_REVERSE_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _reverse32(value: int) -> int:
    return int(f"{value:032b}"[::-1], 2)


class Cksum:
    """Incremental POSIX cksum: `update()` with chunks, then `value` (what `cksum` prints first)."""

    __slots__ = ("_register", "length")

    def __init__(self) -> None:
        # The reflected register: bit-reverse of the POSIX register, which starts at 0.
        self._register = 0
        self.length = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._register = self._feed(self._register, chunk)
        self.length += len(chunk)

    @staticmethod
    def _feed(register: int, chunk: bytes | bytearray | memoryview) -> int:
        # zlib.crc32(data, v) complements v on entry and the result on exit; undo both so the
        # register carries over untouched (init 0, no xorout).
        return zlib.crc32(bytes(chunk).translate(_REVERSE_BITS), register ^ _MASK) ^ _MASK

    @property
    def value(self) -> int:
        length = self.length
        tail = bytearray()
        while length:
            tail.append(length & 0xFF)
            length >>= 8
        register = self._feed(self._register, tail)
        return _reverse32(register) ^ _MASK


def cksum(data: bytes | bytearray | memoryview) -> int:
    """The CRC `cksum` prints for `data`."""
    state = Cksum()
    state.update(data)
    return state.value


def cksum_stream(stream: BinaryIO, chunk_size: int = _CHUNK) -> tuple[int, int]:
    """(CRC, byte count) of everything left in `stream`, read `chunk_size` bytes at a time."""
    state = Cksum()
    while chunk := stream.read(chunk_size):
        state.update(chunk)
    return state.value, state.length


def cksum_file(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> tuple[int, int]:
    """(CRC, size) of the file at `path`, streamed."""
    with open(path, "rb") as stream:
        return cksum_stream(stream, chunk_size)
