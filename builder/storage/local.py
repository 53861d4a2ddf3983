"""The local-disk store (`file:///path`), the embedded default.

Writes never go through obstore here: each object is written to a staging file under
`<root>/.tmp/`, fsynced, then hard-linked to its key. Objects are 0600 and the folders this store
creates 0700: stamp documents hold the slot bytes, token included, and stamped installers carry
it in plain text, so only the user that runs the service may read the store. `os.link` fails if the name exists, so
create-if-absent is atomic and a writer that loses the race sees FileExistsError, never a
half-written file. Reads (get, ranges, head, list, streaming) use obstore's LocalStore.

No presigned URLs: whoever serves downloads reads the objects from `local_path`, or streams
them. Objects are never replaced in place (create-if-absent is a link), so ranged reads are not
pinned to an ETag (here one of inode, mtime and size, not of the content).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Sequence
from urllib.parse import unquote, urlsplit

from obstore.store import LocalStore

from builder.errors import UsageError
from builder.storage import pieces as pc
from builder.storage.settings import StorageSettings
from builder.storage.store import PutResult, StampResult, Store

COPY_CHUNK = 1024 * 1024
STAGING = ".tmp"
OBJECT_MODE = 0o600
FOLDER_MODE = 0o700


class LocalDiskStore(Store):
    kind = "file"
    presigned_links = False
    pins_ranges_to_etag = False

    def __init__(self, root: Path, settings: StorageSettings):
        _make_folders(root.parent, root)
        _make_folders(root, root / STAGING)
        super().__init__(root.as_uri(), settings, "", LocalStore(prefix=root))
        self.root = root

    @classmethod
    def from_url(cls, url: str, settings: StorageSettings) -> "LocalDiskStore":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or not parts.path.startswith("/"):
            raise UsageError(f"storage URL {url!r} is not a local folder URL", "use file:///absolute/path")
        return cls(Path(unquote(parts.path)), settings)

    def local_path(self, key: str) -> Path:
        """Where `key` lives on disk (for a service that sends files itself)."""
        return self.root / self._full(key)

    # -- writes -------------------------------------------------------------------------------

    def _create(self, key: str, write: Callable[[BinaryIO, "hashlib._Hash"], int]) -> tuple[bool, str, int]:
        """Write through `write` into a staging file, then link it to `key` unless it exists."""
        target = self.local_path(key)
        with self._errors("put", key):
            _make_folders(self.root, target.parent)
            fd, tmp = tempfile.mkstemp(dir=self.root / STAGING, prefix="put-")
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as f:
                    size = write(f, digest)
                    f.flush()
                    os.fchmod(f.fileno(), OBJECT_MODE)
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, target)
                    created = True
                except FileExistsError:
                    created = False
            finally:
                os.unlink(tmp)
            if created:
                dir_fd = os.open(target.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        return created, digest.hexdigest(), size

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview | Path) -> PutResult:
        self._full(key)
        if isinstance(data, Path):
            source = data

            def write(f: BinaryIO, digest) -> int:
                size = 0
                with open(source, "rb") as src:
                    while chunk := src.read(COPY_CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
                return size
        elif isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data)

            def write(f: BinaryIO, digest) -> int:
                digest.update(view)
                f.write(view)
                return view.nbytes
        else:
            raise TypeError("put_if_absent takes bytes or a pathlib.Path")
        created, sha, size = self._create(key, write)
        return PutResult(created, key, sha, size)

    def put_pieces_if_absent(self, key: str, base_key: str, pieces: Sequence) -> StampResult:
        """Copy the base's ranges and the literal pieces into a staging file, then link it."""
        existing = self._existing_stamp(key)
        if existing is not None:
            return existing
        base, segs = self._segments(base_key, pieces)
        base_path = self.local_path(base_key)
        read = 0

        def write(f: BinaryIO, digest) -> int:
            nonlocal read
            with open(base_path, "rb") as src:
                for seg in segs:
                    if not seg.is_base:
                        digest.update(seg.data)
                        f.write(seg.data)
                        continue
                    src.seek(seg.src)
                    left = seg.end - seg.start
                    while left:
                        chunk = src.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise OSError(f"{base_key} is shorter than its stamp's pieces")
                        digest.update(chunk)
                        f.write(chunk)
                        left -= len(chunk)
                        read += len(chunk)
            return pc.output_size(segs)

        created, sha, size = self._create(key, write)
        return StampResult(created, key, size, sha if created else None,
                           bytes_uploaded=size if created else 0, bytes_downloaded=read, parts=1)


def _make_folders(base: Path, folder: Path) -> None:
    """Create `folder` and its missing parents below `base`, each FOLDER_MODE (Path.mkdir gives
    the parents it creates the umask's mode; a umask only ever removes bits from 0700)."""
    missing = []
    while folder != base and not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not base.is_dir():
        base.mkdir(parents=True, exist_ok=True)
    for path in reversed(missing):
        try:
            path.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # another writer made it first
            pass
