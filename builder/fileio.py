"""Reading a byte range of a file in bounded chunks: one loop for every caller that streams a
part of a large file (a release object, a disk partition) without holding it in memory. And
writing an output beside its final name without ever following a link someone planted there."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import tempfile
from pathlib import Path
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


# -- outputs written beside their final name -----------------------------------------------------
#
# An output folder may be shared or group-writable: a partial file under a predictable name
# (`.<name>.partial`) lets anyone who can write there plant a symbolic link and make a build
# overwrite another file. Partials are therefore created new (O_CREAT|O_EXCL|O_NOFOLLOW: an
# existing name, link or not, is never opened) under an unpredictable name, in the destination
# folder so that the final os.replace stays a rename within one filesystem. os.replace puts the
# file in place of whatever the final name is, a planted link included, without following it.

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_partial(target: Path, mode: int = 0o644) -> tuple[int, Path]:
    """(fd, path) of a new, empty file beside `target` for writing it; `mode` before the umask."""
    for _ in range(16):
        path = target.with_name(f".{target.name}.{secrets.token_hex(8)}.partial")
        try:
            return os.open(path, NEW_FILE, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free partial name", str(target.parent))


@contextlib.contextmanager
def atomic_output(target: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write `target` through: a new partial beside it, renamed over `target`
    when the block ends, removed if it raises. OSError is the caller's to report."""
    target = Path(target)
    fd, path = create_partial(target, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(path, target)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_atomic(target: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_output(target, mode) as fh:
        fh.write(data)


def new_private_dir(target: Path) -> Path:
    """A new folder beside `target` (mode 0700, unpredictable name; mkdir never follows a link)
    for tools that write an output and its intermediates by path themselves: nobody else can
    create or read anything in it. The caller removes it."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))


def sha256_and_size(path: Path) -> tuple[str, int]:
    """The file's SHA-256 (hex) and the number of bytes it was computed over, in one read."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    return sha256_and_size(path)[0]
