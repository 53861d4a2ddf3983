"""Issuing group installers: what the HTTP service and the workers do, without HTTP.

A request (release, format, account, group, token) has a deterministic id; the installer it
yields is stored once, content-addressed, and described by a record written after it:

    installers/<sha256[:2]>/<sha256><suffix>   the stamped installer (never overwritten)
    records/<id>.json                          id -> installer, written last, create-if-absent
    revocations/tokens/<token fp>.json         tokens that may no longer be handed out, to any
                                               account or group: a revoked token is dead everywhere

Everything shared between service instances and workers lives in storage, so any number of
them agree; storage's create-if-absent is the final guard against double work. The audit log
(SQLite, append-only) is per service host and never holds a token, only its fingerprint.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from builder import log, stamp
from builder.config import is_version
from builder.enrollment import Enrollment, Secret
from builder.errors import BuilderError, FormatError, StorageError, UsageError
from builder.fileio import iter_range, write_atomic
from builder.formats.base import Signers
from builder.release import Release
from builder.trust import SignedEnrollment, verify as verify_signed
from builder.storage import ObjectNotFoundError, Store, StorageUnavailableError, content_key
from builder.storage.release import INDEX_FORMAT

FORMATS = tuple(stamp.STAMP_FORMATS)
# Finished records kept in memory (least recently used out): the ids the console asks about
# again, a few KiB each; a long-running service must not keep one per installer ever issued.
RECORD_CACHE = 1024
# Hash states of release prefixes (one per release file with a slot), least recently used out.
PREFIX_CACHE = 32
# Waiting for a queued job's record: first look after POLL_FIRST_S, then ever less often.
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.25
FAILURE_CHECK_S = 0.5
VERIFIED_MARKER = ".verified-index.json"
VERSIONS_TTL_S = 5.0


class UnknownRelease(BuilderError):
    exit_code = 12


class Revoked(BuilderError):
    exit_code = 12


class NoEnrollmentKey(BuilderError):
    """The service was started without an enrollment key: it cannot sign enrollments."""

    exit_code = 2


class StampFailed(BuilderError):
    """A worker could not make the installer (after its retries); nothing was published."""

    exit_code = 7


def token_fingerprint(token: Secret) -> str:
    """The full SHA-256 of the token: the id under which it is revoked and audited."""
    return hashlib.sha256(token.reveal().encode()).hexdigest()


def request_id(release: str, fmt: str, enrollment: Enrollment) -> str:
    material = "\0".join([release, fmt, enrollment.account_id, enrollment.group_id, enrollment.console_url,
                          token_fingerprint(enrollment.token)])
    return hashlib.sha256(b"builder-installer-v1\0" + material.encode()).hexdigest()[:32]


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@dataclass(frozen=True)
class Record:
    id: str
    release: str
    format: str
    key: str
    sha256: str
    size: int
    account_id: str
    group_id: str
    token_fingerprint: str
    # True: `key` names a stamp description (base object + slot bytes) that the download route
    # streams as base[0:off] + slot + base[off+len:], instead of a stored copy (local storage).
    streamed: bool = False

    def as_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()


class Audit:
    """Append-only SQLite table: who was issued which installer, with which token fingerprint."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed row survives a crash of this process; only a power cut
            # can lose the last rows. FULL would fsync on every request.
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Appended to, seldom read: a small page cache (SQLite's default is 2 MB) keeps a
            # long-running service's memory from growing with the log.
            self._db.execute("PRAGMA cache_size=-256")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS audit (ts REAL NOT NULL, caller TEXT NOT NULL, action TEXT NOT NULL,"
                " installer_id TEXT, release TEXT, format TEXT, account_id TEXT, group_id TEXT,"
                " token_fingerprint TEXT, sha256 TEXT, detail TEXT)")
            # Append-only: the database itself refuses changes to what was recorded.
            self._db.execute("CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit"
                             " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")
            self._db.execute("CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit"
                             " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")

    def record(self, caller: str, action: str, *, installer_id=None, release=None, fmt=None, account_id=None,
               group_id=None, token_fp=None, sha256=None, detail=None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (time.time(), caller, action, installer_id, release, fmt, account_id, group_id,
                              token_fp, sha256, detail))

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM audit ORDER BY rowid")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]


class Issuer:
    """Turns requests into stored installers. Thread-safe; one per process."""

    def __init__(self, store: Store, *, signers: Signers, cache_dir: Path, audit: Audit,
                 releases_prefix: str = "dist", ca: Path | None = None, workers: int = 2, enrollment_key=None):
        self.store = store
        self.signers = signers
        # Signs each group's enrollment (builder.signing.enrollment_key); workers never need it:
        # they receive enrollments already signed.
        self.enrollment_key = enrollment_key
        self.cache_dir = cache_dir
        self.audit = audit
        self.prefix = releases_prefix
        self.ca = ca
        self._releases: dict[str, tuple[Release, dict]] = {}
        self._release_lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._inflight_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stamp")
        self._records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self._records_lock = threading.Lock()
        self._versions: tuple[float, list[str]] | None = None
        self.queue = None  # set by builder.service.jobs when Redis workers do the stamping

    # -- releases ------------------------------------------------------------------------------

    def release_versions(self) -> list[str]:
        """Published versions, oldest first; listed at most once per VERSIONS_TTL_S seconds."""
        now = time.monotonic()
        if self._versions is not None and now - self._versions[0] < VERSIONS_TTL_S:
            return self._versions[1]
        seen = set()
        for obj in self.store.list(f"{self.prefix}/releases"):
            parts = obj.key.split("/")
            if parts[-1] == "manifest.json" and is_version(parts[-2]):
                seen.add(parts[-2])
        versions = sorted(seen, key=_version_key)
        self._versions = (now, versions)
        return versions

    def resolve(self, release: str) -> str:
        if release == "latest":
            versions = self.release_versions()
            if not versions:
                raise UnknownRelease("no release is published yet", "publish one with `builder publish`")
            return versions[-1]
        if not is_version(release):
            raise UnknownRelease(f"release {release!r} is not a version or 'latest'", "for example 1.2.3")
        return release

    def open_release(self, version: str) -> tuple[Release, dict]:
        """The release, downloaded once into the cache and verified once, and its storage index."""
        with self._release_lock:
            if version in self._releases:
                return self._releases[version]
            index_key = f"{self.prefix}/releases/{version}/manifest.json"
            try:
                index_bytes = self.store.get(index_key)
            except ObjectNotFoundError:
                raise UnknownRelease(f"release {version} is not published", "GET /v1/releases lists what is") from None
            index = json.loads(index_bytes)
            if index.get("format") != INDEX_FORMAT:
                raise FormatError(f"release {version}: index {index_key} is not a release index")
            folder = self.cache_dir / "releases" / version
            if not (folder / "manifest.json").is_file():
                staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.cache_dir))
                for name, entry in index["files"].items():
                    data = self.store.get(entry["key"])
                    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                        shutil.rmtree(staging)
                        raise StorageError(f"release {version}: object {entry['key']} does not match its sha256")
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(data)
                folder.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(staging, folder)
                except OSError:  # another process won the race: use its copy
                    shutil.rmtree(staging, ignore_errors=True)
            self._releases[version] = self._open_cached(folder, index_bytes)
            return self._releases[version]

    def _open_cached(self, folder: Path, index_bytes: bytes) -> tuple[Release, dict]:
        """Release.open on the cached copy: with full verification (sha256 + signatures) the
        first time, and with a size check only when this cache already verified the same index
        (a marker any process of this host writes after verifying)."""
        marker = folder / VERIFIED_MARKER
        seen = marker.read_bytes() if marker.is_file() else None
        rel = Release.open(folder, ca=self.ca, verify=seen != index_bytes)
        if seen != index_bytes:
            write_atomic(marker, index_bytes)
        return rel, json.loads(index_bytes)

    def warm(self) -> None:
        """Open releases and hash the unchanged prefix of their slot formats now, so that the
        first stamps do not pay for it. Best effort: storage that is down now is reported when
        a request needs it."""
        try:
            opened = [self.open_release(v)[0] for v in self.release_versions()]
        except StorageError as exc:
            log.warning(f"releases not prepared ahead: {exc}")
            return
        for rel in opened:
            for fmt in stamp.SLOTTED:
                name = stamp.STAMP_FORMATS[fmt]
                if name in rel.manifest["files"] and rel.file(name).slot:
                    base = rel.file(name)
                    _pieces_sha256(base.path, [("base", 0, base.slot["extents"][0][0])])

    def msi_name(self, version: str) -> str:
        """The file name of the release's MSI (what `msiexec /i` names in a ready command line)."""
        rel = self.open_release(version)[0]
        return rel.file("msi").path.name if "msi" in rel.manifest["files"] else "agent.msi"

    def default_console_url(self, version: str) -> str:
        return self.open_release(version)[0].product().console_url

    def download_name(self, rec: "Record") -> str:
        """An ASCII file name for the browser: product, version, group."""
        product = self.open_release(rec.release)[0].product()
        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in rec.group_id)
        return f"{product.service_name}-{rec.release}-{safe}{stamp.SUFFIX[rec.format]}"

    # -- records and revocations --------------------------------------------------------------

    def record(self, installer_id: str) -> Record | None:
        """The record of a finished installer. Records never change once written, so found ones
        are kept in memory (bounded); a missing one is asked again next time."""
        with self._records_lock:
            rec = self._records.get(installer_id)
            if rec is not None:
                self._records.move_to_end(installer_id)
        if rec is not None:
            return rec
        try:
            rec = Record(**json.loads(self.store.get(f"records/{installer_id}.json")))
        except ObjectNotFoundError:
            return None
        with self._records_lock:
            self._records[installer_id] = rec
            while len(self._records) > RECORD_CACHE:
                self._records.popitem(last=False)
        return rec

    def stamp_pieces(self, rec: Record) -> tuple[str, list]:
        """(base object key, pieces) of a streamed installer."""
        doc = json.loads(self.store.get(rec.key))
        pieces = [("base", p[1], p[2]) if p[0] == "base" else ("bytes", base64.b64decode(p[1])) for p in doc["pieces"]]
        return doc["base_key"], pieces

    def _revocation_key(self, token_fp: str) -> str:
        # The token alone names it: revoked for one group, it is refused for every account and
        # group, so a leaked token cannot be reused by asking for another group's installer.
        return f"revocations/tokens/{token_fp}.json"

    def is_revoked(self, token_fp: str) -> bool:
        return self.store.exists(self._revocation_key(token_fp))

    def revoke(self, caller: str, account_id: str, group_id: str, token: Secret) -> str:
        fp = token_fingerprint(token)
        doc = json.dumps({"account_id": account_id, "group_id": group_id, "token_fingerprint": fp,
                          "revoked_at": int(time.time()), "by": caller}).encode()
        self.store.put_if_absent(self._revocation_key(fp), doc)  # a second revocation keeps the first
        self.audit.record(caller, "revoke", account_id=account_id, group_id=group_id, token_fp=fp)
        return fp

    # -- issuing ------------------------------------------------------------------------------

    def sign(self, version: str, enrollment: Enrollment, expires_in: int | None = None) -> SignedEnrollment:
        """`enrollment` signed for release `version`'s agents; EnrollmentError (422, naming
        console_url) when its pins would refuse it."""
        if self.enrollment_key is None:
            raise NoEnrollmentKey("this service has no enrollment key, so it cannot sign enrollments",
                                  "start it with --enrollment-key or --enrollment-key-pkcs11")
        now = int(time.time())
        return self.enrollment_key.sign(enrollment, self.open_release(version)[0].trust(), issued_at=now,
                                        expires_at=now + expires_in if expires_in else None)

    def parse_signed(self, version: str, jws: str) -> SignedEnrollment:
        """A signed enrollment handed to a worker, checked against the release's pins."""
        return verify_signed(jws, self.open_release(version)[0].trust(), int(time.time()))

    def enrollment(self, caller: str, *, release: str, enrollment: Enrollment, expires_in: int | None) -> tuple[str, SignedEnrollment]:
        """(version, signed enrollment) for `msiexec ... ENROLLMENT=`, revocation and pins checked."""
        version = self.resolve(release)
        log.register_secret(enrollment.token.reveal())
        fp = token_fingerprint(enrollment.token)
        if self.is_revoked(fp):
            self.audit.record(caller, "refused-revoked", release=version, fmt="enrollment", account_id=enrollment.account_id,
                              group_id=enrollment.group_id, token_fp=fp)
            raise Revoked("this group's enrollment token was revoked", "request an enrollment with the group's current token")
        signed = self.sign(version, enrollment, expires_in)
        self.audit.record(caller, "enrollment", release=version, fmt="enrollment", account_id=enrollment.account_id,
                          group_id=enrollment.group_id, token_fp=fp, detail=f"key_id={signed.key_id}")
        return version, signed

    def request(self, caller: str, *, release: str, fmt: str, enrollment: Enrollment, wait_s: float) -> tuple[str, Record | None]:
        """(id, record once ready). The same request twice gives the same id and installer;
        concurrent identical requests share one piece of work."""
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}", f"choose from {', '.join(FORMATS)}")
        log.register_secret(enrollment.token.reveal())
        version = self.resolve(release)
        fp = token_fingerprint(enrollment.token)
        if self.is_revoked(fp):
            self.audit.record(caller, "refused-revoked", release=version, fmt=fmt, account_id=enrollment.account_id,
                              group_id=enrollment.group_id, token_fp=fp)
            raise Revoked("this enrollment token was revoked", "request an installer with the group's current token")
        rel, _index = self.open_release(version)  # 404 now rather than a failed job later
        if stamp.STAMP_FORMATS[fmt] not in rel.manifest["files"]:
            raise UnknownRelease(f"release {version} has no {fmt} installer",
                                 f"it has: {', '.join(rel.manifest['files'])}")
        installer_id = request_id(version, fmt, enrollment)
        rec = self.record(installer_id)
        key_id = None
        if rec is None:
            signed = self.sign(version, enrollment)
            key_id = signed.key_id
            rec = self._run(installer_id, version, fmt, signed, wait_s)
        self.audit.record(caller, "issue" if rec else "queued", installer_id=installer_id, release=version, fmt=fmt,
                          account_id=enrollment.account_id, group_id=enrollment.group_id, token_fp=fp,
                          sha256=rec.sha256 if rec else None, detail=f"key_id={key_id}" if key_id else None)
        return installer_id, rec

    def _run(self, installer_id: str, version: str, fmt: str, enrollment: SignedEnrollment, wait_s: float) -> Record | None:
        if self.queue is not None:
            self.queue.submit(installer_id, version, fmt, enrollment)
            # A slot stamp is ready in milliseconds, a baked one in seconds: look soon, then back
            # off, so that a waiting request costs a few storage reads, not one every 10 ms.
            now = time.monotonic()
            deadline, next_failure_check, pause = now + wait_s, now + FAILURE_CHECK_S, POLL_FIRST_S
            while True:
                rec = self.record(installer_id)
                if rec is not None:
                    return rec
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= next_failure_check:
                    self._raise_if_failed_quietly(installer_id)
                    next_failure_check = now + FAILURE_CHECK_S
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, POLL_MAX_S)
            self._raise_if_failed_quietly(installer_id)
            return None
        with self._inflight_lock:
            fut = self._inflight.get(installer_id)
            if fut is None:
                fut = self._pool.submit(self.produce, installer_id, version, fmt, enrollment)
                self._inflight[installer_id] = fut
                fut.add_done_callback(lambda _f: self._forget(installer_id))
        try:
            return fut.result(timeout=wait_s)
        except TimeoutError:
            return None

    def raise_if_failed(self, installer_id: str) -> None:
        if self.queue is not None:
            why = self.queue.failure(installer_id)
            if why is not None:
                raise StampFailed(f"the installer could not be made: {why}", "the service's operators have the worker log; ask again later")

    def _raise_if_failed_quietly(self, installer_id: str) -> None:
        """While waiting for a job already queued: a queue that stops answering is no reason to
        fail the request, since the record in storage is what says the installer is ready."""
        try:
            self.raise_if_failed(installer_id)
        except StorageUnavailableError:
            pass

    def is_pending(self, installer_id: str) -> bool:
        with self._inflight_lock:
            if installer_id in self._inflight:
                return True
        return self.queue is not None and self.queue.is_pending(installer_id)

    def _forget(self, installer_id: str) -> None:
        with self._inflight_lock:
            self._inflight.pop(installer_id, None)

    def produce(self, installer_id: str, version: str, fmt: str, enrollment: SignedEnrollment) -> Record:
        """Stamp, store (create-if-absent), then write the record. Safe to run twice anywhere."""
        rec = self.record(installer_id)
        if rec is not None:
            return rec
        rel, index = self.open_release(version)
        base = rel.file(stamp.STAMP_FORMATS[fmt])
        suffix = stamp.SUFFIX[fmt]
        streamed = False
        if fmt in stamp.SLOTTED:
            pieces = stamp.stamp_ranges(base, enrollment)
            sha = _pieces_sha256(base.path, pieces)
            base_key = index["files"][base.path.name]["key"]
            size = base.entry["size"]
            if self.store.kind == "file":
                # The download route streams it from the release object: a few KiB stored per
                # group instead of a 30 MB copy (S3 and Azure need an object to presign).
                streamed = True
                key = content_key("stamps", sha, ".json")
                doc = {"format": "builder-stamp/1", "base_key": base_key, "size": size, "sha256": sha,
                       "pieces": [list(p) if p[0] == "base" else ["bytes", base64.b64encode(p[1]).decode()] for p in pieces]}
                self.store.put_if_absent(key, json.dumps(doc, sort_keys=True).encode())
            else:
                key = content_key("installers", sha, suffix)
                if not self.store.exists(key):
                    self.store.put_pieces_if_absent(key, base_key, pieces)
        else:
            with tempfile.TemporaryDirectory(prefix="builder-issue-", dir=self.cache_dir) as tmp:
                out = Path(tmp) / f"installer{suffix}"
                result = stamp.stamp(rel, fmt, enrollment, self.signers, out)
                sha, size = result.sha256, result.size
                key = content_key("installers", sha, suffix)
                self.store.put_if_absent(key, out)
        rec = Record(installer_id, version, fmt, key, sha, size, enrollment.account_id, enrollment.group_id,
                     token_fingerprint(enrollment.token), streamed)
        self.store.put_if_absent(f"records/{installer_id}.json", rec.as_json())
        return self.record(installer_id) or rec

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_prefix_hashes: collections.OrderedDict[tuple[str, int], "hashlib._Hash"] = collections.OrderedDict()
_prefix_lock = threading.Lock()


def _pieces_sha256(base: Path, pieces) -> str:
    """SHA-256 of the stamped file without writing it. The slot sits near the end of the base,
    so the hash state of the unchanged prefix (base[0:off]) is computed once per release and
    copied: a stamp then hashes only the slot and the few bytes after it."""
    pieces = list(pieces)
    h = None
    if pieces and pieces[0][0] == "base" and pieces[0][1] == 0:
        cache_key = (str(base), pieces[0][2])
        with _prefix_lock:
            cached = _prefix_hashes.get(cache_key)
            if cached is not None:
                _prefix_hashes.move_to_end(cache_key)
        if cached is None:
            cached = hashlib.sha256()
            _hash_range(base, 0, pieces[0][2], cached)
            with _prefix_lock:
                _prefix_hashes[cache_key] = cached
                while len(_prefix_hashes) > PREFIX_CACHE:
                    _prefix_hashes.popitem(last=False)
        h = cached.copy()
        pieces = pieces[1:]
    h = h or hashlib.sha256()
    for piece in pieces:
        if piece[0] == "bytes":
            h.update(piece[1])
        else:
            _hash_range(base, piece[1], piece[2], h)
    return h.hexdigest()


def _hash_range(base: Path, start: int, length: int, h) -> None:
    with open(base, "rb") as fh:
        for chunk in iter_range(fh, start, length, too_short=f"{base}: shorter than the release says"):
            h.update(chunk)
