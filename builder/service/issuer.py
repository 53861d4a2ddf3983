"""Issuing group installers: what the HTTP service and the workers do, without HTTP.

A request (release, format, account, group, token) has a deterministic id; the installer it
yields is stored once, content-addressed, and described by a record written after it. The
Issuer runs a request through the parts, each a module of builder/service/:

    releases.py      the published releases, downloaded and verified once (ReleaseCache)
    revocations.py   revoked tokens, refused to every account and group
    installers.py    stamped installers and stamp documents in storage
    records.py       id -> installer, written last, create-if-absent
    queued.py        waiting for a job that a worker does (jobs.py: the Redis queue)
    audit.py         the audit log (SQLite, append-only, per service host; fingerprints, no tokens)

Everything shared between service instances and workers lives in storage, so any number of
them agree; storage's create-if-absent is the final guard against double work. Stamping itself
is builder.stamp's.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from builder import formats, log, stamp
from builder.enrollment import Enrollment, Secret
from builder.errors import UsageError
from builder.service import installers, queued
from builder.service.audit import Audit
from builder.service.problems import NoEnrollmentKey, NotConfigured, Revoked
from builder.service.records import Record, Records, request_id
from builder.service.releases import ReleaseCache
from builder.service.revocations import Revocations, token_fingerprint
from builder.signing.signers import IDENTITIES, Signers
from builder.storage import Store
from builder.trust import SignedEnrollment, verify as verify_signed

FORMATS = formats.KIND_NAMES


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
        self.releases = ReleaseCache(store, cache_dir, releases_prefix, ca, signed_only=not signers.unsigned)
        self.records = Records(store)
        self.revocations = Revocations(store)
        # id -> (future, release, format) of the work this process does for a request
        self._inflight: dict[str, tuple[Future, str, str]] = {}
        self._inflight_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stamp")
        self.queue = None  # set by builder.service.jobs when Redis workers do the stamping

    # -- releases ------------------------------------------------------------------------------

    def resolve(self, release: str, fmt: str | None = None) -> str:
        """The version a request names (ReleaseCache.resolve)."""
        return self.releases.resolve(release, fmt)

    def default_console_url(self, version: str) -> str:
        return self.releases.default_console_url(version)

    def warm(self) -> None:
        """Open and verify every published release now, and hash the unchanged prefix of their
        slot formats, so that the first stamps do not pay for it. A release that does not verify
        is reported (one line) and refused; the others are served. Best effort: storage that is
        down now is reported when a request needs it."""
        opened = self.releases.open_all()
        if opened is None:
            return
        for rel in opened:
            for name in {formats.kind(k).base for k in formats.SLOTTED}:
                if name in rel.manifest["files"] and rel.file(name).slot:
                    stamp.warm_prefix_hash(rel.file(name))
        self.releases.report_refused()

    # -- records and revocations --------------------------------------------------------------

    def record(self, installer_id: str) -> Record | None:
        """The record of a finished installer, or None."""
        return self.records.get(installer_id)

    def is_revoked(self, token_fp: str) -> bool:
        return self.revocations.is_revoked(token_fp)

    def revoke(self, caller: str, account_id: str, group_id: str, token: Secret) -> str:
        fp = token_fingerprint(token)
        self.revocations.add(caller, account_id, group_id, fp)
        self.audit.record(caller, "revoke", account_id=account_id, group_id=group_id, token_fp=fp)
        return fp

    # -- issuing ------------------------------------------------------------------------------

    def sign(self, version: str, enrollment: Enrollment, expires_in: int | None = None) -> SignedEnrollment:
        """`enrollment` signed for release `version`'s agents; EnrollmentError (422, naming
        console_url) when its pins would refuse it."""
        if self.enrollment_key is None:
            raise NoEnrollmentKey("this service has no enrollment key, so it cannot sign enrollments",
                                  "its operators must configure the enrollment key (a file or an HSM key) the releases pin")
        trust = self.releases.open(version)[0].trust()
        if trust.key(self.enrollment_key.kid) is None:
            raise NotConfigured(f"release {version} does not pin this service's enrollment key {self.enrollment_key.kid}",
                                "its operators must give the service a key the release pins, or publish a release that pins this one")
        now = int(time.time())
        return self.enrollment_key.sign(enrollment, trust, issued_at=now,
                                        expires_at=now + expires_in if expires_in else None)

    def require_signing(self, fmt: str) -> None:
        """NotConfigured unless this process holds the key that `fmt` is signed with again (a
        baked msi, a pkg, a dmg); exe and msi-tagged are stamped into their slot unsigned again."""
        kind = formats.kind(fmt)
        if kind.slotted or self.signers.unsigned:
            return
        for attr in formats.get(fmt).stamp_signed_with:  # a kind that is not slotted: its format's stamp()
            if getattr(self.signers, attr) is None:
                keyless = [k.name for k in formats.KINDS.values() if k.base == kind.base and k.slotted]
                raise NotConfigured(f"this service cannot make {fmt} installers: it has no {IDENTITIES[attr]} to sign them",
                                    "its operators must configure one (on its workers, when it has workers)"
                                    + "".join(f"; {name} needs no key" for name in keyless))

    def parse_signed(self, version: str, jws: str) -> SignedEnrollment:
        """A signed enrollment handed to a worker, checked against the release's pins."""
        return verify_signed(jws, self.releases.open(version)[0].trust(), int(time.time()))

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
        workers and `pickup_s`, None comes early when no worker takes the job (queued.wait_for_job)."""
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
            return queued.wait_for_job(self.queue, self.record, installer_id, wait_s, pickup_s)
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

    def raise_if_failed(self, installer_id: str) -> None:
        """The failure a worker reported for this request, as the error it would have been
        in-process (same code, status and sentence)."""
        if self.queue is not None:
            queued.raise_if_failed(self.queue, installer_id)

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
        """Stamp (builder.stamp), store (create-if-absent), then write the record. Safe to run
        twice anywhere."""
        rec = self.record(installer_id)
        if rec is not None:
            return rec
        self.require_signing(fmt)
        rel, index = self.releases.open(version)
        kind = formats.kind(fmt)
        base = rel.file(kind.base)
        if kind.slotted:
            pieces = stamp.stamp_ranges(base, enrollment)
            stored = installers.store_slot_stamp(self.store, base, index["files"][base.path.name]["key"], pieces,
                                                 kind.suffix)
        else:
            with tempfile.TemporaryDirectory(prefix="builder-issue-", dir=self.cache_dir) as tmp:
                result = stamp.stamp(rel, fmt, enrollment, self.signers, Path(tmp) / f"installer{kind.suffix}")
                stored = installers.store_file(self.store, result.path, result.sha256, result.size, kind.suffix)
        return self.records.add(Record(installer_id, version, fmt, stored.key, stored.sha256, stored.size,
                                       enrollment.account_id, enrollment.group_id, token_fingerprint(enrollment.token),
                                       stored.streamed))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
