"""gzip, written in parallel and deterministically: 1 MiB chunks deflated in threads, the same
bytes whatever the thread count; and the check-and-open of a gzip member for reading."""

from __future__ import annotations

import collections
import gzip
import io
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from builder.binfmt import udif
from builder.errors import FormatError

GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, OS unknown
DEFAULT_LEVEL = 6  # gzip's default; incompressible chunks are stored instead (see _deflate_chunk)
CHUNK = 1 << 20


def _deflate_chunk(data: bytes, level: int) -> bytes:
    """Raw deflate blocks for `data`, ending on a byte boundary, not final: chunks made
    independently concatenate into one valid stream (as pigz does, without a shared window)."""
    compressor = zlib.compressobj(0 if udif.incompressible(data) else level, zlib.DEFLATED, -15, 9)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """A write-only gzip stream: 1 MiB chunks deflated in threads (zlib releases the GIL),
    written in order. The bytes depend only on the data and the level, not on the threads.
    Any gunzip reads it; gzip's mtime is 0 and no file name is stored."""

    def __init__(self, out: BinaryIO, level: int = DEFAULT_LEVEL, workers: int | None = None):
        self._out = out
        self._level = level
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._pending: collections.deque[Future] = collections.deque()
        self._buffer = bytearray()
        self._crc = 0
        self._size = 0
        self.compressed = len(GZIP_HEADER)
        out.write(GZIP_HEADER)

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            chunk = bytes(self._buffer[:CHUNK])
            del self._buffer[:CHUNK]
            self._submit(chunk)
        return len(data)

    def _submit(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(_deflate_chunk, chunk, self._level))
        self._drain(2 * self._workers)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            packed = self._pending.popleft().result()
            self._out.write(packed)
            self.compressed += len(packed)

    def close(self) -> None:
        try:
            if self._buffer:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
            self._drain(0)
            final = zlib.compressobj(self._level, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty final block
            trailer = struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF)
            self._out.write(final + trailer)
            self.compressed += len(final) + len(trailer)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ParallelGzip":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


def gunzip(data: bytes, what: str) -> io.BufferedIOBase:
    if data[:2] != b"\x1f\x8b":
        raise FormatError(f"{what} is not gzip-compressed")
    return gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
