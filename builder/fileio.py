"""Reading a byte range of a file in bounded chunks: one loop for every caller that streams a
part of a large file (a release object, a disk partition) without holding it in memory."""

from __future__ import annotations

from typing import BinaryIO, Iterator

from builder.errors import FormatError

CHUNK = 1 << 20


def iter_range(fh: BinaryIO, start: int, length: int, *, too_short: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The bytes [start, start + length) of `fh`, in chunks of at most `chunk_size`; a
    FormatError(`too_short`) if the file ends before the range does."""
    fh.seek(start)
    left = length
    while left:
        chunk = fh.read(min(left, chunk_size))
        if not chunk:
            raise FormatError(too_short)
        yield chunk
        left -= len(chunk)
