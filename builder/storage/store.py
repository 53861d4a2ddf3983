"""One `Store` over obstore for local disk (`file:///path`), S3 (`s3://bucket/prefix`) and Azure
Blob (`az://container/prefix`); `backends.open_store(url, settings)` picks the backend.

What every backend shares lives here: key checks, reads (get, ranged get, head, list, streaming
a stamped object from its base), error translation. Each backend module (`local`, `s3`,
`azure`) adds its create-if-absent writes and says what it can do beyond them (`presigned_links`,
`local_path`, `pins_ranges_to_etag`): callers ask a store that, never which backend it is. Nothing is
ever overwritten or deleted: objects are created once, and a writer that loses a create race
reports `created=False` and uses the object that won.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator, Sequence

import obstore
from obstore import exceptions as obx

from builder import log
from builder.errors import StorageError
from builder.storage import pieces as pc
from builder.storage.errors import InvalidKeyError, ObjectNotFoundError, StorageUnavailableError
from builder.storage.keys import validate_key, validate_prefix
from builder.storage.settings import StorageSettings

STREAM_CHUNK = 1024 * 1024
MAX_PRESIGN_S = 7 * 24 * 3600
# Words in obstore's error text that mean "nobody answered (in time)" rather than "no".
_TRANSIENT_RE = re.compile(
    r"error sending request|kind: connect|connection (refused|reset|closed)|timed ?out|timeout|"
    r"dns error|status code: 5\d\d|broken pipe|incomplete message|unexpected eof", re.IGNORECASE)


@dataclass(frozen=True)
class PutResult:
    created: bool  # False: the object was already there (another writer won); it was left as is
    key: str
    sha256: str  # of the data offered by this call
    size: int


@dataclass(frozen=True)
class StampResult:
    """A materialised stamp, and what it cost: bytes sent by this process, bytes the backend
    copied server-side, and base bytes this process read back to build uploaded parts."""

    created: bool
    key: str
    size: int
    sha256: str | None  # computed where the bytes pass through this process (local disk)
    bytes_uploaded: int = 0
    bytes_copied: int = 0
    bytes_downloaded: int = 0
    parts: int = 0


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    last_modified: datetime | None = None


class Store:
    """Base of the three backends. Keys are relative to the store's URL prefix."""

    kind = "?"  # the backend's name (file, s3, az); what a store can do is said by the attributes below
    # A client can fetch an object straight from the backend with `presigned_url` (S3, Azure).
    # Without, whoever serves downloads (the service) reads them from the store itself.
    presigned_links = False
    # Ranged reads of a base are made conditional on the ETag its `head` gave (If-Match), so
    # a base replaced mid-stream is never mixed into a stamp.
    pins_ranges_to_etag = False

    def __init__(self, url: str, settings: StorageSettings, prefix: str, obs_store):
        self.url = url  # for messages: never carries credentials
        self.settings = settings
        self.prefix = validate_prefix(prefix, "the storage URL's path")
        self._obs = obs_store

    @classmethod
    def from_url(cls, url: str, settings: StorageSettings) -> "Store":
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    def local_path(self, key: str) -> Path | None:
        """Where `key` lives on this machine's disk, for a service that sends files itself;
        None where objects are not files here."""
        self._full(key)
        return None

    # -- keys and errors ----------------------------------------------------------------------

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def unavailable(self, op: str, key: str | None, detail: str = "") -> StorageUnavailableError:
        where = f" ({op} {key})" if key else f" ({op})"
        return StorageUnavailableError(
            f"storage {self.url} is unreachable or not answering{where}{': ' + detail if detail else ''}: retry later",
            "check that the storage endpoint is up and reachable from this machine",
            retry_after=self.settings.retry_after_s)

    def _translate(self, exc: BaseException, op: str, key: str | None) -> StorageError:
        log.debug(f"storage {self.url}: {op} {key}: {type(exc).__name__}: {exc}")
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, FileNotFoundError):
            return ObjectNotFoundError(f"storage {self.url} has no object {key}", key=key or "")
        if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError)):
            return StorageError(f"storage {self.url} refused this machine's credentials ({op} {key})",
                                "check the access key and secret, or the account key, and their permissions")
        if isinstance(exc, (obx.GenericError, obx.JoinError, TimeoutError, ConnectionError)) and _TRANSIENT_RE.search(str(exc)):
            return self.unavailable(op, key)
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return self.unavailable(op, key)
        if isinstance(exc, OSError):
            return StorageError(f"storage {self.url}: {op} {key} failed: {exc.strerror or exc}",
                                "check the storage folder's permissions and free space")
        return StorageError(f"storage {self.url}: {op} {key} failed ({type(exc).__name__})",
                            "the backend's answer is in the debug log (--verbose)")

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None):
        try:
            yield
        except StorageError:
            raise
        except (obx.BaseError, OSError, ValueError) as exc:
            # What a backend can raise; a TypeError or the like is a bug and keeps its traceback.
            raise self._translate(exc, op, key) from exc

    def _create(self, key: str, data: memoryview) -> bool:
        """One conditional PUT (obstore `mode="create"`: If-None-Match on S3 and Azure). True if
        it created `key`, False if the key was already there."""
        with self._errors("put", key):
            try:
                obstore.put(self._obs, self._full(key), data, mode="create")
                return True
            except obx.AlreadyExistsError:
                return False

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("get", key):
            return bytes(obstore.get(self._obs, full).bytes())

    def download(self, key: str, dst: Path, chunk_size: int = 1 << 20) -> tuple[str, int]:
        """The object's bytes into `dst`, a new file, streamed (memory holds one chunk, not the
        object); returns their sha256 and size."""
        full, digest, size = self._full(key), hashlib.sha256(), 0
        with open(dst, "xb") as out:  # a local error is not the storage's
            with self._errors("get", key):
                stream = obstore.get(self._obs, full).stream(min_chunk_size=chunk_size)
                for chunk in stream:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        return digest.hexdigest(), size

    def open_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""
        full = self._full(key)
        if not 0 <= start <= end:
            raise ValueError(f"bad range [{start}, {end})")
        if start == end:
            return b""
        with self._errors("ranged get", key):
            data = bytes(obstore.get_range(self._obs, full, start=start, end=end))
        if len(data) != end - start:
            raise StorageError(f"storage {self.url}: {key} is shorter than {end} bytes")
        return data

    def head(self, key: str) -> ObjectInfo:
        full = self._full(key)
        with self._errors("head", key):
            meta = obstore.head(self._obs, full)
        return ObjectInfo(key, meta["size"], meta.get("e_tag"), meta.get("last_modified"))

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under the folder `prefix` (segment-wise: "a/b" lists a/b/..., not a/bc), by key."""
        validate_prefix(prefix)
        full = "/".join(p for p in (self.prefix, prefix) if p) or None
        out = []
        with self._errors("list", prefix or "/"):
            for chunk in obstore.list(self._obs, prefix=full):
                for meta in chunk:
                    key = self._relative(meta["path"])
                    try:
                        validate_key(key)
                    except InvalidKeyError:
                        continue  # staging files and anything this layer did not write
                    out.append(ObjectInfo(key, meta["size"], meta.get("e_tag"), meta.get("last_modified")))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        """Remove one object (a missing one is fine): for `builder prune` only; nothing else deletes."""
        full = self._full(key)
        try:
            with self._errors("delete", key):
                obstore.delete(self._obs, full)
        except ObjectNotFoundError:
            pass  # Azure says so; S3 and the local store do not

    def _existing_stamp(self, key: str) -> StampResult | None:
        """A stamp already stored under `key` (never overwritten): what put_pieces_if_absent
        answers without doing any work."""
        self._full(key)
        try:
            info = self.head(key)
        except ObjectNotFoundError:
            return None
        return StampResult(False, key, info.size, None)

    def _segments(self, base_key: str, pieces: Sequence) -> tuple[ObjectInfo, list[pc.Segment]]:
        base = self.head(base_key)
        try:
            return base, pc.segments(pieces, base.size)
        except ValueError as exc:
            raise StorageError(f"the stamp's pieces do not fit {base_key} ({base.size} bytes): {exc}",
                               "take the pieces from the release's slot layout of this base") from exc

    def stream_pieces(self, base_key: str, pieces: Sequence, chunk_size: int = STREAM_CHUNK) -> Iterator[bytes]:
        """The stamped object as chunks, read with ranged GETs of the base: nothing is stored.

        The base is looked up and the pieces checked before this returns, so a web service can
        still answer 404/500 before it starts its response."""
        base, segs = self._segments(base_key, pieces)
        return self._stream(base, segs, chunk_size)

    def _stream(self, base: ObjectInfo, segs: list[pc.Segment], chunk_size: int) -> Iterator[bytes]:
        full = self._full(base.key)
        for seg in segs:
            if not seg.is_base:
                yield seg.data
                continue
            options = {"range": (seg.src, seg.src + seg.end - seg.start)}
            if base.etag and self.pins_ranges_to_etag:
                options["if_match"] = base.etag  # a base that changed mid-stream must not be mixed in
            sent = 0
            with self._errors("ranged get", base.key):
                for chunk in obstore.get(self._obs, full, options=options).stream(min_chunk_size=chunk_size):
                    sent += len(chunk)
                    yield bytes(chunk)
            if sent != seg.end - seg.start:
                raise StorageError(f"storage {self.url}: {base.key} returned {sent} bytes for a range of {seg.end - seg.start}")

    def _read_output(self, base: ObjectInfo, segs: list[pc.Segment], start: int, end: int) -> tuple[bytes, int]:
        """Output bytes [start, end) in memory, and how many of them were read from the base."""
        chunks, read = [], 0
        for seg in pc.ranges(segs, start, end):
            if seg.is_base:
                chunks.append(self.open_range(base.key, seg.src, seg.src + seg.end - seg.start))
                read += seg.end - seg.start
            else:
                chunks.append(seg.data)
        return b"".join(chunks), read

    # -- writes (backends) --------------------------------------------------------------------

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview | Path) -> PutResult:
        raise NotImplementedError

    def put_pieces_if_absent(self, key: str, base_key: str, pieces: Sequence) -> StampResult:
        """Generic path: build the stamped object in memory once and create it; backends with
        server-side range copies (S3) or cheap local copies override this."""
        existing = self._existing_stamp(key)
        if existing is not None:
            return existing
        base, segs = self._segments(base_key, pieces)
        data, read = self._read_output(base, segs, 0, pc.output_size(segs))
        created = self.put_if_absent(key, data).created
        return StampResult(created, key, len(data), hashlib.sha256(data).hexdigest() if created else None,
                           bytes_uploaded=len(data) if created else 0, bytes_downloaded=read, parts=1)

    # -- download URLs ------------------------------------------------------------------------

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A URL a client can GET for `expires_s` seconds, signed by the backend (S3, Azure): only
        where `presigned_links` says so."""
        self._full(key)  # a bad key is refused as such, whatever the store
        raise StorageError(f"storage {self.url} makes no presigned download URLs",
                           "downloads from this store are served by `builder serve`")

    def _sign_with_obstore(self, key: str, expires_s: int) -> str:
        full = self._full(key)
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_S} seconds")
        with self._errors("sign", key):
            return obstore.sign(self._obs, "GET", full, timedelta(seconds=expires_s))
