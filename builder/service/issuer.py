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

from builder import formats, log, stamp
from builder.config import is_version, version_key
from builder.enrollment import Enrollment, Secret
from rich.markup import escape

from builder.errors import FormatError, StorageError, UsageError, VerificationError
from builder.fileio import iter_range, write_atomic
from builder.signing.signers import Signers
from builder.release import Release
from builder.service.problems import (  # noqa: F401 - the service's errors, importable from here too
    FormatNotInRelease,
    NoEnrollmentKey,
    NotConfigured,
    ReleaseRefused,
    Revoked,
    StampFailed,
    UnknownRelease,
)
from builder.trust import SignedEnrollment, verify as verify_signed
from builder.storage import ObjectNotFoundError, Store, StorageUnavailableError, content_key
from builder.storage.release import INDEX_FORMAT

FORMATS = formats.KIND_NAMES
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


def token_fingerprint(token: Secret) -> str:
    """The full SHA-256 of the token: the id under which it is revoked and audited."""
    return hashlib.sha256(token.reveal().encode()).hexdigest()


def request_id(release: str, fmt: str, enrollment: Enrollment) -> str:
    material = "\0".join([release, fmt, enrollment.account_id, enrollment.group_id, enrollment.console_url,
                          token_fingerprint(enrollment.token)])
    return hashlib.sha256(b"builder-installer-v1\0" + material.encode()).hexdigest()[:32]


def _stamp_formats(rel: Release) -> list[str]:
    """The formats a release can be stamped into (msi-tagged from its msi, dmg from its pkg)."""
    return formats.kinds_of(rel.manifest["files"])


def _warn_line(message: str) -> None:
    """A warning on one line however long: log.warning wraps at the terminal's width (80
    columns when stderr is a file), which splits one event over several log lines."""
    log.console.print(f"[bold yellow]warning:[/] {escape(log.redact(message))}", soft_wrap=True)


class _Damaged(VerificationError):
    """A release object that is missing or does not match the release's index."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Formats stamped by signing again: (Signers field, what the key is, an alternative).
_RESIGNING_KEYS = {
    "msi": ("authenticode", "Authenticode code-signing key", "; msi-tagged needs no key"),
    "pkg": ("apple_installer", "Developer ID Installer identity", ""),
    "dmg": ("apple_application", "Developer ID Application identity", ""),
}

# Why a release is refused, in words that name no path of this host (for /healthz and answers).
REFUSAL_REASONS = {
    "signature": "a signature does not verify with the CA this service trusts",
    "checksum": "a file does not match the sha256 its manifest or index gives",
    "malformed": "its index, manifest or files are not what builder publishes",
    "incomplete": "an object its index names is missing from storage",
}


@dataclass(frozen=True)
class Refusal:
    version: str
    reason: str  # a key of REFUSAL_REASONS
    detail: str  # the whole error, for the log: it may name this host's paths and options

    @property
    def why(self) -> str:
        return REFUSAL_REASONS[self.reason]

    @classmethod
    def of(cls, version: str, exc: Exception) -> "Refusal":
        if isinstance(exc, _Damaged):
            reason = exc.reason
        elif isinstance(exc, VerificationError):
            reason = "checksum" if "does not match its sha256" in str(exc) else "signature"
        else:
            reason = "malformed"
        return cls(version, reason, log.redact(str(exc)))

    def error(self) -> ReleaseRefused:
        return ReleaseRefused(f"release {self.version} does not verify on this service ({self.why})",
                              "ask for another release or for latest; the service's operators see why in its log and /healthz")


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

    @staticmethod
    def read(path: Path, account_id: str, group_id: str | None = None) -> list[dict]:
        """An account's (or one group's) rows, oldest first, from a service's log opened read-only
        (`builder issued`: the service may be running and writing it)."""
        if not path.is_file():
            raise UsageError(f"--state {path.parent}: no audit log ({path.name})", "give the folder `builder serve --state` uses")
        query, params = "SELECT * FROM audit WHERE account_id = ?", [account_id]
        if group_id:
            query, params = query + " AND group_id = ?", [*params, group_id]
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cur = db.execute(query + " ORDER BY rowid", params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"--state {path.parent}: {path.name} is unreadable ({exc})",
                             "give the folder `builder serve --state` uses") from None
        finally:
            db.close()


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
        self._refused: dict[str, Refusal] = {}
        self._release_lock = threading.Lock()  # held while a release is fetched and verified
        self._states_lock = threading.Lock()  # what /healthz reads meanwhile: held for a copy
        # id -> (future, release, format) of the work this process does for a request
        self._inflight: dict[str, tuple[Future, str, str]] = {}
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
        versions = sorted(seen, key=version_key)
        self._versions = (now, versions)
        return versions

    def resolve(self, release: str, fmt: str | None = None) -> str:
        """The version a request names. `latest` is the newest release that verifies here and
        has `fmt` (any format when None): a Windows-only release does not hide the last pkg, and a
        release that does not verify is skipped. A named version must have `fmt`."""
        if release != "latest":
            if not is_version(release):
                raise UnknownRelease(f"release {release!r} is not a version or 'latest'", "for example 1.2.3")
            if fmt is not None:
                self._require_format(self.open_release(release)[0], release, fmt)
            return release
        versions = self.release_versions()
        if not versions:
            raise UnknownRelease("no release is published yet", "publish one with `builder publish`")
        refused = []
        for version in reversed(versions):
            try:
                rel = self.open_release(version)[0]
            except ReleaseRefused:
                refused.append(version)
                continue
            if fmt is None or formats.kind(fmt).base in rel.manifest["files"]:
                return version
        if len(refused) == len(versions):
            raise ReleaseRefused(f"no published release verifies on this service (refused: {', '.join(refused)})",
                                 "its operators must publish a release signed under the CA the service trusts")
        skipped = f" (releases that do not verify were skipped: {', '.join(refused)})" if refused else ""
        raise FormatNotInRelease(f"no published release has a {fmt} installer{skipped}",
                                 f"ask for one of: {', '.join(self._formats_published())}")

    @staticmethod
    def _require_format(rel: Release, version: str, fmt: str) -> None:
        if formats.kind(fmt).base not in rel.manifest["files"]:
            raise FormatNotInRelease(f"release {version} has no {fmt} installer",
                                     f"it has {', '.join(_stamp_formats(rel))}; ask for one of those, or for release latest")

    def _formats_published(self) -> list[str]:
        with self._states_lock:
            opened = [rel for rel, _index in self._releases.values()]
        return sorted({f for rel in opened for f in _stamp_formats(rel)}) or ["none"]

    def release_states(self) -> tuple[list[str], dict[str, Refusal]]:
        """(versions opened and verified, oldest first; refused versions -> why). What this
        process knows, without asking storage, nor waiting for a release being verified: for
        /healthz and /metrics."""
        with self._states_lock:
            ok, refused = list(self._releases), dict(self._refused)
        return sorted(ok, key=version_key), {v: refused[v] for v in sorted(refused, key=version_key)}

    def formats_of(self, version: str) -> list[str]:
        return _stamp_formats(self.open_release(version)[0])

    def open_release(self, version: str) -> tuple[Release, dict]:
        """The release, downloaded once into the cache and verified once, and its storage index.
        A release that does not verify (signed under another CA, a file that does not match its
        hash, a malformed index) is refused, reported once, and refused again at once when asked:
        published releases never change."""
        with self._release_lock:
            if version in self._releases:
                return self._releases[version]
            if version in self._refused:
                raise self._refused[version].error()
            try:
                opened = self._fetch_and_open(version)
            except (FormatError, VerificationError, _Damaged) as exc:
                refusal = Refusal.of(version, exc)
                with self._states_lock:
                    self._refused[version] = refusal
                _warn_line(f"release {version} is refused, the service serves the others: {refusal.detail}")
                raise refusal.error() from None
            with self._states_lock:
                self._releases[version] = opened
            return opened

    def _fetch_and_open(self, version: str) -> tuple[Release, dict]:
        index_key = f"{self.prefix}/releases/{version}/manifest.json"
        try:
            index_bytes = self.store.get(index_key)
        except ObjectNotFoundError:
            raise UnknownRelease(f"release {version} is not published", "GET /v1/releases lists what is") from None
        try:
            index = json.loads(index_bytes)
        except ValueError:
            raise FormatError(f"release {version}: index {index_key} is not JSON") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise FormatError(f"release {version}: index {index_key} is not a release index")
        folder = self.cache_dir / "releases" / version
        if not (folder / "manifest.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.cache_dir))
            try:
                for name, entry in index["files"].items():
                    try:
                        data = self.store.get(entry["key"])
                    except ObjectNotFoundError:
                        raise _Damaged("incomplete", f"release {version}: object {entry['key']} named by its index is missing") from None
                    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                        raise _Damaged("checksum", f"release {version}: object {entry['key']} does not match its sha256")
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / name).write_bytes(data)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging, folder)
            except OSError:  # another process won the race: use its copy
                shutil.rmtree(staging, ignore_errors=True)
        return self._open_cached(folder, index_bytes)

    def _open_cached(self, folder: Path, index_bytes: bytes) -> tuple[Release, dict]:
        """Release.open on the cached copy: with full verification (sha256 + signatures) the
        first time, and with a size check only when this cache already verified the same index
        under the same CA (a marker any process of this host writes after verifying): a service
        restarted with another CA verifies again."""
        marker = folder / VERIFIED_MARKER
        seen = marker.read_bytes() if marker.is_file() else None
        verified_as = index_bytes + b"\0ca:" + (hashlib.sha256(self.ca.read_bytes()).hexdigest().encode() if self.ca else b"system")
        rel = Release.open(folder, ca=self.ca, verify=seen != verified_as)
        if seen != verified_as:
            write_atomic(marker, verified_as)
        return rel, json.loads(index_bytes)

    def warm(self) -> None:
        """Open and verify every published release now, and hash the unchanged prefix of their
        slot formats, so that the first stamps do not pay for it. A release that does not verify
        is reported (one line) and refused; the others are served. Best effort: storage that is
        down now is reported when a request needs it."""
        try:
            versions = self.release_versions()
        except StorageError as exc:
            log.warning(f"releases not prepared ahead: {exc}")
            return
        opened = []
        for version in versions:
            try:
                opened.append(self.open_release(version)[0])
            except (ReleaseRefused, UnknownRelease):
                continue  # reported by open_release; or gone since the listing
            except StorageError as exc:
                log.warning(f"releases not prepared ahead: {exc}")
                return
        for rel in opened:
            for name in {formats.kind(k).base for k in formats.SLOTTED}:
                if name in rel.manifest["files"] and rel.file(name).slot:
                    base = rel.file(name)
                    _pieces_sha256(base.path, [("base", 0, base.slot["extents"][0][0])])
        ok, refused = self.release_states()
        if refused:
            _warn_line(f"serving releases {', '.join(ok) or 'none'}; refused (do not verify): {', '.join(refused)}")

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
        return f"{product.service_name}-{rec.release}-{safe}{formats.kind(rec.format).suffix}"

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
                                  "its operators must configure the enrollment key (a file or an HSM key) the releases pin")
        trust = self.open_release(version)[0].trust()
        if trust.key(self.enrollment_key.kid) is None:
            raise NotConfigured(f"release {version} does not pin this service's enrollment key {self.enrollment_key.kid}",
                                "its operators must give the service a key the release pins, or publish a release that pins this one")
        now = int(time.time())
        return self.enrollment_key.sign(enrollment, trust, issued_at=now,
                                        expires_at=now + expires_in if expires_in else None)

    def require_signing(self, fmt: str) -> None:
        """NotConfigured unless this process holds the key that `fmt` is signed with again (a
        baked msi, a pkg, a dmg); exe and msi-tagged are stamped into their slot unsigned again."""
        needed = _RESIGNING_KEYS.get(fmt)
        if needed is None or self.signers.unsigned or getattr(self.signers, needed[0]) is not None:
            return
        raise NotConfigured(f"this service cannot make {fmt} installers: it has no {needed[1]} to sign them",
                            f"its operators must configure one (on its workers, when it has workers){needed[2]}")

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

    def request(self, caller: str, *, release: str, fmt: str, enrollment: Enrollment, wait_s: float,
                pickup_s: float | None = None) -> tuple[str, Record | None]:
        """(id, record once ready, or None while it is made). The same request twice gives the
        same id and installer; concurrent identical requests share one piece of work. With
        workers and `pickup_s`, None comes early when no worker takes the job (_wait_for_job)."""
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}", f"choose from {', '.join(FORMATS)}")
        log.register_secret(enrollment.token.reveal())
        version = self.resolve(release, fmt)  # 404 now rather than a failed job later
        fp = token_fingerprint(enrollment.token)
        if self.is_revoked(fp):
            self.audit.record(caller, "refused-revoked", release=version, fmt=fmt, account_id=enrollment.account_id,
                              group_id=enrollment.group_id, token_fp=fp)
            raise Revoked("this enrollment token was revoked", "request an installer with the group's current token")
        if self.queue is None:
            self.require_signing(fmt)  # workers check their own keys
        installer_id = request_id(version, fmt, enrollment)
        rec = self.record(installer_id)
        key_id = None
        if rec is None:
            signed = self.sign(version, enrollment)
            key_id = signed.key_id
            rec = self._run(installer_id, version, fmt, signed, wait_s, pickup_s)
        self.audit.record(caller, "issue" if rec else "queued", installer_id=installer_id, release=version, fmt=fmt,
                          account_id=enrollment.account_id, group_id=enrollment.group_id, token_fp=fp,
                          sha256=rec.sha256 if rec else None, detail=f"key_id={key_id}" if key_id else None)
        return installer_id, rec

    def _run(self, installer_id: str, version: str, fmt: str, enrollment: SignedEnrollment, wait_s: float,
             pickup_s: float | None = None) -> Record | None:
        if self.queue is not None:
            self.queue.submit(installer_id, version, fmt, enrollment)
            return self._wait_for_job(installer_id, wait_s, pickup_s)
        with self._inflight_lock:
            found = self._inflight.get(installer_id)
            if found is None:
                fut = self._pool.submit(self.produce, installer_id, version, fmt, enrollment)
                found = self._inflight[installer_id] = (fut, version, fmt)
                fut.add_done_callback(lambda _f: self._forget(installer_id))
        try:
            return found[0].result(timeout=wait_s)
        except TimeoutError:
            return None

    def _wait_for_job(self, installer_id: str, wait_s: float, pickup_s: float | None) -> Record | None:
        """The record of a queued job, up to `wait_s`. With `pickup_s` (the HTTP service), only
        while a worker works on it: None (the caller answers 202) at once when no worker is
        registered, and after `pickup_s` when none has taken the job (all busy, or gone without
        deregistering), so that a request does not hold a connection and a thread for work
        nobody does. A slot stamp is ready in milliseconds, a baked one in seconds: look soon,
        then back off, so that a waiting request costs a few reads, not one every 10 ms."""
        start = time.monotonic()
        deadline, next_failure_check, pause = start + wait_s, start + FAILURE_CHECK_S, POLL_FIRST_S
        # Until a worker is seen with the job, its state is read at every look; then only
        # whether it failed, every FAILURE_CHECK_S.
        taken = pickup_s is None
        if not taken:
            try:
                pickup_s = pickup_s if self.queue.has_workers() else 0.0
            except StorageUnavailableError:
                taken = True  # cannot tell: the record in storage decides
        while True:
            rec = self.record(installer_id)
            if rec is not None:
                return rec
            now = time.monotonic()
            if not taken:
                try:
                    state = self.queue.state(installer_id)
                except StorageUnavailableError:
                    state = "unknown"  # a worker may be finishing it: wait for the record
                if state == "failed":
                    self.raise_if_failed(installer_id)
                taken = state in ("started", "finished", "unknown")
                if not taken and now - start >= pickup_s:
                    return self.record(installer_id)
            elif now >= next_failure_check:
                self._raise_if_failed_quietly(installer_id)
                next_failure_check = now + FAILURE_CHECK_S
            if now >= deadline:
                break
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, POLL_MAX_S)
        self._raise_if_failed_quietly(installer_id)
        return None

    def raise_if_failed(self, installer_id: str) -> None:
        """The failure a worker reported for this request, as the error it would have been
        in-process (same code, status and sentence)."""
        if self.queue is not None:
            problem = self.queue.failure(installer_id)
            if problem is not None:
                raise StampFailed(problem.message, problem=problem)

    def _raise_if_failed_quietly(self, installer_id: str) -> None:
        """While waiting for a job already queued: a queue that stops answering is no reason to
        fail the request, since the record in storage is what says the installer is ready."""
        try:
            self.raise_if_failed(installer_id)
        except StorageUnavailableError:
            pass

    def pending(self, installer_id: str) -> tuple[str, str] | None:
        """(release, format) of a request still being worked on or queued, else None."""
        with self._inflight_lock:
            found = self._inflight.get(installer_id)
        if found is not None:
            return found[1], found[2]
        return self.queue.pending(installer_id) if self.queue is not None else None

    def _forget(self, installer_id: str) -> None:
        with self._inflight_lock:
            self._inflight.pop(installer_id, None)

    def produce(self, installer_id: str, version: str, fmt: str, enrollment: SignedEnrollment) -> Record:
        """Stamp, store (create-if-absent), then write the record. Safe to run twice anywhere."""
        rec = self.record(installer_id)
        if rec is not None:
            return rec
        self.require_signing(fmt)
        rel, index = self.open_release(version)
        kind = formats.kind(fmt)
        base, suffix = rel.file(kind.base), kind.suffix
        streamed = False
        if kind.slotted:
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
